"""Inference with a KV cache shared across depth: prefill, incremental decode, sampling.

Models are found by megakv.model_paths.resolve_model (a model directory, a run directory, a transformers one).

  from megakv.inference import InferenceEngine, SamplingConfig
  from megakv.model_paths import resolve_model
  model, tokenizer_dir = resolve_model("models/demo")
  out = InferenceEngine(model, retain="every:2").generate([[5, 17, 42]], max_new_tokens=32)
  out.tokens, out.stats.cache_bytes_per_token, out.stats.ttft_s, out.stats.decode_tokens_per_s
  # elastic retention: all layers for the first 256 new tokens, then every:2, then every:4
  InferenceEngine(model, "all").generate([[5, 17, 42]], 1024, shrink_at=[(256, "every:2"), (512, "every:4")])
"""

from megakv.inference.cache import RetainedKVCache, kv_bytes_per_token
from megakv.inference.engine import (
    GenerationOutput,
    GenerationStats,
    InferenceEngine,
    RetainChange,
    forward_layers,
    resolve_plan,
)
from megakv.inference.sampling import SamplingConfig, sample_next_token

__all__ = ["GenerationOutput", "GenerationStats", "InferenceEngine", "RetainChange", "RetainedKVCache",
           "SamplingConfig", "forward_layers", "kv_bytes_per_token", "resolve_plan",
           "sample_next_token"]
