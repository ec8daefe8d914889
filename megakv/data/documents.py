"""One raw input record -> the document text, or the reason it is skipped.

Bad records never crash a job and never vanish silently: each is skipped and counted by reason, or, in
strict mode, reported with its file and line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from megakv.json_input import TOO_DEEP, parse_json

INVALID_UTF8 = "invalid_utf8"
EMPTY = "empty"  # empty or whitespace-only text
MISSING_FIELD = "missing_field"  # the text field is absent or null
NOT_JSON = "not_json"  # a jsonl line that is not a JSON object
NOT_TEXT = "not_text"  # the text field holds a number, list, ...
TOO_LARGE = "too_large"  # one record above the size bound (tokenizing it would take ~60x its size in memory)


class Skip(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def unpaired_surrogate(text: str) -> int | None:
    """Where `text` holds a lone surrogate (a JSON "\\ud800" escape decodes to one), which no tokenizer can
    encode; None when it is valid Unicode."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _checked(text: str) -> str:
    at = unpaired_surrogate(text)
    if at is not None:
        raise Skip(INVALID_UTF8, f"unpaired surrogate at character {at}")
    if not text.strip():
        raise Skip(EMPTY, "empty or whitespace-only text")
    return text


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip(INVALID_UTF8, f"byte {raw[e.start]:#04x} at offset {e.start} is not valid UTF-8") from None


def record_text(fmt: str, payload: object, text_key: str) -> str:
    """The text of one record of format `fmt` ("jsonl", "txt", "parquet"); raises Skip if unusable."""
    if fmt == "txt":
        return _checked(_decode(payload))  # type: ignore[arg-type]
    if fmt == "jsonl":
        line = _decode(payload)  # type: ignore[arg-type]
        if not line.strip():
            raise Skip(EMPTY, "blank line")
        try:
            obj = parse_json(line)
        except ValueError as e:
            raise Skip(NOT_JSON, TOO_DEEP if str(e) == TOO_DEEP else f"not JSON ({e.args[0] if e.args else e})"
                       ) from None
        if not isinstance(obj, dict):
            raise Skip(NOT_JSON, f"a JSON {type(obj).__name__}, not an object")
        payload = obj.get(text_key)
        if payload is None:
            if text_key in obj:
                raise Skip(MISSING_FIELD, f"{text_key!r} is null")
            shown = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
            raise Skip(MISSING_FIELD, f"no {text_key!r} field (the record has {shown or 'no fields'})")
    elif payload is None:  # parquet
        raise Skip(MISSING_FIELD, f"no {text_key!r} value")
    if not isinstance(payload, str):
        raise Skip(NOT_TEXT, f"{text_key!r} holds a {type(payload).__name__}, not a string")
    return _checked(payload)


def iter_texts(files, text_key: str = "text", txt_unit: str = "document", skipped: Counter | None = None
               ) -> Iterator[str]:
    """The usable texts of `files` (sources.InputFile), in order; bad records are counted in `skipped`."""
    from megakv.data.sources import RecordReader

    for file in files:
        for _, payload in RecordReader(file, text_key, txt_unit):
            try:
                yield record_text(file.format, payload, text_key)
            except Skip as s:
                if skipped is not None:
                    skipped[s.reason] += 1
