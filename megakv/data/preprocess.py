"""Input files -> one `.bin/.idx` pair, tokenized by a pool of worker processes.

The main process reads raw records (sources.py) into batches of about 1 MiB and hands them to workers,
which decode, validate (documents.py), tokenize and append the end-of-document token; results come back
in order and are streamed into the writer. At most a few batches are in flight, so memory is flat
whatever the input size. `workers=1` runs everything in this process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megakv.data.documents import EMPTY, INVALID_UTF8, MISSING_FIELD, NOT_JSON, NOT_TEXT, TOO_LARGE, Skip, record_text
from megakv.data.errors import DataError
from megakv.data.indexed import (
    MASK_SUFFIX,
    IndexedDataset,
    IndexedWriter,
    idx_path,
    mask_prefix,
    optimal_dtype,
    pair_exists,
    remove_pair,
)
from megakv.data.metadata import read_meta, write_meta
from megakv.data.output_lock import output_lock
from megakv.data.progress import Progress
from megakv.data.sources import InputFile, RecordReader, describe_ignored, expand_inputs, select_shard
from megakv.data.tokenizer import TokenizerInfo, cached_tokenizer, save_beside_data

BATCH_BYTES = 1 << 18  # 256 KiB: small enough to spread a few large documents over the workers
BATCH_RECORDS = 4096
EXAMPLES_PER_REASON = 3  # skipped records listed by file:line in the summary
# More skipped records than this is almost always a wrong --text-key / --format or a broken input, not dirt.
DEFAULT_MAX_SKIP_FRACTION = 0.5
SKIP_FIXES = {  # one per skip reason of megakv/data/documents.py
    MISSING_FIELD: "check --text-key: it must name the field that holds the text",
    NOT_TEXT: "check --text-key: it must name a field holding a string",
    NOT_JSON: "check the input format (--format), or that the file is JSON lines",
    INVALID_UTF8: "re-encode the input as UTF-8",
    EMPTY: "check --text-key and --txt-unit, or remove the empty records",
    TOO_LARGE: "split such documents before preparing them, or raise --max-record-mb",
}
DEFAULT_MAX_RECORD_MB = 16.0


@dataclass(frozen=True)
class PrepOptions:
    text_key: str = "text"
    txt_unit: str = "document"  # txt files: a whole file, a paragraph or a line is one document
    format: str | None = None  # force a format instead of reading it from file names
    prepend_bos: bool = False
    strict: bool = False  # fail on the first bad record instead of skipping it
    # Bounds memory per record: a tokenizer holds ~60x a record's size while encoding it (a 50 MB line took
    # 2.9 GB); larger records are skipped as too_large (or fail under strict) before they are decoded.
    max_record_mb: float = DEFAULT_MAX_RECORD_MB


# Bump when reading the same files may give other records, and say what changed: an output prepared by an
# older reader is still reused (its tokens are valid), with a warning. Outputs without one are version 1.
READER_VERSION = 2
READER_CHANGES = {2: "a lone CR ends a .txt line, blank .txt/.jsonl lines are not records, hidden files are "
                     "skipped, input suffixes match in any case, parquet is read through pyarrow (2026-12-07)"}


@dataclass
class PrepSummary:
    output_prefix: str
    files: int = 0
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    dtype: str = ""
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    skipped_first_detail: dict[str, str] = field(default_factory=dict)  # what was wrong with the first one
    ignored: dict[str, list[Path]] = field(default_factory=dict)  # entries of input directories left out
    already_done: bool = False
    made_by_reader: int = READER_VERSION  # the reader version of a reused output

    def format(self) -> str:
        if self.already_done:
            return f"{self.output_prefix}: already prepared from the same inputs and tokenizer; nothing to do"
        rate = self.tokens / self.seconds if self.seconds else 0.0
        lines = [f"{self.output_prefix}: {self.documents:,} documents, {self.tokens:,} tokens ({self.dtype}) "
                 f"from {self.files:,} files ({self.input_bytes / 2**20:,.1f} MiB) in {self.seconds:,.1f} s "
                 f"({rate:,.0f} tokens/s, {self.documents / max(self.seconds, 1e-9):,.0f} docs/s)"]
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values()):,} records: " + ", ".join(
                f"{reason}={n:,} (e.g. {', '.join(self.skipped_examples.get(reason, []))})"
                for reason, n in sorted(self.skipped.items())))
        else:
            lines.append("skipped 0 records")
        if self.ignored:
            lines.append(describe_ignored(self.ignored))
        return "\n".join(lines)

    def stale_reader_warning(self) -> str | None:
        """For a reused output an older reader made: what changed since, and the way to re-prepare."""
        if not self.already_done or self.made_by_reader >= READER_VERSION:
            return None
        return (f"warning: {self.output_prefix} was prepared by an older megakv-prep reader (version "
                f"{self.made_by_reader}, now {READER_VERSION}; since then {changes_since(self.made_by_reader)}); if "
                "the inputs hold such records its tokens differ from what this version makes: pass --overwrite to "
                "re-prepare")

    def top_skip(self) -> str:
        reason, n = self.skipped.most_common(1)[0]
        examples = self.skipped_examples.get(reason, [])
        detail = self.skipped_first_detail.get(reason)
        return (f"{reason}={n:,}" + (f" (e.g. {', '.join(examples)})" if examples else "")
                + (f": {detail}" if detail else ""))


def check_useful(summary: PrepSummary, max_skip_fraction: float) -> None:
    """Refuse an output with no documents, or one made from too few of its records."""
    skipped = sum(summary.skipped.values())
    records = summary.documents + skipped
    if records == 0:
        raise DataError(f"the inputs ({summary.files} files) hold no records, so {summary.output_prefix} "
                        "would be empty", "check --input, --format and --txt-unit")
    top_reason = summary.skipped.most_common(1)[0][0] if skipped else ""
    if summary.documents == 0:
        raise DataError(f"all {skipped:,} records were skipped, so {summary.output_prefix} would be empty; "
                        f"top reason {summary.top_skip()}", SKIP_FIXES.get(top_reason, "check the input"))
    if skipped > max_skip_fraction * records:
        raise DataError(f"{skipped:,} of {records:,} records ({skipped / records:.0%}) were skipped, more than "
                        f"--max-skip-fraction={max_skip_fraction:g}; top reason {summary.top_skip()}",
                        SKIP_FIXES.get(top_reason, "check the input") + ", or raise --max-skip-fraction "
                        "if so many bad records are expected")


@dataclass(frozen=True)
class _Task:
    tokenizer_dir: str
    tokenizer_fingerprint: str
    options: PrepOptions
    vocab_size: int
    eos_id: int
    bos_id: int | None
    dtype: str
    formats: tuple[str, ...]  # per record
    items: tuple[tuple[int, int, object], ...]  # (file index, line, payload)


@dataclass
class _Result:
    tokens: np.ndarray
    lengths: np.ndarray
    skips: list[tuple[int, int, str, str]]  # (file index, line, reason, detail)
    out_of_vocab: tuple[int, int, int] | None  # (file index, line, token id)


def encode_task(task: _Task) -> _Result:
    """Worker: decode + validate + tokenize one batch (runs in a worker process, or inline)."""
    texts, kept, skips = [], [], []
    limit = int(task.options.max_record_mb * 2**20)
    for fmt, (file_index, line, payload) in zip(task.formats, task.items):
        if isinstance(payload, (bytes, str)) and len(payload) > limit:
            skips.append((file_index, line, TOO_LARGE, f"{len(payload):,} bytes, above --max-record-mb="
                                                        f"{task.options.max_record_mb:g}"))
            continue
        try:
            texts.append(record_text(fmt, payload, task.options.text_key))
            kept.append((file_index, line))
        except Skip as s:
            skips.append((file_index, line, s.reason, s.detail))
    tokenizer = cached_tokenizer(task.tokenizer_dir, task.tokenizer_fingerprint)
    ids = tokenizer.encode_batch(texts) if texts else []
    raw_lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(raw_lengths.sum()))
    out_of_vocab = None
    if len(flat) and (int(flat.max()) >= task.vocab_size or int(flat.min()) < 0):
        bad = int(np.flatnonzero((flat >= task.vocab_size) | (flat < 0))[0])
        doc = int(np.searchsorted(np.cumsum(raw_lengths), bad, side="right"))
        out_of_vocab = (*kept[doc], int(flat[bad]))
    ends = np.cumsum(raw_lengths)
    tokens = np.insert(flat, ends, task.eos_id)  # end-of-document token after every document
    lengths = raw_lengths + 1
    if task.options.prepend_bos and task.bos_id is not None and len(lengths):  # a batch may keep no record
        tokens = np.insert(tokens, np.concatenate([[0], np.cumsum(lengths)[:-1]]), task.bos_id)
        lengths = lengths + 1
    return _Result(tokens.astype(task.dtype), lengths, skips, out_of_vocab)


def _batches(files: list[InputFile], options: PrepOptions, make_task, progress: Progress
             ) -> Iterator[_Task]:
    formats, items, size = [], [], 0
    done_bytes = 0
    for file_index, file in enumerate(files):
        reader = RecordReader(file, options.text_key, options.txt_unit)
        for line, payload in reader:
            formats.append(file.format)
            items.append((file_index, line, payload))
            size += len(payload) if isinstance(payload, (bytes, str)) else 64
            if size >= BATCH_BYTES or len(items) >= BATCH_RECORDS:
                progress.read_to(done_bytes + reader.position())
                yield make_task(tuple(formats), tuple(items))
                formats, items, size = [], [], 0
        done_bytes += file.size
        progress.read_to(done_bytes)
    if items:
        yield make_task(tuple(formats), tuple(items))


def changes_since(version: int) -> str:
    return "; ".join(READER_CHANGES[v] for v in range(version + 1, READER_VERSION + 1))


def inputs_fingerprint(files: list[InputFile], options: PrepOptions, tokenizer: TokenizerInfo) -> str:
    """Identifies a preprocessing job: same files (path, size, mtime), options and tokenizer."""
    digest = hashlib.sha256()
    for f in files:
        stat = f.path.stat()
        digest.update(f"{f.path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    digest.update(json.dumps(asdict(options), sort_keys=True).encode())
    digest.update(tokenizer.fingerprint.encode())
    return digest.hexdigest()[:24]


def _check_output(prefix: Path, fingerprint: str, overwrite: bool, shard: tuple[int, int] | None = None,
                  redo: bool = False) -> int | None:
    """The reader version that made the output if it already holds exactly this job's result, else None
    (to prepare it); raises if it holds something else and not `overwrite`. `overwrite` also prepares again an
    output an older reader made, `redo` any output."""
    if redo or not pair_exists(prefix):
        return None
    meta = read_meta(prefix)
    if meta is not None and meta.get("inputs_fingerprint") == fingerprint:
        try:
            IndexedDataset(prefix)  # and it must still be intact
        except DataError:
            if not overwrite:
                raise
            return None
        recorded = list(shard) if shard else None
        if meta.get("shard") != recorded:  # the same files as a share of another array run: megakv-merge
            write_meta(prefix, {**meta, "shard": recorded})  # tells runs apart by this record
        made_by = int(meta.get("reader_version", 1))
        return None if overwrite and made_by < READER_VERSION else made_by  # its tokens may differ
    if overwrite:
        return None
    raise DataError(f"{idx_path(prefix)} already holds a different dataset (made from other inputs, options "
                    "or tokenizer; the inputs are compared by path, size and modification time)",
                    "choose another --output-prefix, or pass --overwrite to replace it")


def preprocess(inputs: list[str], tokenizer: str | Path, output_prefix: str | Path, *, workers: int = 1,
               options: PrepOptions = PrepOptions(), shard: tuple[int, int] | None = None,
               overwrite: bool = False, eos_token: str | None = None, progress: bool = True,
               max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION, redo: bool = False) -> PrepSummary:
    """`_preprocess` while holding the output's lock (output_lock.py): a second writer of the same prefix is
    refused at once instead of racing the first (the last writer used to win)."""
    prefix = Path(output_prefix)
    _refuse_output_in_input_dirs(inputs, prefix)  # before the lock file, which would be one of its files
    with output_lock(prefix, "megakv-prep"):
        return _preprocess(inputs, tokenizer, output_prefix, workers=workers, options=options, shard=shard,
                           overwrite=overwrite, eos_token=eos_token, progress=progress,
                           max_skip_fraction=max_skip_fraction, redo=redo)


def _refuse_output_in_input_dirs(inputs: list[str], prefix: Path) -> None:
    """An output inside an input directory would read its own files (lock, metadata, tokenizer/) as input:
    with --overwrite, a second run tokenized the first one's PREFIX.meta.json as a document."""
    out_dir = prefix.parent.resolve()
    for given in inputs:
        root = Path(given).resolve()
        if Path(given).is_dir() and (out_dir == root or root in out_dir.parents):
            raise DataError(f"the output prefix {prefix} lies inside the input directory {given}, so its own files "
                            "(PREFIX.meta.json, the lock, tokenizer/) would be read as input",
                            f"write the output outside the input directories, e.g. --output-prefix "
                            f"{root.parent / (root.name + '_prepared') / prefix.name}")


def _refuse_own_files(files: list[InputFile], prefix: Path) -> None:
    """A glob may match the output's own files (`c/*` with --format txt): refuse rather than read them."""
    own = [f.path for f in files if _written_for(f.path, prefix)]
    if own:
        raise DataError(f"the inputs include files written for the output {prefix}: "
                        f"{', '.join(str(p) for p in own[:3])}", "write the output outside the inputs, or narrow "
                        "the input globs (e.g. *.txt)")


# What megakv-prep writes for PREFIX (and PREFIX_lossmask): the pair, its metadata, the lock, temporary names.
WRITTEN_SUFFIXES = (".bin", ".idx", ".meta.json", ".tmp-lock")
WRITTEN_TEMPORARY = (".bin.tmp-", ".idx.tmp-", ".lengths.tmp-", ".docs.tmp-", ".meta.json.tmp-")


def _written_for(path: Path, prefix: Path) -> bool:
    """Whether megakv-prep writes `path` for `prefix` (an input named like it, `train.jsonl` beside the
    output `train`, is not one of them)."""
    path, out_dir = path.resolve(), prefix.parent.resolve()
    if out_dir / "tokenizer" in path.parents:
        return True
    if path.parent != out_dir:
        return False
    for stem in (f"{prefix.name}{MASK_SUFFIX}", prefix.name):
        if path.name.startswith(stem):
            rest = path.name[len(stem):]
            return rest in WRITTEN_SUFFIXES or rest.startswith(WRITTEN_TEMPORARY)
    return False


def _preprocess(inputs: list[str], tokenizer: str | Path, output_prefix: str | Path, *, workers: int = 1,
                options: PrepOptions = PrepOptions(), shard: tuple[int, int] | None = None,
                overwrite: bool = False, eos_token: str | None = None, progress: bool = True,
                max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION, redo: bool = False) -> PrepSummary:
    """Tokenize `inputs` (files, globs, directories) into `output_prefix`.bin/.idx (+ .meta.json).

    An output holding this very job's result (same files, sizes, mtimes, options, tokenizer) is kept unless
    `redo`; one holding another dataset is refused unless `overwrite` (which skips an identical one, so a
    recipe that owns its directory can pass it on every run).

    Nothing is written when no document is left, or when more than `max_skip_fraction` of the records
    were skipped (a DataError names the top reason).

    The tokenizer is saved as `tokenizer/` beside the output. `shard=(i, n)` keeps only the i-th of n
    contiguous, byte-balanced runs of the input files (one SLURM array task each).
    """
    if not options.max_record_mb > 0:
        raise DataError(f"--max-record-mb={options.max_record_mb} must be positive", "e.g. 16")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise DataError(f"--max-skip-fraction={max_skip_fraction} is outside [0, 1]", "e.g. 0.5; 1 allows any")
    started = time.time()
    prefix = Path(output_prefix)
    ignored: dict[str, list[Path]] = {}
    files = expand_inputs(inputs, options.format, ignored)
    _refuse_own_files(files, prefix)
    if shard is not None:
        files = select_shard(files, *shard)
    tokenizer_dir, info = save_beside_data(tokenizer, prefix.parent, eos_token)
    if options.prepend_bos and info.bos_id is None:
        raise DataError(f"--prepend-bos was given but the tokenizer in {tokenizer_dir} has no BOS token",
                        "drop --prepend-bos or use a tokenizer with a BOS token")
    fingerprint = inputs_fingerprint(files, options, info)
    summary = PrepSummary(str(prefix), files=len(files), input_bytes=sum(f.size for f in files), ignored=ignored)
    made_by_reader = _check_output(prefix, fingerprint, overwrite, shard, redo)
    if made_by_reader is not None:
        summary.already_done, summary.made_by_reader = True, made_by_reader
        return summary
    dtype = optimal_dtype(info.vocab_size)
    summary.dtype = dtype.name

    def make_task(formats, items) -> _Task:
        return _Task(str(tokenizer_dir), info.fingerprint, options, info.vocab_size, info.eos_id, info.bos_id,
                     dtype.name, formats, items)

    max_token_id = -1
    bar = Progress(summary.input_bytes, desc=prefix.name, enabled=progress)
    with IndexedWriter(prefix, dtype) as writer, bar:
        results = _run(_batches(files, options, make_task, bar), workers)
        for result in results:
            for file_index, line, reason, detail in result.skips:
                where = f"{files[file_index].path}:{line}"
                if options.strict:
                    raise DataError(f"{where}: {detail} ({reason})",
                                    "fix or remove that record, or run without --strict to skip and count "
                                    "bad records")
                summary.skipped[reason] += 1
                summary.skipped_first_detail.setdefault(reason, detail)
                examples = summary.skipped_examples.setdefault(reason, [])
                if len(examples) < EXAMPLES_PER_REASON:
                    examples.append(where)
            if result.out_of_vocab is not None:
                file_index, line, token = result.out_of_vocab
                raise DataError(f"{files[file_index].path}:{line}: token id {token} is outside the vocabulary "
                                f"of {info.vocab_size} declared by {tokenizer_dir}",
                                "the tokenizer's metadata is wrong: re-import it with megakv-tokenizer")
            writer.add_documents(result.tokens, result.lengths)
            if len(result.tokens):
                max_token_id = max(max_token_id, int(result.tokens.max()))
            bar.wrote(len(result.lengths), len(result.tokens))
        summary.documents, summary.tokens = writer.num_documents, writer.num_tokens
        if shard is None or files:  # an array task whose share holds no file writes an empty part, not an error
            check_useful(summary, max_skip_fraction)
        summary.seconds = time.time() - started
        meta = {
            "documents": summary.documents, "tokens": summary.tokens, "dtype": dtype.name,
            "max_token_id": max_token_id, "vocab_size": info.vocab_size, "eos_id": info.eos_id,
            "tokenizer": {"dir": tokenizer_dir.name, "fingerprint": info.fingerprint},
            "inputs_fingerprint": fingerprint, "reader_version": READER_VERSION,
            "inputs": {"files": len(files), "bytes": summary.input_bytes,
                       "first_files": [str(f.path) for f in files[:20]]},
            "options": asdict(options), "shard": list(shard) if shard else None,
            "skipped": dict(summary.skipped), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        def commit_meta() -> None:
            remove_pair(mask_prefix(prefix))  # an overwritten QA output's loss mask must not apply to plain text
            write_meta(prefix, meta)

        writer.finalize(before_commit=commit_meta)
    summary.seconds = time.time() - started
    return summary


def _run(tasks: Iterator[_Task], workers: int) -> Iterator[_Result]:
    """Results in task order; at most 2 * workers tasks in flight (flat memory)."""
    if workers <= 1:
        for task in tasks:
            yield encode_task(task)
        return
    # spawn: a forked child would inherit the parent's threads and locks (tqdm, torch) in unknown states.
    # ProcessPoolExecutor, not multiprocessing.Pool: a dead worker raises BrokenProcessPool instead of hanging.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: deque = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(encode_task, task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
