"""Finding input files and reading their raw records, one at a time (memory stays flat).

Formats: jsonl (one JSON object per line), txt (a whole file, a paragraph or a line is one document) and
parquet; jsonl and txt may be compressed (.gz, .bz2, .xz).

jsonl and txt are read as raw bytes, line by line, here; parquet goes through `datasets`' streaming
parquet loader. Why not `datasets`' json/text loaders too: they give no line numbers, and one invalid
UTF-8 byte or non-JSON line aborts the whole file (and in streaming mode they ignore `encoding` for
compressed files), while bad records here must be skipped and counted, or reported by file and line.
Decoding and validation happen in the worker processes (`documents.py`), not here.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megakv.data.errors import DataError

FORMATS = ("jsonl", "txt", "parquet")
TXT_UNITS = ("document", "paragraph", "line")
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt", ".text": "txt", ".md": "txt",
              ".rst": "txt", ".parquet": "parquet"}
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class InputFile:
    path: Path
    format: str
    compression: str | None  # ".gz" / ".bz2" / ".xz" or None
    size: int  # bytes on disk (progress is measured in these)


def detect(path: Path, forced_format: str | None = None) -> tuple[str, str | None] | None:
    """(format, compression) of a file name, or None if the name says nothing."""
    suffixes = path.suffixes
    compression = suffixes[-1] if suffixes and suffixes[-1] in OPENERS else None
    names = suffixes[:-1] if compression else suffixes
    inner = names[-1] if names else ""
    fmt = forced_format or EXTENSIONS.get(inner)
    if fmt is None:
        return None
    if fmt == "parquet" and compression:
        raise DataError(f"{path}: compressed parquet is not supported (parquet compresses internally)",
                        "decompress the file first")
    return fmt, compression


def expand_inputs(patterns: list[str], forced_format: str | None = None) -> list[InputFile]:
    """Files named by paths, globs or directories (searched recursively), in a stable order."""
    if forced_format is not None and forced_format not in FORMATS:
        raise DataError(f"unknown input format {forced_format!r}", f"use one of {FORMATS}")
    found: list[InputFile] = []
    seen: set[Path] = set()

    def add(path: Path, explicit: bool) -> None:
        kind = detect(path, forced_format)
        if kind is None:
            if explicit:
                raise DataError(f"cannot tell the format of {path} from its name",
                                f"pass --format with one of {FORMATS}")
            return  # unrelated file inside a directory
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            found.append(InputFile(path, kind[0], kind[1], path.stat().st_size))

    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            for sub in sorted(p for p in path.rglob("*") if p.is_file()):
                add(sub, explicit=False)
        elif path.is_file():
            add(path, explicit=True)
        elif glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"input pattern {pattern!r} matched no files", "check the path and quoting")
            for sub in matches:
                add(sub, explicit=False)
        else:
            raise DataError(f"input {pattern} not found", "pass existing files, globs or directories")
    if not found:
        raise DataError(f"no input files with a known format in {patterns}",
                        "name files *.jsonl / *.txt / *.parquet (optionally .gz), or pass --format")
    return found


def select_shard(files: list[InputFile], index: int, count: int) -> list[InputFile]:
    """The files of shard `index` of `count`: contiguous runs of the list, balanced by bytes.

    Contiguous, so merging the shards' pairs in shard order gives exactly the pair of all files at once.
    A file belongs to the shard where its middle byte falls (shards may be empty when files are few).
    """
    if not 0 <= index < count:
        raise DataError(f"shard index {index} is outside [0, {count})", "pass 0 <= --shard-index < --num-shards")
    total = sum(f.size for f in files)
    chosen, before = [], 0
    for position, file in enumerate(files):
        if total:
            shard = min(count - 1, int((before + file.size / 2) * count // total))
        else:
            shard = position * count // len(files)
        if shard == index:
            chosen.append(file)
        before += file.size
    return chosen


class RecordReader:
    """Iterates (line or row number, payload) of one file; `position()` is the on-disk bytes consumed.

    payload: raw bytes (jsonl line / txt document, paragraph or line; no line break, no BOM) or, for
    parquet, the value of the text column (any Python object, None when missing).
    """

    def __init__(self, file: InputFile, text_key: str = "text", txt_unit: str = "document",
                 batch_rows: int = 1024):
        if txt_unit not in TXT_UNITS:
            raise DataError(f"unknown txt unit {txt_unit!r}", f"use one of {TXT_UNITS}")
        self.file, self.text_key, self.txt_unit, self.batch_rows = file, text_key, txt_unit, batch_rows
        self._raw = None
        self._rows_done = 0
        self._rows_total = 1

    def position(self) -> int:
        if self.file.format == "parquet":
            return self.file.size * self._rows_done // max(self._rows_total, 1)
        try:
            return self._raw.tell() if self._raw is not None else 0
        except (ValueError, OSError):  # closed
            return self.file.size

    def __iter__(self) -> Iterator[tuple[int, object]]:
        # A damaged file (a truncated download, another format under this name) is named, not a traceback.
        damaged: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError, zlib.error)
        if self.file.format == "parquet":
            import pyarrow

            damaged += (pyarrow.ArrowException,)  # ArrowInvalid: not a parquet file, or a truncated one
        try:
            yield from self._records()
        except damaged as e:
            raise self._unreadable(e) from None

    def _unreadable(self, error: BaseException) -> DataError:
        kind = self.file.format + (f" ({self.file.compression[1:]})" if self.file.compression else "")
        return DataError(f"{self.file.path} cannot be read as {kind}: {type(error).__name__}: {error}",
                         "check the file (an interrupted download is truncated), or pass --format")

    def _records(self) -> Iterator[tuple[int, object]]:
        if self.file.format == "parquet":
            yield from self._parquet_rows()
            return
        with open(self.file.path, "rb") as raw:
            self._raw = raw
            stream = OPENERS[self.file.compression](raw, "rb") if self.file.compression else raw
            with stream:
                if self.file.format == "jsonl" or self.txt_unit == "line":
                    yield from self._lines(stream)
                elif self.txt_unit == "paragraph":
                    yield from self._paragraphs(stream)
                else:
                    data = stream.read()
                    yield 1, data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data

    @staticmethod
    def _lines(stream) -> Iterator[tuple[int, bytes]]:
        for number, line in enumerate(stream, 1):
            if number == 1 and line.startswith(UTF8_BOM):
                line = line[len(UTF8_BOM):]
            yield number, line.rstrip(b"\r\n")

    @staticmethod
    def _paragraphs(stream) -> Iterator[tuple[int, bytes]]:
        lines: list[bytes] = []
        start = 0
        for number, line in RecordReader._lines(stream):
            if line.strip():
                if not lines:
                    start = number
                lines.append(line)
            elif lines:
                yield start, b"\n".join(lines)
                lines = []
        if lines:
            yield start, b"\n".join(lines)

    def _parquet_rows(self) -> Iterator[tuple[int, object]]:
        import datasets
        import pyarrow.parquet as pq

        self._rows_total = pq.ParquetFile(self.file.path).metadata.num_rows
        stream = datasets.load_dataset("parquet", data_files=[str(self.file.path)], split="train",
                                       streaming=True)
        has_key = self.text_key in (stream.column_names or [])
        column = self.text_key if has_key else (stream.column_names or [None])[0]
        if column is None:
            return
        row = 0
        for batch in stream.select_columns([column]).iter(batch_size=self.batch_rows):
            for value in batch[column]:
                row += 1
                yield row, (value if has_key else None)
            self._rows_done = row
