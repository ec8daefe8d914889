"""The console scripts and the data_prep/ SLURM scripts, end to end on small real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import synthetic_documents, write_jsonl
from tqdm import tqdm

from megakv.cli import data as data_cli
from megakv.cli import merge as merge_cli
from megakv.cli import prep as prep_cli
from megakv.cli import tokenizer as tokenizer_cli
from megakv.data.indexed import IndexedDataset
from megakv.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _corpus(root: Path, files: int = 4, per_file: int = 25) -> list[Path]:
    docs = synthetic_documents(files * per_file, seed=13)
    return [write_jsonl(root / f"shard_{i:02d}.jsonl", docs[i * per_file:(i + 1) * per_file]) for i in range(files)]


def test_tokenizer_prep_merge_info(tmp_path, capsys):
    files = _corpus(tmp_path / "raw")
    assert tokenizer_cli.main(["train", "--input", str(tmp_path / "raw"), "--vocab-size", "400",
                               "--output", str(tmp_path / "tok")]) == 0
    assert "vocab 400" in capsys.readouterr().out
    # A wrong --text-key reads no text: said as such, not as a SentencePiece complaint about the vocabulary.
    assert tokenizer_cli.main(["train", "--input", str(tmp_path / "raw"), "--vocab-size", "400", "--text-key",
                               "body", "--output", str(tmp_path / "tok_none")]) == 2
    err = capsys.readouterr().err
    assert "no text was read from the 4 input file(s)" in err and "missing_field" in err and "--text-key" in err
    assert tokenizer_cli.main(["encode", str(tmp_path / "tok"), "to be\nor not"]) == 0
    assert json.loads(capsys.readouterr().out)["decoded"] == "to be\nor not"
    assert tokenizer_cli.main(["info", str(tmp_path / "tok")]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 400
    # info printed the metadata of a directory whose model file was garbage, or another tokenizer's.
    shutil.copytree(tmp_path / "tok", tmp_path / "tok_bad")
    (tmp_path / "tok_bad" / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    assert tokenizer_cli.main(["info", str(tmp_path / "tok_bad")]) == 2
    assert "not a SentencePiece model" in capsys.readouterr().err
    assert tokenizer_cli.main(["train", "--input", str(tmp_path / "raw"), "--vocab-size", "500",
                               "--output", str(tmp_path / "tok500")]) == 0
    shutil.copy(tmp_path / "tok500" / "tokenizer.model", tmp_path / "tok_bad" / "tokenizer.model")
    capsys.readouterr()
    assert tokenizer_cli.main(["info", str(tmp_path / "tok_bad")]) == 2
    assert "do not match its megakv_tokenizer.json" in capsys.readouterr().err
    # The output directory was replaced whatever it held: another directory's files, the corpus itself.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    train = ["train", "--input", str(tmp_path / "raw"), "--vocab-size", "400"]
    assert tokenizer_cli.main([*train, "--output", str(tmp_path / "mine")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    for output in (tmp_path / "raw", tmp_path):
        assert tokenizer_cli.main([*train, "--output", str(output), "--overwrite"]) == 2
        assert "writing it would delete the input" in capsys.readouterr().err
    assert tokenizer_cli.main(["import", "--from", str(tmp_path / "tok"), "--output", str(tmp_path / "tok"),
                               "--overwrite"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious" and len(list((tmp_path / "raw").iterdir())) == 4
    assert tokenizer_cli.main([*train, "--output", str(tmp_path / "tok"), "--overwrite"]) == 0  # a tokenizer: replaced
    capsys.readouterr()
    assert tokenizer_cli.main([*train, "--output", str(tmp_path / "raw" / "shard_00.jsonl")]) == 2
    assert "is the input" in capsys.readouterr().err
    # Settings SentencePiece cannot use: --vocab-size 0 was blamed on the text, the others were tracebacks.
    base = ["train", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "t2")]
    for settings, words in ((["--vocab-size", "0"], "too small"),
                            (["--vocab-size", "400", "--max-sentences", "-1"], "must be positive"),
                            (["--vocab-size", "400", "--character-coverage", "nan"], "must lie in (0, 1]")):
        assert tokenizer_cli.main([*base, *settings]) == 2, settings
        assert words in capsys.readouterr().err, settings
    (tmp_path / "a_file").write_text("x")
    assert tokenizer_cli.main([*train, "--output", str(tmp_path / "a_file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert prep_cli.main(["--input", str(tmp_path / "raw" / "*.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                          "--output-prefix", str(tmp_path / "all" / "train"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "100 documents" in out and "skipped 0 records" in out
    for i, f in enumerate(files):
        assert prep_cli.main(["--input", str(f), "--tokenizer", str(tmp_path / "tok"),
                              "--output-prefix", str(tmp_path / "parts" / f"p{i}"), "--no-progress"]) == 0
    assert merge_cli.main(["--inputs", str(tmp_path / "parts" / "p*"),
                           "--output-prefix", str(tmp_path / "merged" / "train")]) == 0
    merged_out = capsys.readouterr()
    assert "merged 4 pairs" in merged_out.out
    # A bar over the bytes read (each part scanned, then copied): a merge of 100s of GB took minutes silently.
    copied = tqdm.format_sizeof(2 * sum(Path(f"{tmp_path / 'parts' / f'p{i}'}.bin").stat().st_size
                                        for i in range(4)), divisor=1024)
    assert "merging: 100%" in merged_out.err and f"{copied}/{copied}" in merged_out.err
    for suffix in (".bin", ".idx"):
        merged, once = tmp_path / "merged" / f"train{suffix}", tmp_path / "all" / f"train{suffix}"
        assert merged.read_bytes() == once.read_bytes()
    assert data_cli.main(["info", str(tmp_path / "merged" / "train")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["documents"], info["dtype"], info["vocab_size"]) == (100, "uint16", 400)


def test_errors_are_one_clear_line_and_exit_code_2(tmp_path, capsys):
    _corpus(tmp_path / "raw", files=1)
    assert prep_cli.main(["--input", str(tmp_path / "nothing.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                          "--output-prefix", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input") and "Fix:" in err and "Traceback" not in err
    assert merge_cli.main(["--inputs", str(tmp_path / "x_*"), "--output-prefix", str(tmp_path / "m")]) == 2
    assert "matched no .idx files" in capsys.readouterr().err
    assert data_cli.main(["info", str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit) as usage:  # argparse's usage error: exit 2, naming the missing option
        prep_cli.main(["--input", "x", "--tokenizer", "t", "--output-prefix", "o", "--shard-index", "1"])
    assert usage.value.code == 2 and "--num-shards" in capsys.readouterr().err


def test_slurm_array_scripts_prepare_and_merge(tmp_path):
    """Runs data_prep/*.sbatch with bash and the environment SLURM gives an array job's tasks."""
    _corpus(tmp_path / "raw", files=5)
    assert tokenizer_cli.main(["train", "--input", str(tmp_path / "raw"), "--vocab-size", "400",
                               "--output", str(tmp_path / "tok")]) == 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "INPUT": f"{tmp_path / 'raw'}/*.jsonl", "TOKENIZER": str(tmp_path / "tok"),
           "OUTPUT_DIR": str(tmp_path / "out"), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
           "SLURM_CPUS_PER_TASK": "1", "PREP_ARGS": "--no-progress", "NUM_SHARDS": "3"}
    for task in range(3):
        run = subprocess.run(["bash", str(REPO / "data_prep" / "preprocess_array.sbatch")], capture_output=True,
                             text=True, env={**env, "SLURM_ARRAY_TASK_ID": str(task)})
        assert run.returncode == 0, run.stderr
    run = subprocess.run(["bash", str(REPO / "data_prep" / "merge.sbatch")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert prep_cli.main(["--input", str(tmp_path / "raw"), "--tokenizer", str(tmp_path / "tok"),
                          "--output-prefix", str(tmp_path / "once" / "train"), "--no-progress"]) == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / "out" / f"train{suffix}").read_bytes() == (tmp_path / "once" / f"train{suffix}").read_bytes()
    assert len(list((tmp_path / "out").glob("part_*.idx"))) == 3
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert tok.decode(IndexedDataset(tmp_path / "out" / "train")[0][:-1].tolist()).startswith("Document 0")
    missing = subprocess.run(["bash", str(REPO / "data_prep" / "preprocess_array.sbatch")], capture_output=True,
                             text=True, env={k: v for k, v in env.items() if k != "INPUT"})
    assert missing.returncode != 0 and "set INPUT" in missing.stderr
    unsized_env = {**{k: v for k, v in env.items() if k != "NUM_SHARDS"}, "SLURM_ARRAY_TASK_ID": "1"}
    unsized = subprocess.run(["bash", str(REPO / "data_prep" / "preprocess_array.sbatch")], capture_output=True,
                             text=True, env=unsized_env)
    assert unsized.returncode != 0 and "export NUM_SHARDS" in unsized.stderr


def test_merge_sbatch_merges_the_current_array_run_only_and_megakv_merge_refuses_stale_parts(tmp_path):
    """merge.sbatch globbed part_*: the parts left by an earlier array run with another NUM_SHARDS were merged
    in (duplicated documents, exit 0)."""
    from data_fixtures import train_tokenizer

    from megakv.data.metadata import meta_path
    from megakv.data.preprocess import preprocess

    files = [str(f) for f in _corpus(tmp_path / "raw", files=5, per_file=6)]
    tokenizer = train_tokenizer(tmp_path / "tok")
    out = tmp_path / "out"
    for count in (5, 3):  # an earlier run of 5 tasks, then the current one of 3 into the same OUTPUT_DIR
        for i in range(count):
            preprocess(files, tokenizer, out / f"part_{i:05d}", shard=(i, count), overwrite=True, progress=False)
        if count == 5:
            for i in range(5):
                os.utime(meta_path(out / f"part_{i:05d}"), (1, 1))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OUTPUT_DIR": str(out), "MERGE_ARGS": "--no-progress"}
    unsized = subprocess.run(["bash", str(REPO / "data_prep" / "merge.sbatch")], capture_output=True, text=True,
                             env=env)
    assert unsized.returncode == 2, unsized.stdout + unsized.stderr
    assert "different --num-shards [3, 5]" in unsized.stderr and f"{out / 'part_00004'}" in unsized.stderr
    assert "Traceback" not in unsized.stderr and not (out / "train.idx").exists()
    sized = subprocess.run(["bash", str(REPO / "data_prep" / "merge.sbatch")], capture_output=True, text=True,
                           env={**env, "NUM_SHARDS": "3"})
    assert sized.returncode == 0, sized.stderr
    assert "merged 3 pairs, 30 documents" in sized.stdout


def test_tokenizer_cli_non_utf8_text_and_long_lines(tmp_path, capsys):
    """`megakv-tokenizer encode DIR $'caf\\xe9'` was a RuntimeError traceback; `train` dropped every line over
    16 KiB without a word (a corpus of such lines failed blaming the vocabulary size)."""
    import random

    rng = random.Random(0)
    words = "alpha gamma delta epsilon zeta theta kappa lambda café 日本".split()
    long_lines = [" ".join(rng.choice(words) for _ in range(3000)) for _ in range(20)]  # ~17-19 KB each, one line
    assert all(len(line.encode()) > 16384 for line in long_lines)
    write_jsonl(tmp_path / "long" / "c.jsonl", long_lines)
    assert tokenizer_cli.main(["train", "--input", str(tmp_path / "long"), "--vocab-size", "300",
                               "--output", str(tmp_path / "tok")]) == 0
    assert "20 lines over 16,384 bytes were split into pieces for training" in capsys.readouterr().out
    # Mixed with short lines, the long ones still count: their words become pieces (they were left out).
    write_jsonl(tmp_path / "mix" / "c.jsonl", [*synthetic_documents(40, seed=2), *long_lines])
    assert tokenizer_cli.main(["train", "--input", str(tmp_path / "mix"), "--vocab-size", "400",
                               "--output", str(tmp_path / "tok_mix")]) == 0
    assert "20 lines over 16,384 bytes" in capsys.readouterr().out
    sentence = " ".join(words)
    assert len(load_tokenizer(tmp_path / "tok_mix").encode(sentence)) < len(sentence) / 3
    # argv bytes that are not UTF-8 reach Python as lone surrogates (os.fsdecode)
    assert tokenizer_cli.main(["encode", str(tmp_path / "tok"), os.fsdecode(b"caf\xe9")]) == 2
    err = capsys.readouterr().err
    assert "the text argument 'caf\\udce9' is not valid UTF-8 (character 3" in err and "Traceback" not in err
    assert tokenizer_cli.main(["encode", str(tmp_path / "tok"), "café"]) == 0
    assert json.loads(capsys.readouterr().out)["decoded"] == "café"
