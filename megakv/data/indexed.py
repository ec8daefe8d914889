"""Megatron's indexed dataset format (`PREFIX.bin` + `PREFIX.idx`, magic `MMIDIDX`), read and written.

Byte layout of `.idx` (all little endian), identical to Megatron-LM and GPT-NeoX, so pairs made here work
there and theirs work here:

    b"MMIDIDX\\x00\\x00"           9-byte magic
    uint64 version = 1
    uint8  dtype code             1=uint8 2=int8 3=int16 4=int32 5=int64 6=float64 7=float32 8=uint16
    uint64 sequence_count N
    uint64 document_count D       (= documents + 1: document_indices starts with 0)
    int32[N] sequence_lengths     (tokens)
    int64[N] sequence_pointers    (byte offsets into .bin)
    int64[D] document_indices     (sequence index where each document starts; last entry = N)
    int8[N]  sequence_modes       (optional, multimodal Megatron data only; ignored here)

`.bin` is the concatenation of every sequence's tokens in that dtype. Here a document is one sequence.

The writer keeps memory flat for any number of documents: lengths and document boundaries are spilled to
temporary files and streamed into the `.idx` at the end. It writes under temporary names and renames
when complete, so an interrupted run never leaves a pair that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megakv.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

DTYPE_OF_CODE: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_OF_CODE.items()}

COPY_CHUNK_BYTES = 64 << 20  # streaming copies never hold more than this at once
INDEX_CHUNK = 1 << 20  # entries of lengths / pointers / document indices handled at once


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


# QA samples (megakv-qa prep) carry a loss-mask pair beside their token pair: PREFIX_lossmask.bin/.idx.
MASK_SUFFIX = "_lossmask"


def mask_prefix(prefix: str | Path) -> Path:
    return Path(f"{prefix}{MASK_SUFFIX}")


# Temporary names of what is written for PREFIX: `PREFIX.bin.tmp-<pid>-<8 hex>` (also .idx, .lengths, .docs,
# .meta.json; older metadata temporaries lack the pid). Only names of exactly this shape count as leftovers
# of a killed writer (output_lock.py removes them), so nothing else beside the output is ever deleted.
_TEMPORARY = r"\.(?:bin|idx|lengths|docs|meta\.json)\.tmp-(?:\d+-)?[0-9a-f]{8}"


def temporary_tag() -> str:
    return f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temporary_of(name: str, prefix_name: str) -> bool:
    """Whether the file name `name` is one of the temporary names megakv writes for the prefix `prefix_name`."""
    return re.fullmatch(re.escape(prefix_name) + _TEMPORARY, name) is not None


def remove_pair(prefix: str | Path) -> None:
    """Delete a pair, `.idx` first (a pair without it no longer counts as present)."""
    for path in (idx_path(prefix), bin_path(prefix)):
        path.unlink(missing_ok=True)


def optimal_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id in [0, vocab_size)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 31:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def damaged(ipath: Path, what: str) -> DataError:
    return DataError(f"{ipath} is damaged: {what}",
                     "re-run megakv-prep / megakv-merge for this prefix, or copy the pair again from its source")


def pair_exists(prefix: str | Path) -> bool:
    """A pair counts as present once its `.idx` exists: the writer renames the `.idx` last."""
    return idx_path(prefix).exists()


class IndexedDataset:
    """Read-only, memory-mapped view of one `.bin/.idx` pair; validates the pair on open."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for path in (ipath, bpath):
            if not path.is_file():
                raise DataError(f"indexed dataset file {path} not found",
                                "pass the prefix of a pair written by megakv-prep (without .bin/.idx)")
        idx_size = ipath.stat().st_size
        if idx_size < HEADER.size:
            raise DataError(f"{ipath} is truncated ({idx_size} bytes, the header alone is {HEADER.size})",
                            "re-run megakv-prep / megakv-merge for this prefix")
        with open(ipath, "rb") as f:
            magic, version, code, n_seq, n_doc = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise DataError(f"{ipath} is not an MMIDIDX index (magic {magic!r})",
                            "pass a Megatron-format .idx file written by megakv-prep or Megatron")
        if version != VERSION:
            raise DataError(f"{ipath} has index version {version}, only version {VERSION} is supported",
                            "re-create it with megakv-prep")
        if code not in DTYPE_OF_CODE:
            raise DataError(f"{ipath} has unknown dtype code {code}", "re-create it with megakv-prep")
        self.dtype = DTYPE_OF_CODE[code]
        expected = HEADER.size + 12 * n_seq + 8 * n_doc
        if idx_size not in (expected, expected + n_seq):  # + n_seq: Megatron's optional sequence modes
            raise DataError(f"{ipath} is truncated or corrupt: {idx_size} bytes, the header promises "
                            f"{expected} ({n_seq} sequences, {n_doc} document indices)",
                            "re-run megakv-prep / megakv-merge for this prefix")
        self._idx = np.memmap(ipath, dtype=np.uint8, mode="r")
        self.lengths = np.frombuffer(self._idx, np.int32, n_seq, HEADER.size)
        self.pointers = np.frombuffer(self._idx, np.int64, n_seq, HEADER.size + 4 * n_seq)
        self.document_indices = np.frombuffer(self._idx, np.int64, n_doc, HEADER.size + 12 * n_seq)

        expected_bin = int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize if n_seq else 0
        bin_size = bpath.stat().st_size
        if bin_size != expected_bin:
            raise DataError(f"{bpath} has {bin_size} bytes but {ipath} describes {expected_bin}: the pair is "
                            "truncated or the two files come from different datasets",
                            "re-run megakv-prep / megakv-merge for this prefix")
        if n_seq and int(self.pointers[0]) != 0:
            raise DataError(f"{ipath}: first sequence pointer is {int(self.pointers[0])}, expected 0",
                            "re-create the pair")
        if n_doc < 1 or int(self.document_indices[0]) != 0 or int(self.document_indices[-1]) != n_seq:
            raise DataError(f"{ipath}: document indices must start at 0 and end at {n_seq}",
                            "re-create the pair")
        self._check_sequences(ipath, bin_size)
        self._check_documents(ipath)
        self._bin = np.memmap(bpath, dtype=np.uint8, mode="r") if bin_size else np.empty(0, np.uint8)

    def _check_sequences(self, ipath: Path, bin_size: int) -> None:
        """Every length >= 0 and every sequence starting where the one before it ends, inside the `.bin`.

        The checks above see only the first and last entries: a crafted index with consistent ends but
        lengths of 2**31 - 1 made training allocate 98.7 GiB, and middle pointers of 2**40 a traceback
        mid-run. Chunked, so a 10**8-sequence index is checked in bounded memory (~40 MB at a time)."""
        itemsize = self.dtype.itemsize
        end = 0  # byte where the next sequence must start
        for first in range(0, len(self.lengths), INDEX_CHUNK):
            lengths = self.lengths[first:first + INDEX_CHUNK]
            if int(lengths.min()) < 0:
                i = first + int(np.argmax(lengths < 0))
                raise damaged(ipath, f"sequence {i} has length {int(self.lengths[i])}")
            nbytes = lengths.astype(np.int64) * itemsize
            ends = np.cumsum(nbytes) + end  # at most 2**20 * 2**31 * 8 bytes per chunk: no overflow
            wrong = np.flatnonzero(self.pointers[first:first + INDEX_CHUNK] != ends - nbytes)
            if len(wrong):
                i, at = first + int(wrong[0]), int(ends[wrong[0]] - nbytes[wrong[0]])
                raise damaged(ipath, f"sequence {i} starts at byte {int(self.pointers[i])}, but the sequences "
                                     f"before it end at byte {at}")
            end = int(ends[-1])
            if end > bin_size:  # also keeps the running sum far from int64 overflow
                raise damaged(ipath, f"its first {first + len(lengths):,} sequences need {end:,} bytes, but "
                                     f"{bin_path(self.prefix)} has {bin_size:,}")

    def _check_documents(self, ipath: Path) -> None:
        """Document starts in order (with the first 0 and the last the sequence count, checked before: all
        within range)."""
        starts = self.document_indices
        for first in range(0, len(starts) - 1, INDEX_CHUNK):
            chunk = starts[first:first + INDEX_CHUNK + 1]  # one past: the next chunk's first
            backwards = np.flatnonzero(chunk[1:] < chunk[:-1])  # compared, not subtracted: no overflow
            if len(backwards):
                d = first + int(backwards[0]) + 1
                raise damaged(ipath, f"document {d} starts at sequence {int(starts[d])}, before document {d - 1} "
                                     f"({int(starts[d - 1])})")

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    @property
    def bin_nbytes(self) -> int:
        return len(self._bin)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence i (a zero-copy view), optionally a slice [offset, offset + length)."""
        available = int(self.lengths[i]) - offset
        count = available if length is None else min(length, available)
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, count, start)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def bin_chunks(self, chunk_bytes: int = COPY_CHUNK_BYTES):
        """The raw `.bin` bytes in chunks (for streaming copies and hashes)."""
        for start in range(0, len(self._bin), chunk_bytes):
            yield self._bin[start:start + chunk_bytes]

    def max_token_id(self) -> int:
        """Largest token id in `.bin` (a chunked scan; -1 when empty)."""
        step = COPY_CHUNK_BYTES // self.dtype.itemsize
        tokens = np.frombuffer(self._bin, self.dtype) if len(self._bin) else np.empty(0, self.dtype)
        best = -1
        for start in range(0, len(tokens), step):
            best = max(best, int(tokens[start:start + step].max()))
        return best


def contains_token(dataset: IndexedDataset, token_id: int, probes: int = 1000, max_tokens: int = 1 << 24) -> bool:
    """Whether `token_id` occurs in any of up to `probes` evenly spread sequences (reading at most about
    `max_tokens` tokens): e.g. the end-of-document token, which megakv-prep ends every document with and
    Megatron's preprocess_data.py writes only with --append-eod."""
    nonempty = np.flatnonzero(dataset.lengths > 0)
    if not len(nonempty):
        return False
    picks = nonempty[np.linspace(0, len(nonempty) - 1, min(probes, len(nonempty))).astype(np.int64)]
    read = 0
    for i in picks:
        tokens = dataset.get(int(i), 0, max(1, max_tokens - read))
        if bool((tokens == token_id).any()):
            return True
        read += len(tokens)
        if read >= max_tokens:
            return False
    return False


# What to do when the disk refused a write, by errno.
_WRITE_FIXES = {
    errno.ENOSPC: "free space on that filesystem (df -h {dir}), or choose an --output-prefix on another one",
    errno.EDQUOT: "free space within your disk quota (quota -s), or choose an --output-prefix on another filesystem",
    errno.EFBIG: "the file size limit was reached: raise it (ulimit -f) or choose an --output-prefix on a "
                 "filesystem that allows larger files",
}


def write_error(prefix: Path, error: OSError) -> DataError:
    """A failed write of the pair `prefix`, naming it, the reason and the fix (not a bare "[Errno 28]")."""
    directory = prefix.parent
    fix = _WRITE_FIXES.get(error.errno, "check that {dir} is writable and its disk healthy, then run again")
    return DataError(f"writing the output {prefix} (.bin/.idx) failed: {error.strerror or error}; its partial "
                     "temporary files were removed", fix.format(dir=directory))


class IndexedWriter:
    """Writes one pair. Use as a context manager: an exception removes the temporary files.

    Call `add_documents` / `add_document` / `add_index`, then `finalize()`; until then only temporary
    names exist, and `finalize` renames the `.bin` first and the `.idx` last.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = temporary_tag()
        self._tmp_bin = Path(f"{bin_path(prefix)}{tag}")
        self._tmp_idx = Path(f"{idx_path(prefix)}{tag}")
        self._tmp_lengths = Path(f"{self.prefix}.lengths{tag}")
        self._tmp_docs = Path(f"{self.prefix}.docs{tag}")
        self._files: list = []  # open temporaries: bin, lengths, docs
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False
        with self._writing():
            for path in (self._tmp_bin, self._tmp_lengths, self._tmp_docs):
                self._files.append(open(path, "wb"))
        self._bin, self._lengths, self._docs = self._files

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: `tokens` is their concatenation, `lengths` their sizes."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens were given")
        if len(lengths) and int(lengths.max()) > np.iinfo(np.int32).max:
            raise DataError("a document has more than 2**31 tokens, which the index format cannot hold",
                            "split the document before preprocessing")
        first = self.num_sequences + 1
        with self._writing():
            self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
            self._lengths.write(lengths.astype(np.int32).tobytes())
            self._docs.write(np.arange(first, first + len(lengths), dtype=np.int64).tobytes())
        self.num_sequences += len(lengths)
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def add_document(self, tokens: np.ndarray) -> None:
        self.add_documents(np.asarray(tokens), np.array([len(tokens)]))

    def add_index(self, source: IndexedDataset) -> None:
        """Append a whole pair by streaming its files (no full index in memory)."""
        if source.dtype != self.dtype:
            raise DataError(f"{source.prefix} stores {source.dtype} tokens, the output stores {self.dtype}",
                            "merge only pairs made with the same tokenizer (same token dtype)")
        n = len(source)
        with self._writing():
            for chunk in source.bin_chunks():
                self._bin.write(chunk.tobytes())
            for start in range(0, n, INDEX_CHUNK):
                self._lengths.write(source.lengths[start:start + INDEX_CHUNK].tobytes())
            doc_indices = source.document_indices
            for start in range(1, len(doc_indices), INDEX_CHUNK):
                chunk = doc_indices[start:start + INDEX_CHUNK] + self.num_sequences
                self._docs.write(chunk.astype(np.int64).tobytes())
        self.num_sequences += n
        self.num_documents += source.num_documents
        self.num_tokens += source.num_tokens

    def finalize(self, before_commit: Callable[[], None] | None = None) -> None:
        """Write the `.idx`, then rename: `.bin` first, `.idx` last (the pair's completion mark).

        An older pair under the same prefix loses its `.idx` first, so no moment shows a complete pair
        made of old and new files. `before_commit` runs just before the `.idx` lands (to write metadata).
        """
        with self._writing():
            self._finalize(before_commit)

    def _finalize(self, before_commit: Callable[[], None] | None) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())  # the .bin must be on disk before the .idx that marks it complete
        for f in self._files:
            f.close()
        n, d = self.num_sequences, self.num_documents + 1
        with open(self._tmp_idx, "wb") as out:
            out.write(HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], n, d))
            with open(self._tmp_lengths, "rb") as src:
                while chunk := src.read(4 * INDEX_CHUNK):
                    out.write(chunk)
            with open(self._tmp_lengths, "rb") as src:  # pointers: running byte offsets of the lengths
                offset = 0
                while chunk := src.read(4 * INDEX_CHUNK):
                    nbytes = np.frombuffer(chunk, np.int32).astype(np.int64) * self.dtype.itemsize
                    ends = np.cumsum(nbytes) + offset
                    out.write((ends - nbytes).tobytes())
                    offset = int(ends[-1])
            out.write(np.zeros(1, np.int64).tobytes())
            with open(self._tmp_docs, "rb") as src:
                while chunk := src.read(8 * INDEX_CHUNK):
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        self._tmp_lengths.unlink()
        self._tmp_docs.unlink()
        idx_path(self.prefix).unlink(missing_ok=True)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        if before_commit is not None:
            before_commit()
        os.replace(self._tmp_idx, idx_path(self.prefix))
        self._done = True

    def abort(self) -> None:
        """Close and remove every temporary file. Closing flushes, which fails again on a full disk: that
        error is dropped (the data is being thrown away) so the removal, which frees the space, always runs."""
        self._done = True
        try:
            for f in self._files:
                with contextlib.suppress(OSError):
                    f.close()
        finally:
            for path in (self._tmp_bin, self._tmp_idx, self._tmp_lengths, self._tmp_docs):
                path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _writing(self):
        """An OSError while writing the output (a full disk, a quota, a file size limit) becomes a DataError
        naming the output and the fix, once the partial temporaries are removed."""
        try:
            yield
        except OSError as e:
            self.abort()
            raise write_error(self.prefix, e) from e
