"""Print `name==version` pins for the fast-moving dependencies at the bounds pyproject.toml allows.

`lowest`: each one's lower bound (`>=X`); `newest`: each one's upper bound (`<=X`). Used by
scripts/test_compat.sh; reads pyproject.toml only, so the bounds there stay the single source of truth.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (pyproject allows it): test_compat.sh installs tomli there
    import tomli as tomllib

FAST_MOVING = ("transformers", "tokenizers", "deepspeed")


def bound(requirement: str, operator: str) -> str | None:
    match = re.search(re.escape(operator) + r"\s*([0-9][0-9A-Za-z.]*)", requirement)
    return match.group(1) if match else None


def main(which: str) -> int:
    if which not in ("lowest", "newest"):
        print("usage: compat_pins.py lowest|newest", file=sys.stderr)
        return 2
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    operator = ">=" if which == "lowest" else "<="
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        if name in FAST_MOVING:
            version = bound(requirement, operator)
            if version is None:
                print(f"pyproject.toml: {requirement!r} has no '{operator}' bound; add one", file=sys.stderr)
                return 2
            print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
