"""The MMIDIDX `.bin/.idx` format: round trips, byte-level compatibility, and damaged pairs."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import run_with_file_size_limit

from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset, IndexedWriter, optimal_dtype, pair_exists

# --- an independent minimal reader/writer, written from the format description only -----------------
# .idx: b"MMIDIDX\x00\x00", <Q version=1>, <B dtype code>, <Q sequence count>, <Q document count>,
#       int32 lengths[N], int64 byte pointers[N], int64 document indices[D] (0 ... N); .bin: tokens.
SPEC_CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def spec_read(prefix: Path) -> tuple[str, list[list[int]], list[int]]:
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, d = struct.unpack("<QBQQ", raw[9:34])
    assert version == 1
    pos = 34
    lengths = struct.unpack(f"<{n}i", raw[pos:pos + 4 * n])
    pos += 4 * n
    pointers = struct.unpack(f"<{n}q", raw[pos:pos + 8 * n])
    pos += 8 * n
    doc_indices = list(struct.unpack(f"<{d}q", raw[pos:pos + 8 * d]))
    assert pos + 8 * d == len(raw)
    data = Path(f"{prefix}.bin").read_bytes()
    dtype = np.dtype(SPEC_CODES[code])
    seqs = [np.frombuffer(data, dtype, length, pointer).tolist() for length, pointer in zip(lengths, pointers)]
    return SPEC_CODES[code], seqs, doc_indices


def spec_write(prefix: Path, seqs: list[list[int]], code: int) -> None:
    dtype = np.dtype(SPEC_CODES[code])
    lengths, pointers, offset, data = [], [], 0, b""
    for s in seqs:
        lengths.append(len(s))
        pointers.append(offset)
        chunk = np.asarray(s, dtype).tobytes()
        data += chunk
        offset += len(chunk)
    docs = list(range(len(seqs) + 1))
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(seqs), len(docs))
    body = struct.pack(f"<{len(seqs)}i", *lengths) + struct.pack(f"<{len(seqs)}q", *pointers)
    Path(f"{prefix}.idx").write_bytes(header + body + struct.pack(f"<{len(docs)}q", *docs))
    Path(f"{prefix}.bin").write_bytes(data)


def random_docs(rng, count, high, max_len=50):
    return [rng.integers(0, high, size=rng.integers(0 if i % 7 == 3 else 1, max_len)).tolist()
            for i in range(count)]


@pytest.mark.parametrize("vocab,dtype,code", [(200, np.uint8, 1), (8000, np.uint16, 8), (65536, np.uint16, 8),
                                              (65537, np.int32, 4), (200_000, np.int32, 4)])
def test_writer_output_reads_with_the_spec_reader(tmp_path, vocab, dtype, code):
    assert optimal_dtype(vocab) == np.dtype(dtype)
    docs = random_docs(np.random.default_rng(vocab), 60, vocab)
    prefix = tmp_path / "d"
    with IndexedWriter(prefix, optimal_dtype(vocab)) as w:
        w.add_documents(np.concatenate([np.asarray(d, np.int64) for d in docs[:20]]), [len(d) for d in docs[:20]])
        for d in docs[20:]:
            w.add_document(np.asarray(d))
        w.finalize()
    codes, seqs, doc_indices = spec_read(prefix)
    assert codes == SPEC_CODES[code]
    assert seqs == docs
    assert doc_indices == list(range(len(docs) + 1))


@pytest.mark.parametrize("code", [1, 3, 4, 5, 8])
def test_spec_writer_output_reads_with_our_reader(tmp_path, code):
    high = 100 if code == 1 else 30000
    docs = random_docs(np.random.default_rng(code), 40, high)
    spec_write(tmp_path / "s", docs, code)
    ds = IndexedDataset(tmp_path / "s")
    assert ds.dtype == np.dtype(SPEC_CODES[code]) and len(ds) == 40 and ds.num_documents == 40
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert ds.num_tokens == sum(map(len, docs))
    assert ds.max_token_id() == max(max(d) for d in docs if d)
    i = next(i for i, d in enumerate(docs) if len(d) > 10)
    assert ds.get(i, 3, 4).tolist() == docs[i][3:7]


def test_empty_dataset_round_trip(tmp_path):
    with IndexedWriter(tmp_path / "e", np.uint16) as w:
        w.finalize()
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.max_token_id() == -1
    assert spec_read(tmp_path / "e")[1:] == ([], [0])


def test_add_index_streams_pairs_into_one(tmp_path):
    rng = np.random.default_rng(0)
    parts = [random_docs(rng, n, 5000) for n in (5, 0, 12)]
    for i, docs in enumerate(parts):
        spec_write(tmp_path / f"p{i}", docs, 8)
    with IndexedWriter(tmp_path / "all", np.uint16) as w:
        for i in range(3):
            w.add_index(IndexedDataset(tmp_path / f"p{i}"))
        w.finalize()
    assert spec_read(tmp_path / "all")[1] == parts[0] + parts[1] + parts[2]


def test_an_exception_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError), IndexedWriter(tmp_path / "x", np.uint16) as w:
        w.add_document(np.arange(10))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_the_idx_lands_last(tmp_path):
    seen = {}
    with IndexedWriter(tmp_path / "x", np.uint16) as w:
        w.add_document(np.arange(10))
        w.finalize(before_commit=lambda: seen.update(bin=Path(f"{tmp_path}/x.bin").exists(),
                                                     complete=pair_exists(tmp_path / "x")))
    assert seen == {"bin": True, "complete": False}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]


def _pair(tmp_path, name, docs):
    spec_write(tmp_path / name, docs, 8)
    return tmp_path / name


@pytest.mark.parametrize("damage,message", [
    ("truncate_bin", "truncated or the two files come from different"),
    ("truncate_idx", "truncated or corrupt"),
    ("swap_bin", "truncated or the two files come from different"),
    ("bad_magic", "not an MMIDIDX index"),
    ("bad_version", "index version 2"),
    ("missing_bin", "not found"),
    ("tiny_idx", "truncated"),
])
def test_damaged_pairs_are_refused_with_a_clear_error(tmp_path, damage, message):
    prefix = _pair(tmp_path, "a", [[1, 2, 3], [4, 5, 6, 7]])
    other = _pair(tmp_path, "b", [[1, 2], [3]])
    idx, binf = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if damage == "truncate_bin":
        binf.write_bytes(binf.read_bytes()[:-2])
    elif damage == "truncate_idx":
        idx.write_bytes(idx.read_bytes()[:-8])
    elif damage == "swap_bin":
        binf.write_bytes(Path(f"{other}.bin").read_bytes())
    elif damage == "bad_magic":
        idx.write_bytes(b"NOTMAGIC!" + idx.read_bytes()[9:])
    elif damage == "bad_version":
        raw = idx.read_bytes()
        idx.write_bytes(raw[:9] + struct.pack("<Q", 2) + raw[17:])
    elif damage == "missing_bin":
        binf.unlink()
    elif damage == "tiny_idx":
        idx.write_bytes(idx.read_bytes()[:20])
    with pytest.raises(DataError, match=message) as info:
        IndexedDataset(prefix)
    assert "Fix:" in str(info.value)


def test_megatron_sequence_modes_are_tolerated(tmp_path):
    prefix = _pair(tmp_path, "m", [[1, 2, 3], [4]])
    idx = Path(f"{prefix}.idx")
    idx.write_bytes(idx.read_bytes() + bytes(2))  # int8 modes of 2 sequences (multimodal Megatron data)
    assert [IndexedDataset(prefix)[i].tolist() for i in range(2)] == [[1, 2, 3], [4]]


HEADER_SIZE = struct.calcsize("<9sQBQQ")


def _crafted(tmp_path, damage):
    """A pair whose first and last entries are intact (what the checks used to read) but whose middle is not."""
    prefix = _pair(tmp_path, "c", [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]])
    index = np.memmap(f"{prefix}.idx", np.uint8, mode="r+")
    lengths = np.frombuffer(index, np.int32, 4, HEADER_SIZE)
    pointers = np.frombuffer(index, np.int64, 4, HEADER_SIZE + 16)
    documents = np.frombuffer(index, np.int64, 5, HEADER_SIZE + 48)
    if damage == "huge_lengths":  # training tried to allocate 98.7 GiB for such an index
        lengths[:-1] = 2**31 - 1
    elif damage == "far_pointer":  # a traceback mid-training
        pointers[2] = 2**40
    elif damage == "negative_length":
        lengths[1], lengths[2] = -2, 8  # the total still matches the .bin
    elif damage == "documents_backwards":
        documents[1:4] = [3, 1, 2]
    index.flush()
    return prefix


@pytest.mark.parametrize("damage,message", [
    ("huge_lengths", "sequence 1 starts at byte 6, but the sequences before it end at byte 4294967294"),
    ("far_pointer", "sequence 2 starts at byte 1099511627776, but the sequences before it end at byte 10"),
    ("negative_length", "sequence 1 has length -2"),
    ("documents_backwards", r"document 2 starts at sequence 1, before document 1 \(3\)"),
])
def test_a_crafted_index_with_intact_ends_is_refused_as_damaged(tmp_path, damage, message):
    """Only the first and last entries were checked: a crafted .idx made training allocate 98.7 GiB or fail
    mid-run. Every entry is checked on open now, naming the file."""
    prefix = _crafted(tmp_path, damage)
    with pytest.raises(DataError, match=f"{prefix}.idx is damaged: {message}") as info:
        IndexedDataset(prefix)
    assert "Fix: re-run megakv-prep" in str(info.value)


def test_the_full_index_check_runs_chunk_by_chunk(tmp_path, monkeypatch):
    """A fault in the second chunk and at a chunk's border is found (chunks small here, 2**20 in use)."""
    import megakv.data.indexed as indexed

    monkeypatch.setattr(indexed, "INDEX_CHUNK", 3)
    docs = [[i] * (1 + i % 3) for i in range(10)]
    prefix = _pair(tmp_path, "k", docs)
    assert [IndexedDataset(prefix)[i].tolist() for i in range(10)] == docs
    index = np.memmap(f"{prefix}.idx", np.uint8, mode="r+")
    pointers = np.frombuffer(index, np.int64, 10, HEADER_SIZE + 40)
    pointers[6] += 2  # first entry of the third chunk
    index.flush()
    with pytest.raises(DataError, match="sequence 6 starts at byte"):
        IndexedDataset(prefix)


def test_a_full_disk_removes_every_temporary_and_names_the_output(tmp_path):
    """abort() closed the files first; the close flushed, failed again on the full disk, and the temporaries
    (20 MB in the audit) were never removed, keeping the disk full; the error was a bare "[Errno 28]"."""
    done = run_with_file_size_limit(64 << 10, """
import numpy as np
from megakv.data.errors import DataError
from megakv.data.indexed import IndexedWriter
try:
    with IndexedWriter(sys.argv[1], np.uint16) as w:
        for _ in range(2000):
            w.add_document(np.arange(100))  # small writes: the failing bytes stay in the write buffer
except DataError as e:
    print(e)
""", str(tmp_path / "out" / "d"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"writing the output {tmp_path / 'out' / 'd'} (.bin/.idx) failed: File too large" in done.stdout
    assert "Fix: the file size limit was reached: raise it (ulimit -f)" in done.stdout
    assert list((tmp_path / "out").iterdir()) == []
