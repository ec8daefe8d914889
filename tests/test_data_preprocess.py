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
    (b"[" * 200_000, "not_json"),  # too deep for Python's parser: a RecursionError traceback (security audit)
    (b'{"text": 42}', "not_text"),
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
    expected = {"invalid_utf8": 3, "empty": 4, "missing_field": 3, "not_json": 3, "not_text": 1}
    assert dict(summary.skipped) == expected
    assert read_meta(tmp_path / "d")["skipped"] == expected
    report = summary.format()
    assert f"{jsonl}:2" in report and f"{jsonl}:7" in report and "not_json=3" in report


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
    # An input edited in place with its size and modification time kept looks like the same job; megakv-prep
    # --overwrite prepares it again (it was "nothing to do").
    import os

    edited = Path(b[0])
    stat = edited.stat()
    edited.write_text(edited.read_text().replace("e", "o"))
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert preprocess(b, tokenizer_dir, prefix, options=opts, progress=False).already_done
    # overwrite replaces another dataset but keeps this job's (a recipe owning its directory passes it on
    # every run); redo (megakv-prep --overwrite) prepares it again
    assert preprocess(b, tokenizer_dir, prefix, options=opts, overwrite=True, progress=False).already_done
    assert not preprocess(b, tokenizer_dir, prefix, options=opts, overwrite=True, redo=True,
                          progress=False).already_done
    assert decoded(prefix, tokenizer_dir) == [d.replace("e", "o") for d in DOCS[5:9]]
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["d.bin", "d.idx", "d.meta.json", "tokenizer"]


def test_an_output_an_older_reader_made_is_reused_with_a_warning(tmp_path, tokenizer_dir, capsys):
    """Reading rules change (lone CR, blank lines, hidden files): a rerun keeps the older output, valid
    tokens, but says it may differ from what this version makes and how to re-prepare."""
    from megakv.cli.prep import main
    from megakv.data.metadata import write_meta
    from megakv.data.preprocess import READER_VERSION

    inputs, _ = write_inputs("jsonl", tmp_path / "in", DOCS[:5])
    prefix = tmp_path / "out" / "d"
    argv = ["--input", *inputs, "--text-key", "body", "--tokenizer", str(tokenizer_dir), "--output-prefix", str(prefix),
            "--no-progress"]
    assert main(argv) == 0
    assert read_meta(prefix)["reader_version"] == READER_VERSION
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "nothing to do" in out and "older megakv-prep reader" not in err  # the current reader made it: silent

    meta = read_meta(prefix)
    del meta["reader_version"]  # as written before reader versions were recorded
    write_meta(prefix, meta)
    bin_before = (tmp_path / "out" / "d.bin").read_bytes()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "nothing to do" in out
    assert f"older megakv-prep reader (version 1, now {READER_VERSION}" in err and "--overwrite" in err
    assert (tmp_path / "out" / "d.bin").read_bytes() == bin_before  # reused, not rewritten
    assert main([*argv, "--overwrite"]) == 0
    assert read_meta(prefix)["reader_version"] == READER_VERSION
    assert decoded(prefix, tokenizer_dir) == DOCS[:5]


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


def test_parquet_reads_the_text_column_alone_and_empty_row_groups(tmp_path, tokenizer_dir):
    """Parquet went through `datasets`: another column of a type it has no dtype for (map<string, string>) was a
    traceback, and a 0-row file or one whose first row group is empty was refused as damaged."""
    root = tmp_path / "in"
    root.mkdir()
    with_map = pa.table({"text": ["with a map", "second"],
                         "meta": pa.array([[("k", "v")], []], pa.map_(pa.string(), pa.string()))})
    pq.write_table(with_map, root / "a_map.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), root / "b_empty.parquet")
    with pq.ParquetWriter(root / "c_rowgroups.parquet", pa.schema([("text", pa.string())])) as writer:
        writer.write_table(pa.table({"text": pa.array([], pa.string())}))  # an empty first row group
        writer.write_table(pa.table({"text": ["after an empty row group"]}))
    assert [pq.ParquetFile(root / "c_rowgroups.parquet").metadata.row_group(i).num_rows for i in (0, 1)] == [0, 1]
    summary = preprocess([str(root)], tokenizer_dir, tmp_path / "d", progress=False)
    assert decoded(tmp_path / "d", tokenizer_dir) == ["with a map", "second", "after an empty row group"]
    assert (summary.files, summary.skipped) == (3, {})
    with pytest.raises(DataError, match="hold no records"):  # a 0-row file alone is empty, not damaged
        preprocess([str(root / "b_empty.parquet")], tokenizer_dir, tmp_path / "e", progress=False)
    # The clear errors stay: a missing column, a column that is no text, two columns of that name.
    with pytest.raises(DataError, match=r"missing_field=2 .*no 'body' value\. Fix: check --text-key"):
        preprocess([str(root / "a_map.parquet")], tokenizer_dir, tmp_path / "f", options=PrepOptions(text_key="body"),
                   progress=False)
    with pytest.raises(DataError, match=r"not_text=2 .*'meta' holds a list"):
        preprocess([str(root / "a_map.parquet")], tokenizer_dir, tmp_path / "g", options=PrepOptions(text_key="meta"),
                   progress=False)
    twice = pa.Table.from_arrays([pa.array(["x"]), pa.array(["y"])], names=["text", "text"])
    pq.write_table(twice, tmp_path / "twice.parquet")
    with pytest.raises(DataError, match="has 2 columns named 'text'"):
        preprocess([str(tmp_path / "twice.parquet")], tokenizer_dir, tmp_path / "h", progress=False)


def test_directories_skip_hidden_files_and_directories_as_globs_do(tmp_path):
    """A directory walk read macOS `._x.txt` files and `.ipynb_checkpoints/` copies; `dir/**/*` skipped them."""
    root = tmp_path / "d"
    for name in ("a.jsonl", "._a.txt", ".h.jsonl", ".ipynb_checkpoints/a-checkpoint.jsonl", "sub/b.txt",
                 "sub/.hidden/c.jsonl"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text('{"text": "x"}\n')
    names = [str(f.path.relative_to(root)) for f in expand_inputs([str(root)])]
    assert names == ["a.jsonl", "sub/b.txt"]
    assert [str(f.path.relative_to(root)) for f in expand_inputs([str(root / "**" / "*")])] == names
    ignored: dict = {}
    expand_inputs([str(root)], ignored=ignored)
    assert sorted(str(p.relative_to(root)) for p in ignored["hidden"]) == [
        "._a.txt", ".h.jsonl", ".ipynb_checkpoints", "sub/.hidden"]
    hidden_root = tmp_path / ".data"  # a hidden directory named as the input is read
    (hidden_root / "x.txt").parent.mkdir()
    (hidden_root / "x.txt").write_text("x")
    assert [f.path.name for f in expand_inputs([str(hidden_root)])] == ["x.txt"]


def test_suffixes_match_in_any_case_and_ignored_files_are_reported(tmp_path, tokenizer_dir):
    """`C.JSONL`, `e.jsonl.GZ` and JSON lines named `b.json` in a directory were dropped without a word."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "C.JSONL").write_text('{"text": "upper case"}\n')
    (root / "a.jsonl").write_text('{"text": "lower case"}\n')
    (root / "e.jsonl.GZ").write_bytes(gzip.compress(b'{"text": "upper case gzip"}\n'))
    (root / "b.json").write_text('{"text": "json lines named .json"}\n')
    (root / "notes.csv").write_text("a,b\n")
    (root / ".DS_Store").write_bytes(b"\0")
    assert [(f.path.name, f.format, f.compression) for f in expand_inputs([str(root)])] == [
        ("C.JSONL", "jsonl", None), ("a.jsonl", "jsonl", None), ("e.jsonl.GZ", "jsonl", ".gz")]
    summary = preprocess([str(root)], tokenizer_dir, tmp_path / "d", progress=False)
    assert decoded(tmp_path / "d", tokenizer_dir) == ["upper case", "lower case", "upper case gzip"]
    report = summary.format()
    assert "ignored 3 entries of the input directories" in report
    assert "1 hidden" in report and ".DS_Store" in report
    assert "1 .json" in report and "b.json" in report and "--format jsonl" in report
    assert "1 of no known format" in report and "notes.csv" in report
    with pytest.raises(DataError, match=r"cannot tell the format of .*b\.json.*rename the file, or pass --format"):
        expand_inputs([str(root / "b.json")])
    preprocess([str(root / "b.json")], tokenizer_dir, tmp_path / "j", options=PrepOptions(format="jsonl"),
               progress=False)
    assert decoded(tmp_path / "j", tokenizer_dir) == ["json lines named .json"]
    with pytest.raises(DataError, match=r"no input files with a known format .*ignored 1 entries.*notes\.csv"):
        only_csv = tmp_path / "csv"
        only_csv.mkdir()
        (only_csv / "notes.csv").write_text("a,b\n")
        expand_inputs([str(only_csv)])


def test_a_lone_cr_ends_a_line_as_in_universal_newlines(tmp_path, tokenizer_dir, monkeypatch):
    """CR-only line ends (old Mac files) made a whole txt file one document under --txt-unit line/paragraph."""
    import io
    import random
    import re

    import megakv.data.sources as sources
    from megakv.data.sources import RecordReader

    root = tmp_path / "in"
    root.mkdir()
    (root / "cr.txt").write_bytes(b"para one line1\rpara one line2\r\rpara two\r")
    # JSON Lines end at \n (\r\n too): a raw \r is JSON whitespace inside a record, not a line end.
    (root / "cr.jsonl").write_bytes(b'{"text": "y1",\r"id": 1}\n{"text": "y2"}\r\n{"text": "y3"}')
    for unit, expected in (("line", ["para one line1", "para one line2", "para two"]),
                           ("paragraph", ["para one line1\npara one line2", "para two"])):
        preprocess([str(root / "cr.txt")], tokenizer_dir, tmp_path / unit, options=PrepOptions(txt_unit=unit),
                   progress=False)
        assert decoded(tmp_path / unit, tokenizer_dir) == expected
    preprocess([str(root / "cr.jsonl")], tokenizer_dir, tmp_path / "j", progress=False)
    assert decoded(tmp_path / "j", tokenizer_dir) == ["y1", "y2", "y3"]
    # Lines as Python's universal newlines split them, wherever the reads cut the bytes (a \r\n in two, a line
    # longer than a read).
    rng = random.Random(0)
    for chunk in (1, 2, 3, 7):
        monkeypatch.setattr(sources, "READ_CHUNK", chunk)
        for _ in range(200):
            data = bytes(rng.choice(b"ab\r\n") for _ in range(rng.randint(0, 24)))
            expected = re.split(rb"\r\n|\r|\n", data)
            if not data or data.endswith((b"\r", b"\n")):
                expected.pop()
            assert [line for _, line in RecordReader._lines(io.BytesIO(data))] == expected, (chunk, data)


def test_blank_lines_separate_records_and_are_not_counted(tmp_path, tokenizer_dir):
    """Blank lines were counted as empty records: lines spaced by blank lines failed the skip-fraction check
    (exit 2), and --strict failed on one trailing blank line."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "spaced.txt").write_text("".join(f"line {i}\n\n\n" for i in range(10)))
    summary = preprocess([str(root / "spaced.txt")], tokenizer_dir, tmp_path / "t",
                         options=PrepOptions(txt_unit="line"), progress=False)
    assert (summary.documents, summary.skipped) == (10, {})
    (root / "spaced.jsonl").write_bytes(b'{"text": "one"}\n\n  \n{"text": "two"}\r\n\r\n\t\n')
    summary = preprocess([str(root / "spaced.jsonl")], tokenizer_dir, tmp_path / "j",
                         options=PrepOptions(strict=True), progress=False)
    assert decoded(tmp_path / "j", tokenizer_dir) == ["one", "two"] and summary.skipped == {}
    (root / "bad.jsonl").write_bytes(b'{"text": "one"}\n\n{"text": ""}\n')  # line numbers still count blank lines
    with pytest.raises(DataError, match=r"bad\.jsonl:3: .*\(empty\)"):
        preprocess([str(root / "bad.jsonl")], tokenizer_dir, tmp_path / "b", options=PrepOptions(strict=True),
                   progress=False)


def test_an_output_inside_an_input_directory_is_refused(tmp_path, tokenizer_dir):
    """`--input c --format txt --output-prefix c/train` read its own lock, metadata and tokenizer files as
    documents (with --overwrite, the previous train.meta.json was tokenized), exit 0."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}").write_text(DOCS[i])
    for output in (corpus / "train", corpus / "sub" / "train"):
        with pytest.raises(DataError, match=f"lies inside the input directory {corpus}.*outside the input "
                                            f"directories, e.g. --output-prefix {tmp_path / 'c_prepared' / 'train'}"):
            preprocess([str(corpus)], tokenizer_dir, output, options=PrepOptions(format="txt"), progress=False)
    assert sorted(p.name for p in corpus.iterdir()) == ["doc0", "doc1", "doc2"]  # nothing written, not even a lock
    preprocess([str(corpus)], tokenizer_dir, tmp_path / "c_prepared" / "train", options=PrepOptions(format="txt"),
               progress=False)
    assert decoded(tmp_path / "c_prepared" / "train", tokenizer_dir) == DOCS[:3]
    # A glob matching the output's own files is refused too.
    (corpus / "train.meta.json").write_text("{}")
    with pytest.raises(DataError, match=r"the inputs include files written for the output .*train\.meta\.json"):
        preprocess([str(corpus / "*")], tokenizer_dir, corpus / "train", options=PrepOptions(format="txt"),
                   progress=False)
    # An input merely named like the output, beside it, is an input (`--input data/train.jsonl --output-prefix
    # data/train` was refused by the first version of this check).
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]))
    preprocess([str(beside / "train.jsonl")], tokenizer_dir, beside / "train", progress=False)
    assert decoded(beside / "train", tokenizer_dir) == DOCS[:3]


def test_a_data_directory_prepared_again_with_another_tokenizer_in_one_process_uses_the_new_one(tmp_path,
                                                                                                tokenizer_dir):
    """The per-process tokenizer cache was keyed by directory only: preparing data/ again after replacing it
    (in a notebook, a test, a study) wrote the old tokenizer's ids under the new tokenizer's metadata."""
    import shutil

    from megakv.data.tokenizer import train_sentencepiece

    other = tmp_path / "other_tokenizer"
    train_sentencepiece(synthetic_documents(60, seed=3), other, vocab_size=360)
    inputs, options = write_inputs("jsonl", tmp_path / "in", DOCS[:5])
    prefix = tmp_path / "data" / "d"
    preprocess(inputs, tokenizer_dir, prefix, options=options, progress=False)
    shutil.rmtree(prefix.parent)
    preprocess(inputs, other, prefix, options=options, progress=False)
    assert decoded(prefix, other) == DOCS[:5]
    new = load_tokenizer(other)
    assert IndexedDataset(prefix)[0].tolist() == [*new.encode(DOCS[0]), new.eos_id]


def test_the_next_run_removes_the_temporaries_a_killed_run_left(tmp_path, tokenizer_dir):
    """kill -9 leaves PREFIX.bin.tmp-* and the rest (the size of the output so far); they stayed forever. The next
    writer of the prefix, once it holds the lock, removes them: only megakv's own temporary names of that prefix
    (and of its loss-mask pair, written under the same lock)."""
    from megakv.cli.prep import main

    inputs, _ = write_inputs("jsonl", tmp_path / "in", synthetic_documents(400, seed=1))
    out = tmp_path / "out"
    argv = ["--input", *inputs, "--tokenizer", str(tokenizer_dir), "--output-prefix", str(out / "d"), "--text-key",
            "body", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREP, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not any(p.name.startswith("d.bin.tmp") and p.stat().st_size > 0 for p in out.glob("d.*")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    left = {p.name for p in out.glob("d.*.tmp-*")}
    assert {name.split(".tmp-")[0] for name in left} == {"d.bin", "d.lengths", "d.docs"}, left
    (out / "d_lossmask.idx.tmp-99999-0123abcd").write_bytes(b"x")  # a killed megakv-qa prep's
    (out / "d.meta.json.tmp-0123abcd").write_bytes(b"x")  # an older version's metadata temporary
    others = ["d.bin.tmp-notours", "d.bin.tmp-1-0123abc", "dx.bin.tmp-1-0123abcd", "d.notes.tmp-1-0123abcd",
              "d.bin.tmp-1-0123abcd.keep"]
    for name in others:
        (out / name).write_bytes(b"keep")
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["d.bin", "d.idx", "d.meta.json", "tokenizer", *others])


def test_progress_in_a_log_file_is_one_line_per_update(capsys):
    """Under SLURM the bar goes to a .out file: carriage returns made every update one endless line that less
    and grep could not read (SLURM audit). Not on a terminal (capsys is not one), each update is a line."""
    from megakv.cli.progress import ProgressBar
    from megakv.data.progress import Progress

    with Progress(1000, "prep") as progress:
        progress.read_to(500)
        progress.wrote(3, 300)
    with ProgressBar(4, "eval", "batch") as bar:
        bar.advance(4)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) >= 4 and lines[0].startswith("prep") and "100%" in lines[-1] and "eval" in lines[-1]
