"""Finding input files and reading their raw records, one at a time (memory stays flat).

Formats: jsonl (one JSON object per line), txt (a whole file, a paragraph or a line is one document) and
parquet; jsonl and txt may be compressed (.gz, .bz2, .xz). File name suffixes are matched in any case.

jsonl and txt are read as raw bytes, line by line, here (a text line ends at \r\n, \n or a lone \r, as
in Python's universal newlines, a JSON line at \n; blank lines separate records and are none themselves);
parquet's text column is read alone with pyarrow. Why not `datasets`' loaders: they give no line numbers,
one invalid UTF-8 byte or non-JSON line aborts the whole file, and its parquet loader decodes every column
(a map column failed) and refused empty row groups, while bad records here must be skipped and counted, or
reported by file and line. Decoding and validation happen in the worker processes (`documents.py`), not here.

Directories are searched recursively, leaving out hidden files and directories (names starting with '.',
as globs do: macOS `._x.txt`, `.ipynb_checkpoints/`, `.git/`) and files of no known format; `ignored`
collects what was left out, for the tools to report. `.json` is not read as JSON lines: directories hold
JSON documents that are not (tokenizer.json, PREFIX.meta.json, dataset_info.json).
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
LINE_END = (b"\n", b"\r")
READ_CHUNK = 1 << 20  # bytes read at a time when splitting lines
# Why entries of an input directory were left out (keys of expand_inputs' `ignored`).
IGNORED_WHY = {
    "hidden": "hidden (names starting with '.')",
    "json": ".json (JSON lines must be named .jsonl or .ndjson: rename them, or pass --format jsonl)",
    "unknown": "of no known format (pass --format to read them as one)",
}
EXAMPLES_IGNORED = 3


@dataclass(frozen=True)
class InputFile:
    path: Path
    format: str
    compression: str | None  # ".gz" / ".bz2" / ".xz" or None
    size: int  # bytes on disk (progress is measured in these)


def detect(path: Path, forced_format: str | None = None) -> tuple[str, str | None] | None:
    """(format, compression) of a file name (any case: `C.JSONL`, `e.jsonl.GZ`), or None if it says nothing."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
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


def expand_inputs(patterns: list[str], forced_format: str | None = None,
                  ignored: dict[str, list[Path]] | None = None) -> list[InputFile]:
    """Files named by paths, globs or directories (searched recursively), in a stable order.

    `ignored` (if given) collects, by reason (IGNORED_WHY), the entries of directories that were left out."""
    if forced_format is not None and forced_format not in FORMATS:
        raise DataError(f"unknown input format {forced_format!r}", f"use one of {FORMATS}")
    found: list[InputFile] = []
    seen: set[Path] = set()
    left_out: dict[str, list[Path]] = {} if ignored is None else ignored

    def add(path: Path, explicit: bool) -> None:
        kind = detect(path, forced_format)
        if kind is None:
            if explicit:
                raise DataError(f"cannot tell the format of {path} from its name", _format_fix(path))
            left_out.setdefault(_unknown_reason(path), []).append(path)  # reported, not read
            return
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            found.append(InputFile(path, kind[0], kind[1], path.stat().st_size))

    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            for sub in _walk(path, left_out):
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
        raise DataError(f"no input files with a known format in {patterns}" + (
            f"; {describe_ignored(left_out)}" if left_out else ""),
            "name files *.jsonl / *.txt / *.parquet (optionally .gz), or pass --format")
    return found


def _walk(directory: Path, ignored: dict[str, list[Path]]) -> list[Path]:
    """The files under `directory`, sorted, without hidden files and directories (which are not entered)."""
    files = []
    for root, dirs, names in os.walk(directory):
        for name in [d for d in dirs if d.startswith(".")]:
            ignored.setdefault("hidden", []).append(Path(root) / name)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                ignored.setdefault("hidden", []).append(Path(root) / name)
            elif os.path.isfile(os.path.join(root, name)):  # not a broken link, socket, ...
                files.append(Path(root) / name)
    return sorted(files)


def _unknown_reason(path: Path) -> str:
    return "json" if path.suffix.lower() == ".json" else "unknown"


def _format_fix(path: Path) -> str:
    if _unknown_reason(path) == "json":
        return "JSON lines are read from *.jsonl / *.ndjson: rename the file, or pass --format jsonl"
    return f"pass --format with one of {FORMATS}"


def describe_ignored(ignored: dict[str, list[Path]]) -> str:
    """One line saying which entries of the input directories (and files a glob matched) were left out, and
    why ('' if none)."""
    if not any(ignored.values()):
        return ""
    parts = [f"{len(paths):,} {IGNORED_WHY[reason]}, e.g. {', '.join(str(p) for p in paths[:EXAMPLES_IGNORED])}"
             for reason, paths in sorted(ignored.items()) if paths]
    total = sum(len(paths) for paths in ignored.values())
    return f"ignored {total:,} entries of the input directories and globs: " + "; ".join(parts)


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
                    # Blank lines separate records (or end the file): they are not empty records. JSON Lines
                    # end at \n alone (a raw \r is JSON whitespace inside a record); text at any line end.
                    lines = self._lines(stream, universal=self.file.format == "txt")
                    yield from ((number, line) for number, line in lines if line.strip())
                elif self.txt_unit == "paragraph":
                    yield from self._paragraphs(stream)
                else:
                    data = stream.read()
                    yield 1, data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data

    @staticmethod
    def _lines(stream, universal: bool = True) -> Iterator[tuple[int, bytes]]:
        lines = _universal_lines(stream) if universal else (line.rstrip(b"\r\n") for line in stream)
        for number, line in enumerate(lines, 1):
            if number == 1 and line.startswith(UTF8_BOM):
                line = line[len(UTF8_BOM):]
            yield number, line

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
        import pyarrow.parquet as pq

        # The text column alone: other columns (a map, a duration ...) are never decoded, and empty row
        # groups or files are read as such (`datasets` took the first row group's size as its batch size).
        parquet = pq.ParquetFile(self.file.path)
        self._rows_total = parquet.metadata.num_rows
        names = parquet.schema_arrow.names
        if names.count(self.text_key) > 1:
            raise DataError(f"{self.file.path} has {names.count(self.text_key)} columns named {self.text_key!r}",
                            "rename all but one of them, or pass --text-key naming another column")
        if self.text_key not in names:  # every row is counted as missing_field, naming --text-key
            for row in range(1, self._rows_total + 1):
                yield row, None
                self._rows_done = row
            return
        row = 0
        for batch in parquet.iter_batches(batch_size=self.batch_rows, columns=[self.text_key]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield row, value
            self._rows_done = row


def _universal_lines(stream) -> Iterator[bytes]:
    """The lines of a binary stream without their line ends: \r\n, \n or a lone \r (universal newlines)."""
    head: list[bytes] = []  # the start of a line that spans chunks
    while chunk := stream.read(READ_CHUNK):
        while chunk.endswith(b"\r"):  # a \r\n must not be cut in two
            more = stream.read(1)
            if not more:
                break
            chunk += more
        lines = chunk.splitlines(keepends=True)  # bytes: at \r\n, \n and \r only
        if head:
            if not lines[0].endswith(LINE_END):  # the whole chunk continues that line
                head.append(lines[0])
                continue
            lines[0] = b"".join(head) + lines[0]
            head = []
        if not lines[-1].endswith(LINE_END):
            head.append(lines.pop())
        for line in lines:
            yield line.rstrip(b"\r\n")
    if head:
        yield b"".join(head)
