"""Preprocessing: formats, worker pool, bad input, output safety, interruption."""

from __future__ import annotations

import bz2
import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import module_tokenizer, synthetic_documents

from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset, pair_exists
from megakv.data.metadata import read_meta
from megakv.data.preprocess import PrepOptions, preprocess
from megakv.data.sources import InputFile, expand_inputs, select_shard
from megakv.data.tokenizer import load_tokenizer

DOCS = synthetic_documents(40, seed=3)

tokenizer_dir = pytest.fixture(scope="module")(module_tokenizer)


def decoded(prefix, tokenizer_dir) -> list[str]:
    ds, tok = IndexedDataset(prefix), load_tokenizer(tokenizer_dir)
    out = []
    for i in range(len(ds)):
        tokens = ds[i].tolist()
        assert tokens[-1] == tok.eos_id and tok.eos_id not in tokens[:-1]
        out.append(tok.decode(tokens[:-1]))
    return out


def write_inputs(kind: str, root: Path, docs: list[str]) -> tuple[list[str], PrepOptions]:
    root.mkdir(parents=True, exist_ok=True)
    if kind in ("jsonl", "jsonl.gz", "jsonl.bz2"):
        raw = "".join(json.dumps({"body": d}) + "\n" for d in docs).encode()
        path = root / f"c.{kind}"
        opener = {"jsonl": open, "jsonl.gz": gzip.open, "jsonl.bz2": bz2.open}[kind]
        with opener(path, "wb") as f:
            f.write(raw)
        return [str(path)], PrepOptions(text_key="body")
    if kind == "txt-document":
        for i, d in enumerate(docs):
            (root / f"doc_{i:03d}.txt").write_text(d, encoding="utf-8")
        return [str(root)], PrepOptions()
    if kind == "txt-paragraph":
        (root / "all.txt.gz").write_bytes(gzip.compress("\n\n\n".join(docs).encode()))
        return [str(root / "all.txt.gz")], PrepOptions(txt_unit="paragraph")
    if kind == "txt-line":
        (root / "lines.txt").write_text("\r\n".join(d.replace("\n", " ") for d in docs), encoding="utf-8")
        return [str(root / "*.txt")], PrepOptions(txt_unit="line")
    if kind == "parquet":
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), root / "c.parquet", row_group_size=7)
        return [str(root / "c.parquet")], PrepOptions()
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.bz2", "txt-document", "txt-paragraph", "txt-line",
                                  "parquet"])
def test_round_trip_text_to_tokens_to_reader(tmp_path, tokenizer_dir, kind):
    docs = [d.replace("\n", " ") for d in DOCS] if kind == "txt-line" else DOCS
    inputs, options = write_inputs(kind, tmp_path / "in", docs)
    summary = preprocess(inputs, tokenizer_dir, tmp_path / "out" / "d", options=options, progress=False)
    assert decoded(tmp_path / "out" / "d", tokenizer_dir) == docs
    assert summary.documents == len(docs) and not summary.skipped
    assert summary.dtype == "uint16"  # vocab 400 does not fit uint8
    meta = read_meta(tmp_path / "out" / "d")
    assert meta["documents"] == len(docs) and meta["tokens"] == IndexedDataset(tmp_path / "out" / "d").num_tokens
    assert meta["max_token_id"] < 400 and meta["eos_id"] == 2
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.model").exists()


def test_two_workers_write_the_same_bytes_as_one(tmp_path, tokenizer_dir, monkeypatch):
    import megakv.data.preprocess as prep

    monkeypatch.setattr(prep, "BATCH_RECORDS", 16)  # several batches in flight
    docs = synthetic_documents(150, seed=11)
    inputs, _ = write_inputs("jsonl", tmp_path / "in", docs)
    options = PrepOptions(text_key="body")
    one = preprocess(inputs, tokenizer_dir, tmp_path / "a" / "d", workers=1, options=options, progress=False)
    two = preprocess(inputs, tokenizer_dir, tmp_path / "b" / "d", workers=2, options=options, progress=False)
    assert (one.documents, one.tokens) == (two.documents, two.tokens) == (150, one.tokens)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / "a" / f"d{suffix}").read_bytes() == (tmp_path / "b" / f"d{suffix}").read_bytes()


def test_prepend_bos(tmp_path, tokenizer_dir):
    inputs, _ = write_inputs("txt-document", tmp_path / "in", DOCS[:3])
    preprocess(inputs, tokenizer_dir, tmp_path / "d", options=PrepOptions(prepend_bos=True), progress=False)
    ds = IndexedDataset(tmp_path / "d")
    assert [ds[i][0] for i in range(3)] == [1, 1, 1] and [ds[i][-1] for i in range(3)] == [2, 2, 2]



def test_prepend_bos_survives_a_batch_whose_records_are_all_skipped(tmp_path, tokenizer_dir, monkeypatch):
    import megakv.data.preprocess as prep

    monkeypatch.setattr(prep, "BATCH_RECORDS", 4)  # the first batch is the 4 bad lines, the second the good ones
    path = tmp_path / "in" / "d.jsonl"
    path.parent.mkdir()
    good = [json.dumps({"text": doc}) for doc in DOCS[:3]]
    path.write_text("\n".join(['{"other": 1}'] * 4 + good) + "\n")
    options = PrepOptions(prepend_bos=True)
    summary = preprocess([str(path)], tokenizer_dir, tmp_path / "d", options=options, progress=False,
                         max_skip_fraction=1.0)
    assert summary.documents == 3 and dict(summary.skipped) == {"missing_field": 4}
    ds = IndexedDataset(tmp_path / "d")
    assert [ds[i][0] for i in range(3)] == [1, 1, 1]
    path.write_text('{"other": 1}\n' * 4)  # every record skipped: the clear error, not a crash
    with pytest.raises(DataError, match="all 4 records were skipped"):
        preprocess([str(path)], tokenizer_dir, tmp_path / "e", options=options, progress=False)


# (line content, skip reason); every line of one jsonl file, each bad in its own way
BAD_JSONL = [
    (b'{"text": "good one"}', None),
    (b'{"text": "bad \xff byte"}', "invalid_utf8"),
    (b'{"text": ""}', "empty"),
    (b'{"text": "  \\n\\t "}', "empty"),
    (b'{"other": "no text field"}', "missing_field"),
    (b'{"text": null}', "missing_field"),
    (b"this is not json", "not_json"),
    (b'["a", "list"]', "not_json"),
    (b'{"text": 42}', "not_text"),
    (b"", "empty"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8"),
    (b'{"text": "good two"}', None),
]


def _bad_jsonl(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_JSONL) + b"\n")
    return path


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path, tokenizer_dir):
    jsonl = _bad_jsonl(tmp_path / "in")
    (tmp_path / "in" / "bad.txt").write_bytes(b"invalid \xc3\x28 utf8 document")
    (tmp_path / "in" / "blank.txt").write_bytes(b" \n\t\n")
    pq.write_table(pa.table({"text": ["parquet good", None, "   "]}), tmp_path / "in" / "p.parquet")
    summary = preprocess([str(tmp_path / "in")], tokenizer_dir, tmp_path / "d", progress=False,
                         max_skip_fraction=1.0)  # counting is the point here, not refusing
    assert decoded(tmp_path / "d", tokenizer_dir) == ["good one", "good two", "parquet good"]
    expected = {"invalid_utf8": 3, "empty": 5, "missing_field": 3, "not_json": 2, "not_text": 1}
    assert dict(summary.skipped) == expected
    assert read_meta(tmp_path / "d")["skipped"] == expected
    report = summary.format()
    assert f"{jsonl}:2" in report and f"{jsonl}:7" in report and "not_json=2" in report


@pytest.mark.parametrize("line", [i for i, (_, reason) in enumerate(BAD_JSONL) if reason])
def test_strict_mode_fails_naming_file_and_line(tmp_path, tokenizer_dir, line):
    path = tmp_path / "in" / "one.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"text": "fine"}\n' + BAD_JSONL[line][0] + b'\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=f"{path}:2: .*{BAD_JSONL[line][1]}"):
        preprocess([str(path)], tokenizer_dir, tmp_path / "out" / "d", options=PrepOptions(strict=True),
                   progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer"]  # nothing half-written


def test_token_id_outside_the_vocab_is_an_error(tmp_path, tokenizer_dir):
    lying = tmp_path / "lying_tokenizer"
    lying.mkdir()
    for p in tokenizer_dir.iterdir():
        (lying / p.name).write_bytes(p.read_bytes())
    meta = json.loads((lying / "megakv_tokenizer.json").read_text())
    (lying / "megakv_tokenizer.json").write_text(json.dumps({**meta, "vocab_size": 100}))
    inputs, options = write_inputs("jsonl", tmp_path / "in", DOCS[:5])
    with pytest.raises(DataError, match=r"c\.jsonl:1: token id \d+ is outside the vocabulary of 100"):
        preprocess(inputs, lying, tmp_path / "out" / "d", options=options, progress=False)
    assert not pair_exists(tmp_path / "out" / "d")


def test_output_holding_a_different_dataset_is_refused(tmp_path, tokenizer_dir):
    a, opts = write_inputs("jsonl", tmp_path / "a", DOCS[:5])
    b, _ = write_inputs("jsonl", tmp_path / "b", DOCS[5:9])
    prefix = tmp_path / "out" / "d"
    assert not preprocess(a, tokenizer_dir, prefix, options=opts, progress=False).already_done
    assert preprocess(a, tokenizer_dir, prefix, options=opts, progress=False).already_done
    with pytest.raises(DataError, match="already holds a different dataset"):
        preprocess(b, tokenizer_dir, prefix, options=opts, progress=False)
    with pytest.raises(DataError, match="already holds a different dataset"):  # other options = other job
        preprocess(a, tokenizer_dir, prefix, options=PrepOptions(text_key="body", prepend_bos=True), progress=False)
    preprocess(b, tokenizer_dir, prefix, options=opts, overwrite=True, progress=False)
    assert decoded(prefix, tokenizer_dir) == DOCS[5:9]
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["d.bin", "d.idx", "d.meta.json", "tokenizer"]


def test_an_exception_mid_run_leaves_nothing(tmp_path, tokenizer_dir, monkeypatch):
    import megakv.data.preprocess as prep

    calls = []
    original = prep.encode_task

    def failing(task):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("worker died")
        return original(task)

    monkeypatch.setattr(prep, "encode_task", failing)
    monkeypatch.setattr(prep, "BATCH_RECORDS", 4)
    inputs, opts = write_inputs("jsonl", tmp_path / "in", DOCS)
    with pytest.raises(RuntimeError, match="worker died"):
        preprocess(inputs, tokenizer_dir, tmp_path / "out" / "d", options=opts, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer"]


SLOW_PREP = """
import sys, time
import megakv.data.preprocess as prep
original = prep.encode_task
def slow(task):
    time.sleep(0.05)
    return original(task)
prep.encode_task = slow
prep.BATCH_RECORDS = 2
from megakv.cli.prep import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_never_leaves_a_pair_that_looks_complete(tmp_path, tokenizer_dir, sig):
    docs = synthetic_documents(400, seed=1)
    inputs, _ = write_inputs("jsonl", tmp_path / "in", docs)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREP, "--input", *inputs, "--tokenizer", str(tokenizer_dir),
                             "--output-prefix", str(out / "d"), "--text-key", "body", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not any(p.name.startswith("d.bin.tmp") and p.stat().st_size > 0 for p in out.glob("d.*")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not pair_exists(out / "d") and not (out / "d.meta.json").exists()
    leftovers = sorted(p.name for p in out.iterdir() if p.name != "tokenizer")
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM and leftovers == []  # cleaned up on the way out
    else:
        assert leftovers and all(".tmp-" in name for name in leftovers)  # visibly temporary, never a pair


def test_inputs_from_files_globs_and_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("a.jsonl", "sub/b.txt", "sub/c.jsonl.gz", "sub/notes.csv", "sub/e.parquet"):
        (tmp_path / "d" / name).write_bytes(b"")
    found = expand_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "a.jsonl")])
    assert [(f.path.name, f.format, f.compression) for f in found] == [
        ("a.jsonl", "jsonl", None), ("b.txt", "txt", None), ("c.jsonl.gz", "jsonl", ".gz"),
        ("e.parquet", "parquet", None)]
    assert [f.path.name for f in expand_inputs([str(tmp_path / "d" / "**" / "*.jsonl*")])] == [
        "a.jsonl", "c.jsonl.gz"]
    with pytest.raises(DataError, match="cannot tell the format"):
        expand_inputs([str(tmp_path / "d" / "sub" / "notes.csv")])
    assert expand_inputs([str(tmp_path / "d" / "sub" / "notes.csv")], "txt")[0].format == "txt"
    with pytest.raises(DataError, match="not found"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="matched no files"):
        expand_inputs([str(tmp_path / "*.nothing")])


def test_shards_are_contiguous_cover_every_file_once_and_balance_bytes():
    sizes = [900, 10, 500, 480, 20, 30, 1, 400, 300, 350]
    files = [InputFile(Path(f"f{i}"), "txt", None, s) for i, s in enumerate(sizes)]
    shards = [select_shard(files, i, 3) for i in range(3)]
    assert [f for shard in shards for f in shard] == files  # in order: merged shards == all at once
    loads = [sum(f.size for f in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(sizes)
    assert sum(len(select_shard(files[:2], i, 5)) for i in range(5)) == 2  # more shards than files
    with pytest.raises(DataError, match="shard index"):
        select_shard(files, 3, 3)


def test_a_shard_without_files_writes_an_empty_part_that_merges(tmp_path, tokenizer_dir):
    """More array tasks than files: the empty shares succeed (an error failed the array, so its afterok merge
    never ran) and the merged parts equal one run over all the files."""
    from megakv.data.merge import merge

    inputs, opts = write_inputs("txt-document", tmp_path / "in", DOCS[:3])  # 3 files, 5 shares
    parts = [tmp_path / "parts" / f"part_{index}" for index in range(5)]
    files = [preprocess(inputs, tokenizer_dir, prefix, options=opts, shard=(index, 5), progress=False).files
             for index, prefix in enumerate(parts)]
    assert sum(files) == 3 and files.count(0) == 2
    assert [len(IndexedDataset(p)) for p, n in zip(parts, files) if n == 0] == [0, 0]
    merge([str(p) for p in parts], tmp_path / "merged")
    preprocess(inputs, tokenizer_dir, tmp_path / "single", options=opts, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"merged{suffix}").read_bytes() == (tmp_path / f"single{suffix}").read_bytes()


def test_utf8_bom_and_crlf_are_not_part_of_the_text(tmp_path, tokenizer_dir):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n')
    preprocess([str(path)], tokenizer_dir, tmp_path / "d", progress=False)
    assert decoded(tmp_path / "d", tokenizer_dir) == ["first", "second"]
