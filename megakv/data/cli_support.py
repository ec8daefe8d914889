"""Shared behaviour of the data command-line tools: clean errors, and cleanup on SIGTERM."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

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
    except KeyboardInterrupt:
        print("interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
