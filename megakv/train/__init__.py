"""Distributed pre-training with DeepSpeed (megakv-train): launch checks, DeepSpeed config generation, the
training loop, checkpoints and exports. The model itself knows nothing of this (megakv/model.py)."""

# Exit codes of megakv-train (documented in megakv/cli/train.py).
EXIT_OK = 0  # finished, or stopped by SIGTERM/SIGUSR1 after saving a checkpoint (status.json tells which)
EXIT_FAILED = 1  # an unexpected error (traceback on stderr)
EXIT_CONFIG = 2  # a configuration / launch / data mistake, reported before training when it can be
EXIT_DIVERGED = 3  # train.max_nonfinite_steps non-finite steps in a row; the last good checkpoint is kept
