"""Merging pairs: identical to preprocessing everything at once; refuses to mix tokenizers."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from data_fixtures import module_tokenizer, synthetic_documents, train_tokenizer, write_jsonl

from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset
from megakv.data.merge import merge
from megakv.data.metadata import read_meta
from megakv.data.preprocess import preprocess

tokenizer_dir = pytest.fixture(scope="module")(module_tokenizer)


def _files(root: Path) -> list[str]:
    docs = synthetic_documents(90, seed=21)
    return [str(write_jsonl(root / f"part{i}.jsonl", docs[i * 30:(i + 1) * 30])) for i in range(3)]


def test_merge_equals_preprocessing_everything_at_once(tmp_path, tokenizer_dir):
    files = _files(tmp_path / "in")
    preprocess(files, tokenizer_dir, tmp_path / "once" / "all", progress=False)
    for i, f in enumerate(files):
        preprocess([f], tokenizer_dir, tmp_path / "parts" / f"part_{i:02d}", progress=False)
    meta = merge([str(tmp_path / "parts" / "part_*")], tmp_path / "merged" / "all")
    for suffix in (".bin", ".idx"):
        assert (tmp_path / "merged" / f"all{suffix}").read_bytes() == (tmp_path / "once" / f"all{suffix}").read_bytes()
    once = read_meta(tmp_path / "once" / "all")
    assert (meta["documents"], meta["tokens"], meta["max_token_id"]) == (90, once["tokens"], once["max_token_id"])
    assert meta["merged_count"] == 3 and meta["tokenizer"]["fingerprint"] == once["tokenizer"]["fingerprint"]
    assert (tmp_path / "merged" / "tokenizer" / "tokenizer.model").exists()  # the tokenizer travels along
    assert len(IndexedDataset(tmp_path / "merged" / "all")) == 90


def test_merge_refuses_pairs_from_different_tokenizers(tmp_path, tokenizer_dir):
    files = _files(tmp_path / "in")
    preprocess(files[:1], tokenizer_dir, tmp_path / "a" / "x", progress=False)
    other = train_tokenizer(tmp_path / "other_tok", synthetic_documents(100, seed=5), vocab_size=350)
    preprocess(files[1:2], other, tmp_path / "b" / "y", progress=False)
    with pytest.raises(DataError, match="different tokenizers"):
        merge([str(tmp_path / "a" / "x"), str(tmp_path / "b" / "y")], tmp_path / "m" / "out")
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_merge_refuses_to_overwrite_and_to_read_its_output(tmp_path, tokenizer_dir):
    files = _files(tmp_path / "in")
    preprocess(files[:1], tokenizer_dir, tmp_path / "d" / "a", progress=False)
    preprocess(files[1:2], tokenizer_dir, tmp_path / "d" / "b", progress=False)
    merge([str(tmp_path / "d" / "a"), str(tmp_path / "d" / "b")], tmp_path / "d" / "ab")
    with pytest.raises(DataError, match="already exists"):
        merge([str(tmp_path / "d" / "a")], tmp_path / "d" / "ab")
    with pytest.raises(DataError, match="also an input"):
        merge([str(tmp_path / "d" / "a"), str(tmp_path / "d" / "ab")], tmp_path / "d" / "ab", overwrite=True)
    with pytest.raises(DataError, match="matched no .idx"):
        merge([str(tmp_path / "none_*")], tmp_path / "d" / "zz")
    merge([str(tmp_path / "d" / "b.idx"), str(tmp_path / "d" / "a.bin")], tmp_path / "d" / "ab", overwrite=True)
    ab = IndexedDataset(tmp_path / "d" / "ab")
    b = IndexedDataset(tmp_path / "d" / "b")
    assert ab[0].tolist() == b[0].tolist()  # the given order, b first


def _qa_parts(tmp_path: Path, tokenizer_dir) -> tuple[list[dict], list[str]]:
    """Six QA records prepared as two parts of three (qa_0, qa_1 under tmp_path/parts)."""
    from megakv.data.sft import prepare_sft

    records = [{"context": f"Speaker {i} said the line number {i} here.", "question": f"Who said line {i}?",
                "answer": f"Speaker {i}"} for i in range(6)]
    parts = []
    for p in range(2):
        path = tmp_path / f"qa{p}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records[p * 3:(p + 1) * 3]))
        parts.append(prepare_sft(path, tokenizer_dir, tmp_path / "parts" / f"qa_{p}", 96).prefix)
    return records, parts

def test_merging_qa_samples_merges_their_loss_masks_and_refuses_a_mix(tmp_path, tokenizer_dir):
    from megakv.data.sft import MaskedTokens, mask_prefix

    _, parts = _qa_parts(tmp_path, tokenizer_dir)
    meta = merge(parts, tmp_path / "merged" / "qa")
    out = tmp_path / "merged" / "qa"
    merged = MaskedTokens(IndexedDataset(out), IndexedDataset(mask_prefix(out)))
    expected = [MaskedTokens(IndexedDataset(p), IndexedDataset(mask_prefix(p))).get(i) for p in parts for i in range(3)]
    assert [merged.get(i).tolist() for i in range(6)] == [e.tolist() for e in expected]  # masks kept per sample
    assert meta["sft"]["seq_len"] == 96 and sum(meta["sft"]["orders"].values()) == 6
    assert read_meta(tmp_path / "merged" / "qa")["sft"]["answer_tokens"] == sum(
        read_meta(p)["sft"]["answer_tokens"] for p in parts)
    plain = tmp_path / "plain" / "docs"
    preprocess(_files(tmp_path / "in")[:1], tokenizer_dir, plain, progress=False)
    with pytest.raises(DataError, match="loss mask"):
        merge([parts[0], str(plain)], tmp_path / "mixed" / "qa")
    from megakv.cli.merge import main as merge_main

    assert merge_main(["--inputs", str(parts[0]), str(plain), "--output-prefix", str(tmp_path / "cli" / "qa")]) == 2
    assert merge_main(["--inputs", *map(str, parts), "--output-prefix", str(tmp_path / "cli" / "qa")]) == 0
    assert (tmp_path / "cli" / "qa_lossmask.idx").exists()
    # Overwriting a QA output with plain data removes its old mask, which would otherwise be applied.
    merge([str(plain)], tmp_path / "merged" / "qa", overwrite=True)
    assert not (tmp_path / "merged" / "qa_lossmask.idx").exists()


def test_qa_parts_merge_by_glob_and_a_crash_mid_commit_never_pairs_new_mask_with_old_tokens(tmp_path, tokenizer_dir,
                                                                                          monkeypatch):
    import megakv.data.indexed as indexed
    from megakv.data.sft import MaskedTokens, mask_prefix, prepare_sft

    records, parts = _qa_parts(tmp_path, tokenizer_dir)
    # `part_*` also matches the parts' qa_*_lossmask pairs: they travel with their token pairs, not as inputs.
    meta = merge([str(tmp_path / "parts" / "qa_*")], tmp_path / "merged" / "qa")
    assert meta["merged_from"] == parts and meta["documents"] == 6

    # Overwrite the first part with other records, the disk filling up as the token pair's index is written:
    # the old part must stay whole (old tokens, old mask), never old tokens beside the new mask.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "answer": "a much longer answer than before " + r["answer"]}) + "\n"
                             for r in records[:3]))
    before = {path.name: path.read_bytes() for path in (tmp_path / "parts").glob("qa_0*") if path.is_file()}

    def full_disk_for_the_token_index(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(tmp_path / "parts" / "qa_0.idx")) and "w" in mode:
            raise OSError(28, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(indexed, "open", full_disk_for_the_token_index, raising=False)
    with pytest.raises(DataError, match="writing the output .*qa_0 .*failed: No space left on device"):
        prepare_sft(other, tokenizer_dir, tmp_path / "parts" / "qa_0", 96, overwrite=True)
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in (tmp_path / "parts").glob("qa_0*") if path.is_file()} == before
    prepare_sft(other, tokenizer_dir, tmp_path / "parts" / "qa_0", 96, overwrite=True)
    fresh = MaskedTokens(IndexedDataset(parts[0]), IndexedDataset(mask_prefix(parts[0])))
    assert read_meta(parts[0])["sft"]["answer_tokens"] == sum(int((fresh.get(i) >= 0).sum()) for i in range(3))
    # megakv-prep --overwrite of a QA prefix with plain text removes the QA mask, which would otherwise apply.
    preprocess(_files(tmp_path / "in")[:1], tokenizer_dir, parts[0], overwrite=True, progress=False)
    assert not mask_prefix(parts[0]).with_name(mask_prefix(parts[0]).name + ".idx").exists()


def test_pairs_without_metadata_merge_and_describe(tmp_path, tokenizer_dir):
    """Megatron-made pairs have no .meta.json: their merge records null tokenizer and vocabulary, which
    `megakv-data info` and a second merge read without a traceback."""
    from megakv.cli.data import main as data_main

    files = _files(tmp_path / "in")
    for i, f in enumerate(files[:2]):
        preprocess([f], tokenizer_dir, tmp_path / "meg" / f"m{i}", progress=False)
        (tmp_path / "meg" / f"m{i}.meta.json").unlink()
    shutil.rmtree(tmp_path / "meg" / "tokenizer")
    meta = merge([str(tmp_path / "meg" / "m0"), str(tmp_path / "meg" / "m1")], tmp_path / "meg" / "merged")
    assert meta["tokenizer"] is None and meta["vocab_size"] is None
    assert data_main(["info", str(tmp_path / "meg" / "merged")]) == 0
    again = merge([str(tmp_path / "meg" / "merged"), str(tmp_path / "meg" / "m0")], tmp_path / "meg" / "twice")
    assert again["documents"] == 90


def test_merging_pairs_without_documents_is_an_error(tmp_path):
    """megakv-prep refuses an output without documents; a merge of empty pairs wrote one and exited 0."""
    import numpy as np

    from megakv.data.indexed import IndexedWriter

    with IndexedWriter(tmp_path / "empty", np.uint16) as writer:
        writer.finalize()
    with pytest.raises(DataError, match="hold no documents"):
        merge([str(tmp_path / "empty")], tmp_path / "merged")
    assert not (tmp_path / "merged.idx").exists()


def test_merge_refuses_parts_that_are_not_the_shares_of_one_array_run(tmp_path, tokenizer_dir):
    """A glob `part_*` merged the stale parts of an earlier array run with another NUM_SHARDS (their metadata
    records `shard: [i, n]`) into the current run's: documents duplicated or mixed, exit 0."""
    import os

    from megakv.data.metadata import meta_path

    files = _files(tmp_path / "in")
    out = tmp_path / "prepared"

    def array_run(count: int) -> list:
        return [preprocess(files, tokenizer_dir, out / f"part_{i:05d}", shard=(i, count), overwrite=True,
                           progress=False) for i in range(count)]

    array_run(5)  # an earlier run ...
    for i in range(5):
        os.utime(meta_path(out / f"part_{i:05d}"), (1, 1))  # ... long ago
    current = array_run(3)  # the current run, into the same directory
    assert current[0].already_done  # part_00000 holds the same file in both runs: its record is relabelled
    assert read_meta(out / "part_00000")["shard"] == [0, 3]
    with pytest.raises(DataError, match=r"different --num-shards \[3, 5\]: 2 part\(s\) .*newest run's 3 "
                                        r"\(.*part_00003, .*part_00004\)\. Fix: delete the stale parts") as refused:
        merge([str(out / "part_*")], tmp_path / "m" / "all")
    assert "part_00000" not in str(refused.value) and not (tmp_path / "m" / "all.idx").exists()
    shares = [str(out / f"part_{i:05d}") for i in range(3)]
    assert merge(shares, tmp_path / "m" / "all")["merged_count"] == 3
    preprocess(files, tokenizer_dir, tmp_path / "once" / "all", progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / "m" / f"all{suffix}").read_bytes() == (tmp_path / "once" / f"all{suffix}").read_bytes()
    with pytest.raises(DataError, match=r"record shares 0, 2 of an array run of 3: missing 1\. Fix: run the missing "
                                        r"array tasks \(NUM_SHARDS=3 sbatch --array=1 "):
        merge([shares[0], shares[2]], tmp_path / "m2" / "all")
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{shares[1]}{suffix}", f"{shares[1]}_copy{suffix}")
    with pytest.raises(DataError, match=r"prepared more than once: .*part_00001 and .*part_00001_copy"):
        merge([*shares, f"{shares[1]}_copy"], tmp_path / "m2" / "all")
    # Complete runs in two directories are two runs, not one with shares twice.
    shutil.copytree(out, tmp_path / "other")
    assert merge([*shares, *(str(tmp_path / "other" / f"part_{i:05d}") for i in range(3))],
                 tmp_path / "m3" / "all")["merged_count"] == 6


@pytest.mark.parametrize("holder", ["megakv-merge", "megakv-qa prep"])
def test_a_second_writer_of_an_output_is_refused_naming_the_holder(tmp_path, tokenizer_dir, capsys, holder):
    """Two `megakv-merge --output-prefix pm/all` with different inputs both exited 0, and one's "merged 400
    documents" was false (pm/all held the other's); megakv-qa prep had no lock either. Both now take the
    lock megakv-prep takes, and refuse while another job holds it (exit 2, naming the holder)."""
    from megakv.cli.merge import main as merge_main
    from megakv.cli.qa import main as qa_main
    from megakv.data.indexed import pair_exists
    from megakv.data.output_lock import output_lock

    _, parts = _qa_parts(tmp_path, tokenizer_dir)
    out = tmp_path / "out" / "all"
    merge_argv = ["--inputs", *map(str, parts), "--output-prefix", str(out), "--no-progress"]
    qa_argv = ["prep", "--input", str(tmp_path / "qa0.jsonl"), "--tokenizer", str(tokenizer_dir), "--output-prefix",
               str(out), "--seq-len", "96"]
    held = (f"another {holder} is writing {out} (pid {os.getpid()} on {socket.gethostname()}, which holds "
            f"{out}.tmp-lock)")
    with output_lock(out, holder):
        assert merge_main(merge_argv) == 2
        fix = "Fix: wait for it to finish, or choose another --output-prefix"
        assert capsys.readouterr().err == f"error: {held}. {fix}\n"
        assert qa_main(qa_argv) == 2
        assert held in capsys.readouterr().err
        assert not pair_exists(out)
    assert merge_main(merge_argv) == 0  # once the holder is done
    assert qa_main([*qa_argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.parent.iterdir() if "tmp" in p.name) == []
