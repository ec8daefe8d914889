"""The files of a DeepSpeed checkpoint that megakv reads itself (pipeline_files, tensor_files, universal), and
the one way it opens them: the weights-only unpickler with DeepSpeed's and numpy's globals allowed
(safe_load.load_weights_only), so a file that needs anything else is refused with an UnsafeFileError naming it.

  LAYER_FILE  layer_XX-model_TT-model_states.pt: a pipeline layer's module weights (spec index, tensor rank)
  STAGE_FILE  mp_rank_MM_model_states.pt: a model-parallel rank's model states (param_shapes, module, ...)
  OPTIM_FILE  [bf16_]zero_pp_rank_DD_mp_rank_MM_optim_states.pt: a (data rank, model-parallel rank)'s part of
              the flat fp32 masters and the optimizer state
"""

from __future__ import annotations

import re
from pathlib import Path

from megakv.safe_load import deepspeed_globals, load_weights_only, numpy_globals

LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
STAGE_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def load_deepspeed_file(path: str | Path):
    """What a DeepSpeed checkpoint file holds, read by the weights-only unpickler (UnsafeFileError on refusal)."""
    return load_weights_only(path, deepspeed_globals() + numpy_globals())
