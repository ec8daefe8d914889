"""Config and state-dict mapping between megakv and transformers' Llama / Mistral / Qwen2 / Qwen3.

The two models compute the same function with the all-own routing plan; only names differ:
  model.embed_tokens            <-> embed
  model.layers.{i}.input_layernorm / post_attention_layernorm <-> layers.{i}.attn_norm / mlp_norm
  model.layers.{i}.self_attn.*  <-> layers.{i}.attn.*   (q/k/v/o_proj, q_norm, k_norm)
  model.layers.{i}.mlp.*        <-> layers.{i}.mlp.*    (gate/up/down_proj)
  model.norm, lm_head           <-> norm, lm_head       (lm_head absent when embeddings are tied)
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from megakv.config.model import ModelConfig, RopeScalingConfig

HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}

# transformers' default `sliding_window` of the families that have one (MistralConfig, Qwen2Config, Qwen3Config).
SLIDING_WINDOW_DEFAULTS = {"mistral": 4096, "qwen2": 4096, "qwen3": 4096}

# (megakv prefix, transformers prefix); "{i}" is the layer index. The only place names are mapped.
_PREFIXES = [
    ("embed.", "model.embed_tokens."),
    ("norm.", "model.norm."),
    ("lm_head.", "lm_head."),
    ("layers.{i}.attn_norm.", "model.layers.{i}.input_layernorm."),
    ("layers.{i}.mlp_norm.", "model.layers.{i}.post_attention_layernorm."),
    ("layers.{i}.attn.", "model.layers.{i}.self_attn."),
    ("layers.{i}.mlp.", "model.layers.{i}.mlp."),
]


class UnsupportedCheckpoint(ValueError):
    """A transformers checkpoint megakv cannot represent exactly; the message says what and why."""


def _rules(to_hf: bool) -> list[tuple[str, str]]:
    rules = []
    for ours, theirs in _PREFIXES:
        source, target = (ours, theirs) if to_hf else (theirs, ours)
        rules.append(("^" + re.escape(source).replace(r"\{i\}", r"(\d+)"), target.replace("{i}", r"\1")))
    return rules


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    raise KeyError(key)


_TO_HF, _FROM_HF = _rules(to_hf=True), _rules(to_hf=False)


def state_dict_to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith("rope."):
            continue
        out[_rename(key, _TO_HF)] = tensor
    return out


def state_dict_from_hf(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in hf_state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the config
        if cfg.tie_embeddings and key == "lm_head.weight":
            continue  # the same tensor as the embedding
        try:
            out[_rename(key, _FROM_HF)] = tensor
        except KeyError:
            raise UnsupportedCheckpoint(
                f"unexpected weight {key!r} in the transformers checkpoint: megakv maps only "
                f"{', '.join(HF_CLASSES)} decoder weights") from None
    return out


def _hf_rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The rope settings transformers uses for a config.json (5.24, PreTrainedConfig.convert_rope_params_to_dict):
    a non-empty `rope_scaling` (4.x, or added by hand for context extension) replaces `rope_parameters` whole,
    even when that holds a rope_theta; a missing rope_theta is the top-level one, else 10000."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    return params


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScalingConfig]:
    params = _hf_rope_parameters(hf)
    theta, kind = float(params["rope_theta"]), params["rope_type"]
    if kind == "default":
        return theta, RopeScalingConfig()
    if kind == "llama3":
        return theta, RopeScalingConfig(
            type="llama3", factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    raise UnsupportedCheckpoint(f"rope type {kind!r} ({where}, which transformers applies) is not supported "
                                "(megakv implements default and llama3)")


def _some_layer_slides(hf: dict[str, Any], family: str) -> bool:
    """Whether transformers (5.24) gives any layer sliding-window attention, the window given. Mistral: every
    layer (MistralConfig ignores layer_types). Qwen2/Qwen3 (Qwen2Config/Qwen3Config.__post_init__ and the
    attention's `sliding_window if layer_type == "sliding_attention"`): only with use_sliding_window, and then the
    layers config.json's layer_types names "sliding_attention", or without layer_types those with index
    >= max_window_layers (default 28)."""
    if family == "mistral":
        return True
    if not hf.get("use_sliding_window", False):
        return False
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = int(hf.get("max_window_layers", 28))
        return int(hf["num_hidden_layers"]) > first
    return "sliding_attention" in layer_types


# The shape keys every supported config.json holds (transformers writes them all).
_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A transformers config (as a dict, e.g. config.json; `source` names it in errors) -> ModelConfig.
    Refuses what it cannot match."""
    family = hf.get("model_type")
    if family not in HF_CLASSES:
        raise UnsupportedCheckpoint(
            f"model_type {family!r} is not supported: megakv imports {', '.join(HF_CLASSES)} checkpoints")
    missing = [key for key in _REQUIRED_HF_KEYS if hf.get(key) is None]
    if missing:
        raise ValueError(f"{source} has no {', '.join(missing)}, which a {family} model needs. Fix: use the "
                         "config.json that save_pretrained wrote together with these weights")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedCheckpoint(f"hidden_act {hf.get('hidden_act')!r}: megakv's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise UnsupportedCheckpoint("mlp_bias=true is not supported (megakv's MLP has no bias)")
    max_len = int(hf.get("max_position_embeddings", 2048))
    # A config.json without the key gets the config class's default (4096 in transformers 5.24 for all three
    # families; Qwen2/Qwen3 use it only with use_sliding_window): null is what says "no window".
    window = hf.get("sliding_window", SLIDING_WINDOW_DEFAULTS.get(family))
    uses_window = window is not None and _some_layer_slides(hf, family)
    if uses_window and window < max_len:
        # megakv has no sliding-window attention; within the window both are the same function.
        warnings.warn(f"sliding_window {window} < max_position_embeddings {max_len}: megakv has no sliding-window "
                      f"attention, so the imported model's context (max_seq_len, and max_position_embeddings of its "
                      f"exports) is {window}, where the two attentions agree", stacklevel=2)
        max_len = int(window)
    theta, scaling = _rope_from_hf(hf)
    n_heads = int(hf["num_attention_heads"])
    attention_bias = bool(hf.get("attention_bias", False))
    head_dim = hf.get("head_dim")
    eos = hf.get("eos_token_id")  # an int or a list (all of them end a sequence): kept as given
    cfg = ModelConfig(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim) if head_dim else None,
        ffn_hidden=int(hf["intermediate_size"]),
        max_seq_len=max_len,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qk_norm=family == "qwen3",
        qkv_bias=family == "qwen2" or (family in ("llama", "qwen3") and attention_bias),
        out_bias=family in ("llama", "qwen3") and attention_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=(list(eos) or None) if isinstance(eos, (list, tuple)) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )
    cfg.validate()
    return cfg


def hf_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for the transformers config class of `cfg.family`."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.type == "llama3":
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.resolved_head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, attention_dropout=0.0,
    )
    if cfg.family in ("llama", "qwen3"):
        kwargs["attention_bias"] = cfg.qkv_bias
    if cfg.family == "mistral":
        kwargs["sliding_window"] = None
    if cfg.family in ("qwen2", "qwen3"):
        kwargs["use_sliding_window"] = False
    return kwargs


def hf_config_from_model_config(cfg: ModelConfig):
    import transformers

    config_class = getattr(transformers, HF_CLASSES[cfg.family][0])
    hf_cfg = config_class(**hf_config_kwargs(cfg))
    hf_cfg.architectures = [HF_CLASSES[cfg.family][1]]
    return hf_cfg
