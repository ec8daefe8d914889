"""JSON from files someone may have sent you (records, metadata, config.json).

Python's parser raises RecursionError on input nested deeply enough (200,000 '['), which escaped every
`except ValueError` as a traceback. Such input is invalid JSON like any other: the same ValueError.
"""

from __future__ import annotations

import json

TOO_DEEP = "JSON nested too deeply to read"


def parse_json(text: str | bytes):
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(TOO_DEEP) from None
