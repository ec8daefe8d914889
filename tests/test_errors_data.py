"""Data tools never exit 0 on a useless result: empty or mostly-skipped outputs, broken tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import module_tokenizer, run_cli_with_file_size_limit, synthetic_documents, write_jsonl

from megakv.cli import prep as prep_cli
from megakv.cli import tokenizer as tokenizer_cli
from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset, pair_exists

REPO = Path(__file__).resolve().parents[1]

tokenizer_dir = pytest.fixture(scope="module")(module_tokenizer)
DOCS = synthetic_documents(18, seed=21)


def _prep(inputs: list[Path], tokenizer: Path, prefix: Path, *extra: str) -> int:
    return prep_cli.main(["--input", *map(str, inputs), "--tokenizer", str(tokenizer),
                          "--output-prefix", str(prefix), "--no-progress", *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "Fix:" in err, err
    return err


def test_a_wrong_text_key_is_an_error_naming_the_reason(tmp_path, tokenizer_dir, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    assert _prep([corpus], tokenizer_dir, tmp_path / "out" / "d", "--text-key", "body") == 2
    err = _one_error_line(capsys)
    assert "all 18 records were skipped" in err and "missing_field=18" in err and "--text-key" in err
    assert "no 'body' field (the record has 'text', 'id')" in err  # what the records do hold
    assert not pair_exists(tmp_path / "out" / "d")


@pytest.mark.parametrize("strict", [False, True])
def test_an_empty_input_is_an_error(tmp_path, tokenizer_dir, capsys, strict):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _prep([empty], tokenizer_dir, tmp_path / "out" / "d", *(["--strict"] if strict else [])) == 2
    assert "hold no records" in _one_error_line(capsys)
    assert not pair_exists(tmp_path / "out" / "d")


def test_too_many_skipped_records_fail_unless_allowed(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": DOCS[0]}), json.dumps({"text": ""}), "not json", json.dumps({"other": 1})]
    corpus.write_text("\n".join(lines) + "\n")
    assert _prep([corpus], tokenizer_dir, tmp_path / "out" / "d") == 2
    err = _one_error_line(capsys)
    assert "3 of 4 records (75%) were skipped, more than --max-skip-fraction=0.5" in err
    assert not pair_exists(tmp_path / "out" / "d")
    assert _prep([corpus], tokenizer_dir, tmp_path / "out" / "d", "--max-skip-fraction", "0.8") == 0
    assert len(IndexedDataset(tmp_path / "out" / "d")) == 1
    assert "skipped 3 records" in capsys.readouterr().out


def test_import_refuses_a_directory_without_a_usable_tokenizer(tmp_path, capsys):
    source = tmp_path / "not_a_tokenizer"
    source.mkdir()  # transformers builds an empty GPT-2 tokenizer from this config alone
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                               "eos_token": "</s>"}))
    assert tokenizer_cli.main(["import", "--from", str(source), "--output", str(tmp_path / "tok")]) == 2
    assert "cannot encode the probe text" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_tokenizer"]
    # megakv-prep refuses it as well, and leaves no tokenizer/ copy beside the data
    corpus = write_jsonl(tmp_path / "raw" / "c.jsonl", DOCS)
    assert _prep([corpus], source, tmp_path / "out" / "d") == 2
    assert "cannot encode the probe text" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_tokenizer_missing_its_model_file_leaves_no_broken_copy(tmp_path, tokenizer_dir, capsys):
    broken = tmp_path / "broken_tok"
    shutil.copytree(tokenizer_dir, broken)
    (broken / "tokenizer.model").unlink()
    corpus = write_jsonl(tmp_path / "raw" / "c.jsonl", DOCS)
    assert _prep([corpus], broken, tmp_path / "out" / "d") == 2
    assert "tokenizer.model not found" in _one_error_line(capsys)
    assert not (tmp_path / "out" / "tokenizer").exists()
    # the source repaired, the same command now works: nothing left behind blocks it
    shutil.copy(tokenizer_dir / "tokenizer.model", broken / "tokenizer.model")
    assert _prep([corpus], broken, tmp_path / "out" / "d") == 0
    assert len(IndexedDataset(tmp_path / "out" / "d")) == len(DOCS)


def test_a_damaged_tokenizer_copy_beside_the_data_is_named(tmp_path, tokenizer_dir, capsys):
    corpus = write_jsonl(tmp_path / "raw" / "c.jsonl", DOCS)
    assert _prep([corpus], tokenizer_dir, tmp_path / "out" / "d") == 0
    capsys.readouterr()
    (tmp_path / "out" / "tokenizer" / "tokenizer.model").write_bytes(b"garbage")
    assert _prep([corpus], tokenizer_dir, tmp_path / "out" / "e") == 2
    err = _one_error_line(capsys)
    assert "is damaged" in err and f"delete {tmp_path / 'out' / 'tokenizer'}" in err


def test_the_tiny_recipe_vocabulary_is_reachable_on_the_demo_corpus(tmp_path, capsys):
    from omegaconf import OmegaConf

    from megakv.data.corpora import shakespeare_corpus
    from megakv.data.corpora import write_jsonl as write_documents

    vocab = OmegaConf.load(REPO / "megakv" / "recipes" / "tiny.yaml").model.vocab_size
    corpus = tmp_path / "shakespeare.jsonl"
    write_documents(shakespeare_corpus()["shakespeare"], corpus)
    argv = ["train", "--input", str(corpus), "--vocab-size", str(vocab), "--output", str(tmp_path / "tok")]
    assert tokenizer_cli.main(argv) == 2  # the demo corpus needs more pieces at the default coverage...
    assert "--character-coverage option" in capsys.readouterr().err  # ...and the error names our option
    assert tokenizer_cli.main([*argv, "--character-coverage", "0.98"]) == 0  # as tiny.yaml says
    assert f"vocab {vocab}," in capsys.readouterr().out


def test_a_record_above_the_size_bound_is_skipped_before_tokenizing(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "c.jsonl"
    big = " ".join(DOCS) * 20  # ~ tens of KB
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in [DOCS[0], big, DOCS[1]]) + "\n")
    assert _prep([corpus], tokenizer_dir, tmp_path / "out" / "d", "--max-record-mb", "0.01") == 0
    assert "too_large=1 (e.g. " in capsys.readouterr().out
    assert len(IndexedDataset(tmp_path / "out" / "d")) == 2
    assert _prep([corpus], tokenizer_dir, tmp_path / "strict" / "d", "--max-record-mb", "0.01", "--strict") == 2
    err = capsys.readouterr().err
    assert "too_large" in err and "c.jsonl:2" in err and "--max-record-mb" in err, err
    assert not pair_exists(tmp_path / "strict" / "d")


def test_memory_per_record_is_bounded(tmp_path, tokenizer_dir):
    """Before the bound, a 50 MB one-line record took 2.9 GB of RSS in megakv-prep; now it is skipped unread."""
    import subprocess
    import sys

    corpus = tmp_path / "c.jsonl"
    with corpus.open("w") as f:
        f.write(json.dumps({"text": DOCS[0]}) + "\n")
        f.write('{"text": "' + "word " * (48 * 2**20 // 5) + '"}\n')
    # The peak RSS of the prep process and its workers, measured inside the child (not this test process's).
    code = ("import resource, sys\nfrom megakv.cli.prep import main\nrc = main(sys.argv[1:])\n"
            "peak = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
            "print('peak_kib', peak)\nsys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, "--input", str(corpus), "--tokenizer", str(tokenizer_dir),
                             "--output-prefix", str(tmp_path / "out" / "d"), "--no-progress",
                             "--max-skip-fraction", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "too_large=1" in result.stdout
    peak_mib = int(result.stdout.split("peak_kib")[1].split()[0]) / 1024
    assert peak_mib < 1024, f"megakv-prep peaked at {peak_mib:.0f} MiB on a 48 MB record"


def test_metadata_that_is_not_an_object_is_named(tmp_path, capsys):
    """A .meta.json holding a JSON list crashed megakv-data info and megakv-merge (AttributeError)."""
    from megakv.cli.data import main as data_main
    from megakv.data.indexed import IndexedWriter

    prefix = tmp_path / "d"
    with IndexedWriter(prefix, np.uint16) as writer:
        writer.add_document(np.array([5, 6, 2]))
        writer.finalize()
    (tmp_path / "d.meta.json").write_text("[1, 2]")
    assert data_main(["info", str(prefix)]) == 2
    err = capsys.readouterr().err
    assert "holds a JSON list, not megakv's metadata object" in err and "Traceback" not in err
    (tmp_path / "d.meta.json").write_text("[" * 200_000)  # was a RecursionError traceback, as in the records
    assert data_main(["info", str(prefix)]) == 2
    err = capsys.readouterr().err
    assert "d.meta.json holds JSON nested too deeply to read" in err and "Traceback" not in err


@pytest.mark.parametrize("under", ["sub", "dir/sub"])
def test_an_output_path_under_a_file_is_exit_2_naming_the_file(tmp_path, tokenizer_dir, capsys, under):
    """NotADirectoryError was a traceback, then a bare "[Errno 17] File exists: 'afile'"."""
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    assert _prep([corpus], tokenizer_dir, corpus / under) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"error: the output prefix {corpus / under} lies under {corpus}, which is a file, not a "
                          "directory") and "Errno" not in err
    assert "Fix: choose an --output-prefix inside a directory, or move the file" in err


def test_a_full_disk_names_the_output_and_leaves_no_temporaries(tmp_path, tokenizer_dir):
    """The error was a bare "[Errno 28] No space left on device". A file size limit stands in for the full disk
    (EFBIG instead of ENOSPC, the same path through the writer) through the real megakv-prep."""
    corpus = write_jsonl(tmp_path / "c.jsonl", synthetic_documents(600, seed=5))
    out = tmp_path / "out"
    done = run_cli_with_file_size_limit(48 << 10, "megakv.cli.prep", "--input", str(corpus), "--tokenizer",
                                        str(tokenizer_dir), "--output-prefix", str(out / "d"), "--no-progress")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: writing the output {out / 'd'} (.bin/.idx) failed: File too large; its "
                                  "partial temporary files were removed. Fix: the file size limit was reached")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer"]


@pytest.mark.parametrize("name, content", [("g.jsonl.gz", b"not gzip at all"), ("g.parquet", b"not parquet"),
                                           ("t.jsonl.gz", None)])
def test_a_damaged_compressed_or_parquet_input_is_named(tmp_path, tokenizer_dir, capsys, name, content):
    """A corrupt .gz or .parquet, or a truncated .gz (an interrupted download), was a traceback."""
    import gzip

    path = tmp_path / name
    if content is None:
        whole = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode())
        path.write_bytes(whole[: len(whole) // 2])
    else:
        path.write_bytes(content)
    assert _prep([path], tokenizer_dir, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{path} cannot be read as" in err and "Traceback" not in err
    assert not (tmp_path / "out.idx").exists()


def test_prep_refuses_no_workers_and_a_directory_as_prefix(tmp_path, tokenizer_dir, capsys):
    """--workers 0 was accepted; --output-prefix out/ wrote ./out.bin and ./tokenizer beside the directory."""
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    (tmp_path / "out").mkdir()
    for extra, words in ((["--workers", "0"], "--workers must be at least 1"),):
        with pytest.raises(SystemExit) as usage:
            _prep([corpus], tokenizer_dir, tmp_path / "d", *extra)
        assert usage.value.code == 2 and words in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        prep_cli.main(["--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--output-prefix",
                       f"{tmp_path / 'out'}/"])
    assert usage.value.code == 2 and "names a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]
    # A prefix that shares a directory's name is an ordinary prefix (Megatron's prep/wiki beside prep/wiki/).
    assert _prep([corpus], tokenizer_dir, tmp_path / "out") == 0 and pair_exists(tmp_path / "out")


def test_a_qa_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    from megakv.data.sft import read_qa_records

    path = tmp_path / "qa.jsonl"
    path.write_bytes(json.dumps({"context": "c", "question": "q", "answer": "a"}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"qa.jsonl:2: not UTF-8"):
        read_qa_records(path)
