"""GPT samples, document split, blending, the global order, resume, fingerprint and cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import synthetic_documents, train_tokenizer, write_jsonl

from megakv.config.data import DataConfig
from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset
from megakv.data.loader import build_data, micro_batches, valid_batches
from megakv.data.preprocess import preprocess
from megakv.data.samples import split_documents

SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """root/data/{a,b,c}: three datasets (different sizes) made with one tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    tokenizer = train_tokenizer(root / "tok")
    for name, count, seed in (("a", 120, 1), ("b", 60, 2), ("c", 40, 3)):
        jsonl = write_jsonl(root / "raw" / f"{name}.jsonl", synthetic_documents(count, seed=seed))
        preprocess([str(jsonl)], tokenizer, root / "data" / name, progress=False)
    return root


def cfg_for(root: Path, tmp_path: Path, names=("a",), **kwargs) -> DataConfig:
    return DataConfig(datasets=[str(root / "data" / n) for n in names], cache_dir=str(tmp_path / "cache"), **kwargs)


def concat_tokens(ds: IndexedDataset, docs) -> np.ndarray:
    return np.concatenate([ds[int(d)] for d in docs]).astype(np.int64)


def test_samples_are_windows_of_the_concatenated_documents(corpus, tmp_path):
    data = build_data(cfg_for(corpus, tmp_path, valid_fraction=0.1), SEQ, is_builder=True)
    part = data.train.parts[0]
    source = IndexedDataset(corpus / "data" / "a")
    for epoch in (0, 1):
        order = part.epoch(epoch)
        stream = concat_tokens(source, order.docs)
        assert sorted(order.order.tolist()) == list(range(len(part)))  # each sample once per epoch
        assert len(part) == (len(stream) - 1) // SEQ
        for position in (0, 1, len(part) - 1):
            sample = part[epoch * len(part) + position]
            start = int(order.order[position]) * SEQ
            assert sample.dtype == np.int64 and sample.shape == (SEQ + 1,)
            assert np.array_equal(sample, stream[start:start + SEQ + 1])
    assert not np.array_equal(part.epoch(0).docs, part.epoch(1).docs)  # reshuffled per epoch
    assert not np.array_equal(part.epoch(0).order[:20], part.epoch(1).order[:20])
    assert (data.vocab_size, data.eos_id, data.bos_id, data.pad_id) == (400, 2, 1, 3)
    assert data.tokenizer_dir == corpus / "data" / "tokenizer"


def test_split_is_by_whole_documents_and_stable():
    train, valid = split_documents(1000, 0.05, 7, 99)
    assert len(valid) == 50 and len(np.intersect1d(train, valid)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, valid])), np.arange(1000))
    assert np.array_equal(valid, split_documents(1000, 0.05, 7, 99)[1])
    assert not np.array_equal(valid, split_documents(1000, 0.05, 8, 99)[1])
    assert len(split_documents(10, 0.01, 7, 99)[1]) == 1  # at least one document held out
    assert len(split_documents(10, 0.0, 7, 99)[1]) == 0


def test_validation_documents_never_appear_in_training(corpus, tmp_path):
    data = build_data(cfg_for(corpus, tmp_path, valid_fraction=0.2), SEQ, is_builder=True)
    train_docs = set(data.train.parts[0].epoch(0).docs.tolist())
    valid_docs = set(data.valid_sets["a"].epoch(0).docs.tolist())
    assert not train_docs & valid_docs and len(train_docs | valid_docs) == 120 and len(valid_docs) == 24
    batches = list(valid_batches(data.valid, 4, max_batches=3))
    assert len(batches) == 3 and batches[0][0].shape == (4, SEQ)
    again = list(valid_batches(data.valid, 4, max_batches=3))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(batches, again))  # fixed order
    halves = [list(valid_batches(data.valid, 4, 3, dp_rank=r, dp_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([halves[0][1][0], halves[1][1][0]]), batches[1][0])
    with pytest.raises(DataError, match="fewer than one batch"):
        list(valid_batches(data.valid, 10_000))


def _step_samples(ds, step, batch, dp_size, micro):
    inputs, labels = [], []
    for rank in range(dp_size):
        for x, y in micro_batches(ds, step * batch, batch, micro, rank, dp_size):
            inputs.append(x)
            labels.append(y)
    return torch.cat(inputs), torch.cat(labels)


def test_samples_of_a_step_do_not_depend_on_the_number_of_ranks(corpus, tmp_path):
    data = build_data(cfg_for(corpus, tmp_path, names=("a", "b"), weights=[2.0, 1.0]), SEQ, is_builder=True)
    for step in (0, 3, 57):
        x1, y1 = _step_samples(data.train, step, 8, 1, 8)
        x2, y2 = _step_samples(data.train, step, 8, 2, 2)
        x4, y4 = _step_samples(data.train, step, 8, 4, 1)
        assert torch.equal(x1, x2) and torch.equal(x1, x4) and torch.equal(y1, y4)
        assert torch.equal(x1[:, 1:], y1[:, :-1])  # labels are the inputs shifted by one
    batches = micro_batches(data.train, 16, 8, 2, 1, 2)
    assert len(batches) == 2 and batches[0][0].shape == (2, SEQ) and batches[0][0].dtype == torch.int64
    with pytest.raises(DataError, match="not a multiple"):
        micro_batches(data.train, 0, 10, 4, 0, 2)


def test_resuming_at_any_consumed_count_continues_exactly(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path, names=("a", "c"))
    first = build_data(cfg, SEQ, is_builder=True)
    stream = [first.train[g] for g in range(3 * len(first.train) + 5)]  # crosses epochs
    assert first.check_resume(first.resume_state(123)) == 123
    for consumed in (0, 7, len(first.train) - 1, len(first.train), 2 * len(first.train) + 3):
        resumed = build_data(cfg, SEQ, is_builder=True)  # a new process would do exactly this
        consumed = resumed.check_resume(first.resume_state(consumed))
        for g in range(consumed, consumed + 3):
            assert np.array_equal(resumed.train[g], stream[g])


def test_the_order_covers_every_sample_each_epoch_for_a_single_dataset(corpus, tmp_path):
    data = build_data(cfg_for(corpus, tmp_path, names=("b",)), SEQ, is_builder=True)
    n = len(data.train)
    for epoch in range(3):
        ids = [data.train.parts[0].locate(g)[1] for g in range(epoch * n, (epoch + 1) * n)]
        assert sorted(ids) == list(range(n))


def test_blending_respects_the_weights(corpus, tmp_path):
    data = build_data(cfg_for(corpus, tmp_path, names=("a", "b", "c"), weights=[0.5, 0.3, 0.2]), SEQ,
                      is_builder=True)
    sources = np.array([data.train.locate(g)[0] for g in range(20_000)])
    shares = np.bincount(sources, minlength=3) / len(sources)
    assert np.allclose(shares, [0.5, 0.3, 0.2], atol=2e-4)
    for window in (sources[:100], sources[5000:5100]):  # evenly spread, not in runs
        assert np.allclose(np.bincount(window, minlength=3) / 100, [0.5, 0.3, 0.2], atol=0.02)
    counts = data.train.counts
    block = sum(counts)
    full = np.array([data.train.locate(g)[0] for g in range(2 * block)])
    assert np.bincount(full[:block]).tolist() == counts  # exact per block
    within = [data.train.locate(g)[1] for g in range(block) if full[g] == 2]
    assert within == list(range(counts[2]))  # each part consumed in its own order, nothing skipped
    natural = build_data(cfg_for(corpus, tmp_path, names=("a", "b")), SEQ, is_builder=True)
    sizes = np.array([len(p) for p in natural.train.parts], float)
    got = np.bincount([natural.train.locate(g)[0] for g in range(10_000)]) / 10_000
    assert np.allclose(got, sizes / sizes.sum(), atol=1e-3)  # weights null: proportional to size


def test_fingerprint_identifies_data_order_and_split(corpus, tmp_path):
    base = cfg_for(corpus, tmp_path, names=("a", "b"))
    fp = build_data(base, SEQ, is_builder=True).fingerprint
    assert build_data(base, SEQ, is_builder=True).fingerprint == fp
    changed = {
        "seed": cfg_for(corpus, tmp_path, names=("a", "b"), seed=1),
        "split": cfg_for(corpus, tmp_path, names=("a", "b"), valid_fraction=0.2),
        "weights": cfg_for(corpus, tmp_path, names=("a", "b"), weights=[1.0, 1.0]),
        "data": cfg_for(corpus, tmp_path, names=("a", "c")),
    }
    fingerprints = {name: build_data(c, SEQ, is_builder=True).fingerprint for name, c in changed.items()}
    fingerprints["seq_len"] = build_data(base, SEQ * 2, is_builder=True).fingerprint
    assert fp not in fingerprints.values() and len(set(fingerprints.values())) == 5
    other = build_data(changed["seed"], SEQ, is_builder=True)
    with pytest.raises(DataError, match="fingerprint"):
        other.check_resume({"consumed_samples": 10, "data_fingerprint": fp})


def test_the_cache_is_hash_named_built_once_and_reused(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path, names=("a", "b"), valid_fraction=0.1)
    built = build_data(cfg, SEQ, is_builder=True, train_samples=5000)
    assert built.built_cache_entries > 2
    names = sorted(p.name for p in Path(cfg.cache_dir).iterdir())
    assert all(len(n.split("-")[0].split(".")[0]) == 24 for n in names) and not any(".tmp" in n for n in names)
    again = build_data(cfg, SEQ, is_builder=True, train_samples=5000)
    assert again.built_cache_entries == 0
    reader = build_data(cfg, SEQ, is_builder=False)
    assert reader.built_cache_entries == 0
    for g in (0, 999, 4999, 100_000):  # beyond the prebuilt epochs: computed on demand, identically
        assert np.array_equal(reader.train[g], built.train[g])


def test_a_damaged_cache_entry_is_named_not_trained_on(corpus, tmp_path):
    """A crash can leave a renamed cache file zero-filled (its .npy header intact): training read the wrong
    samples and exited 0 (filesystem audit: step-1 loss 5.7820 vs 5.7737). Each array's sha256 is recorded
    when built and checked at every load; a truncated file is named too, not a numpy traceback."""
    cfg = cfg_for(corpus, tmp_path, names=("a", "b"))
    build_data(cfg, SEQ, is_builder=True, train_samples=50)
    split_file = sorted(Path(cfg.cache_dir).glob("*-train.npy"))[0]  # a split's documents, read at every start
    header_size = len(split_file.read_bytes()) - np.load(split_file).nbytes
    damaged = split_file.read_bytes()[:header_size] + bytes(np.load(split_file).nbytes)
    split_file.write_bytes(damaged)
    with pytest.raises(DataError, match="does not match the checksum") as info:
        build_data(cfg, SEQ, is_builder=True)  # the builder checks (one process per node), the others trust it
    assert str(split_file) in str(info.value) and "the next launch builds the entry again" in info.value.fix
    split_file.write_bytes(damaged[:header_size + 8])
    with pytest.raises(DataError, match="cannot read the index cache entry"):
        build_data(cfg, SEQ, is_builder=False)


def test_a_non_builder_without_a_barrier_waits_then_gives_up_clearly(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path)
    with pytest.raises(DataError, match="waiting for 1 index cache entries"):
        build_data(cfg, SEQ, is_builder=False, wait_timeout_s=0.3)


def test_explicit_validation_datasets(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path, names=("a",), valid_fraction=0.0,
                  valid_datasets=[str(corpus / "data" / "b"), str(corpus / "data" / "c")])
    data = build_data(cfg, SEQ, is_builder=True)
    assert sorted(data.valid_sets) == ["b", "c"]
    assert len(data.valid) == len(data.valid_sets["b"]) + len(data.valid_sets["c"])
    seen = sorted((data.valid.locate(g)) for g in range(len(data.valid)))
    assert seen == sorted([(0, i) for i in range(len(data.valid_sets["b"]))]
                          + [(1, i) for i in range(len(data.valid_sets["c"]))])
    with pytest.raises(IndexError):
        data.valid[len(data.valid)]


def test_problems_are_reported_before_training(corpus, tmp_path):
    with pytest.raises(DataError, match="fewer than seq_len"):
        build_data(cfg_for(corpus, tmp_path, names=("c",)), 100_000, is_builder=True)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    shutil.copytree(corpus / "data" / "tokenizer", damaged / "tokenizer")
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(corpus / "data" / f"a{suffix}", damaged / f"a{suffix}")
    with open(damaged / "a.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="truncated"):
        build_data(DataConfig(datasets=[str(damaged / "a")]), SEQ, is_builder=True)
    with pytest.raises(DataError, match="tokenizer directory .* not found"):
        build_data(DataConfig(datasets=[str(corpus / "raw" / "a")]), SEQ, is_builder=True)


def test_data_from_another_tokenizer_or_outside_the_vocab_is_refused(corpus, tmp_path):
    other = train_tokenizer(tmp_path / "other", synthetic_documents(100, seed=8), vocab_size=350)
    with pytest.raises(DataError, match="another tokenizer"):
        build_data(cfg_for(corpus, tmp_path, tokenizer=str(other)), SEQ, is_builder=True)
    # A Megatron-style pair without metadata whose ids exceed the tokenizer's vocabulary.
    from megakv.data.indexed import IndexedWriter

    with IndexedWriter(tmp_path / "foreign", np.uint16) as w:
        w.add_document(np.array([5, 6, 7, 399, 2] * 20))
        w.add_document(np.array([5, 1000, 2] * 20))
        w.finalize()
    tokenizer = str(corpus / "data" / "tokenizer")
    with pytest.raises(DataError, match="token id 1000, outside the vocabulary of 400"):
        build_data(DataConfig(datasets=[str(tmp_path / "foreign")], tokenizer=tokenizer,
                              cache_dir=str(tmp_path / "c")), 8, is_builder=True)
    with IndexedWriter(tmp_path / "foreign_ok", np.uint16) as w:  # within the vocabulary: loads fine
        w.add_document(np.array([5, 6, 7, 399, 2] * 20))
        w.finalize()
    data = build_data(DataConfig(datasets=[str(tmp_path / "foreign_ok")], tokenizer=tokenizer,
                                 cache_dir=str(tmp_path / "c")), 8, is_builder=True)
    assert len(data.train) == (100 - 1) // 8
    assert set(data.train[0].tolist()) <= {5, 6, 7, 399, 2} and data.train[0].shape == (9,)


def test_data_model_vocab_check(corpus, tmp_path):
    data = build_data(cfg_for(corpus, tmp_path), SEQ, is_builder=True)
    data.check_model_vocab(400)
    with pytest.raises(DataError, match="model.vocab_size >= 400"):
        data.check_model_vocab(399)
