"""DeepSpeed's ds_to_universal with every `torch.load` forced through the weights-only unpickler.

ds_to_universal loads with weights_only=False, and besides a checkpoint's `.pt` files it opens files by name
prefix and by paths built from parameter names. `check_deepspeed_dir` vets those beforehand; this second
guard (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD, with DeepSpeed's and numpy's globals allowed) makes any file it
missed fail to load instead of running code. Run as `python -m megakv.train.safe_ds_to_universal ARGS`.
"""

from __future__ import annotations

import runpy
import sys


def main(argv: list[str]) -> None:
    from megakv.safe_load import forced_weights_only

    sys.argv = ["ds_to_universal", *argv]
    source = argv[argv.index("--input_folder") + 1] if "--input_folder" in argv else "the checkpoint"
    with forced_weights_only(source):  # the variable and the allow-list reach the worker processes it forks too
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
