"""Shared behaviour of the data command-line tools: clean errors, and cleanup on SIGTERM."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from megakv.config.errors import ConfigError
from megakv.data.errors import DataError


def run_cli(main: Callable[[], None]) -> int:
    """Run `main`; a DataError / ConfigError prints one clear line (no traceback) and exits with 2.

    SIGTERM (scancel, a SLURM time limit) becomes SystemExit, so `with` blocks remove temporary files
    instead of leaving them behind.
    """
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main()
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is a file, a directory, unreadable, or unwritable: the user's to fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def refuse_output_dir(output: str | Path, inputs: Iterable[str | Path], overwrite: bool) -> None:
    """Before any work: an output directory that holds something needs --overwrite (which replaces it), and
    is never one of the inputs or a directory holding one (replacing it would delete the input)."""
    target = Path(output).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or target in source.parents:
            raise DataError(f"the output {output} is {'the input' if target == source else 'a parent of the input'} "
                            f"{given}: writing it would delete the input", "choose another output directory")
    if target.exists() and not target.is_dir():
        raise DataError(f"the output {output} is a file", "choose a directory path for the output")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise DataError(f"the output directory {output} already exists and is not empty",
                        "choose a new directory, or pass --overwrite to replace it")
