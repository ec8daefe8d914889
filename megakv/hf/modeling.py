"""megakv as a transformers model: `AutoModelForCausalLM.from_pretrained(dir, retain="every:2")`.

MegaKVConfig (model_type "megakv") carries the megakv ModelConfig fields plus `retain`, the deployment
plan (`all`, `every:K`, `0,3,5`), which any `from_pretrained(..., retain=...)` call or a later
`model.config.retain = ...` changes. MegaKVForCausalLM wraps megakv's own MegaKVModel (weights are
stored under `model.` + megakv's names), so the two compute the same function by construction.

Cache: `SharedDepthCache` (megakv/hf/cache.py), a subclass of transformers' public `Cache` holding one
`DynamicLayer` per retained layer: the cache holds only the retained layers, and a non-retained layer never
runs its K/V projections. The forward takes the cache under either name transformers has used
(`past_key_values`, `cache` since 5.24) and returns it under the name the installed version declares.

Loading: importing this module registers the classes with AutoConfig / AutoModelForCausalLM. An
exported directory also carries `auto_map` and a two-line shim module (`modeling_megakv.py`) that imports
these classes from the installed megakv package, so a process that has not imported megakv loads it with
`trust_remote_code=True` (the shim holds no model code: the code that runs is the installed megakv).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as hf_init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from megakv.config.model import ModelConfig, RopeScalingConfig
from megakv.data.tokenizer import METADATA_FILE as TOKENIZER_METADATA_FILE
from megakv.data.tokenizer import checked_source
from megakv.hf.cache import SharedDepthCache
from megakv.inference.engine import forward_layers, resolve_plan
from megakv.inference.padding import attention_mask as boolean_attention_mask
from megakv.inference.padding import positions_from_valid
from megakv.model import MegaKVModel, RMSNorm, RotaryEmbedding, rope_inverse_frequencies
from megakv.routing import RoutingPlan

MODEL_TYPE = "megakv"
# The output field generate() reads the cache from: `cache` since transformers 5.24, `past_key_values` before.
_OUTPUT_FIELDS = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
OUTPUT_CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"
SHIM_MODULE = "modeling_megakv"
SHIM_SOURCE = '''"""Loader shim: the megakv model code lives in the installed `megakv` package (pip install megakv)."""

from megakv.hf.modeling import MegaKVConfig, MegaKVForCausalLM  # noqa: F401
'''


class MegaKVConfig(PreTrainedConfig):
    """megakv's ModelConfig as a transformers config, plus the deployment plan `retain`."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]
    # transformers' generic names for the fields generation and cache utilities read.
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_hidden",
                     "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps",
                     "initializer_range": "init_std"}

    family: str = "llama"
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int | None = None
    ffn_hidden: int = 704
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling_config: dict | None = None  # megakv RopeScalingConfig fields; None = no scaling
    norm_eps: float = 1e-6
    qk_norm: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # several ids: any of them ends a sequence
    pad_token_id: int | None = None
    use_cache: bool = True
    retain: str = "all"  # deployment plan: all | every:K | explicit retained layers "0,3,5"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.retain = normalise_retain(self.retain)
        resolve_plan(self.retain, self.n_layers)  # fail at load time on a bad plan, not at the first forward

    def to_model_config(self) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(ModelConfig)} - {"rope_scaling"}
        values = {name: getattr(self, name) for name in names}
        scaling = RopeScalingConfig(**self.rope_scaling_config) if self.rope_scaling_config else RopeScalingConfig()
        return ModelConfig(rope_scaling=scaling, **values)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, retain: str = "all", **kwargs) -> MegaKVConfig:
        values = dataclasses.asdict(cfg)
        scaling = values.pop("rope_scaling")
        return cls(rope_scaling_config=scaling if scaling["type"] != "none" else None, retain=retain,
                   tie_word_embeddings=cfg.tie_embeddings, **values, **kwargs)

    @property
    def plan(self) -> RoutingPlan:
        return resolve_plan(self.retain, self.n_layers)


def normalise_retain(retain) -> str:
    """Accept a string or a list of layers; store a string (config.json stays readable)."""
    if isinstance(retain, (list, tuple)):
        return ",".join(str(int(layer)) for layer in retain)
    if not isinstance(retain, str):
        raise ValueError(f"retain must be 'all', 'every:K' or a list of layers like '0,3,5', got {retain!r}")
    return retain.strip()


class MegaKVPreTrainedModel(PreTrainedModel):
    config_class = MegaKVConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Only for tensors the checkpoint did not provide (transformers' init helpers skip loaded ones).
        if isinstance(module, RotaryEmbedding):
            hf_init.copy_(module.inv_freq, rope_inverse_frequencies(self.config.to_model_config()))
        elif isinstance(module, RMSNorm):
            hf_init.ones_(module.weight)
        else:
            super()._init_weights(module)


class MegaKVForCausalLM(MegaKVPreTrainedModel, GenerationMixin):
    def __init__(self, config: MegaKVConfig):
        super().__init__(config)
        config.retain = normalise_retain(config.retain)
        _ = config.plan  # from_pretrained(..., retain=...) sets retain after the config's own checks
        self.model = MegaKVModel(config.to_model_config())
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save, plus what makes the directory load anywhere: the loader shim and `auto_map`
        pointing at it (transformers dropped the shim, and after a `trust_remote_code` load copied megakv's whole
        modeling module instead, a frozen copy of the code). The stored `retain` must fit the model."""
        check_retain_fits(self.config.retain, self.model.cfg.n_layers)
        self._auto_class = self.config._auto_class = None  # no copy of the defining module
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        directory = Path(save_directory)
        (directory / f"{SHIM_MODULE}.py").write_text(SHIM_SOURCE)
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        config["auto_map"] = {"AutoConfig": f"{SHIM_MODULE}.MegaKVConfig",
                              "AutoModelForCausalLM": f"{SHIM_MODULE}.MegaKVForCausalLM"}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.embed if self.model.lm_head is None else self.model.lm_head

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, cache: Cache | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        for unsupported, why in (("output_attentions", "attention runs through fused kernels that keep no weights"),
                                 ("output_hidden_states", "layers run as one loop that keeps no intermediate "
                                  "states")):
            asked = kwargs[unsupported] if kwargs.get(unsupported) is not None else getattr(self.config, unsupported,
                                                                                               False)
            if asked:
                raise ValueError(f"{unsupported}=True is not supported by megakv's model ({why}); it would be "
                                 "left empty. Fix: drop it, or load the to-hf export (a plain Llama/Qwen) for it")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not both")
        plan = self.config.plan
        use_cache = self.config.use_cache if use_cache is None else use_cache
        shared_cache = resolve_cache(cache if cache is not None else past_key_values, plan, use_cache)

        hidden = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, q_len = hidden.shape[:2]
        past_len = shared_cache.get_seq_length() if shared_cache is not None else 0
        key_valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("megakv takes a 2-D padding mask (batch, past + new tokens), "
                                 f"got shape {tuple(attention_mask.shape)}")
            key_valid = attention_mask.bool()
        if position_ids is None:
            if key_valid is not None:
                position_ids = positions_from_valid(key_valid)[:, -q_len:]
            else:
                position_ids = torch.arange(past_len, past_len + q_len, device=hidden.device).expand(batch, q_len)

        extend = None
        if shared_cache is not None:
            extend = lambda layer, kv: shared_cache.update(kv[0], kv[1], layer)
        hidden = forward_layers(self.model, plan, hidden, position_ids,
                                boolean_attention_mask(key_valid, q_len), extend)
        logits = self.model.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        # transformers renamed the output field past_key_values -> cache (5.24); generate() reads whichever
        # its version declares, and feeds that cache back into the next forward.
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{OUTPUT_CACHE_FIELD: shared_cache})
        return_dict = kwargs.get("return_dict")
        return output if return_dict is None or return_dict else output.to_tuple()


def resolve_cache(incoming: Cache | None, plan: RoutingPlan, use_cache: bool) -> SharedDepthCache | None:
    """The shared-depth cache to read and extend, whatever name or class transformers handed over.

    `generate()` builds an empty DynamicCache for every model before the first forward; megakv swaps it for
    a SharedDepthCache (storage for the retained layers only) and returns that, which generate then passes
    back on every later step. A filled cache of another kind cannot be reinterpreted and is refused.
    """
    if isinstance(incoming, SharedDepthCache):
        if incoming.plan != plan:
            raise ValueError(f"this cache was built for retained layers {list(incoming.retained)}, but the model now "
                             f"retains {list(plan.retained)} (config.retain changed mid-generation): start a new cache")
        return incoming
    if incoming is None:
        return SharedDepthCache(plan) if use_cache else None
    if isinstance(incoming, DynamicCache) and incoming.get_seq_length() == 0:
        return SharedDepthCache(plan)
    raise ValueError(f"megakv models keep their own cache (SharedDepthCache, retained layers only); got a "
                     f"{type(incoming).__name__} holding {incoming.get_seq_length()} positions. Pass the cache a "
                     "megakv model returned, or none; static/quantized cache_implementation is not supported")


def register_with_auto_classes() -> None:
    """Make model_type "megakv" known to AutoConfig / AutoModelForCausalLM (idempotent)."""
    AutoConfig.register(MODEL_TYPE, MegaKVConfig, exist_ok=True)
    AutoModelForCausalLM.register(MegaKVConfig, MegaKVForCausalLM, exist_ok=True)


register_with_auto_classes()


def hf_model_from_megakv(model: MegaKVModel, retain: str = "all") -> MegaKVForCausalLM:
    """A transformers wrapper sharing `model`'s parameters (no copy)."""
    config = MegaKVConfig.from_model_config(model.cfg, retain=normalise_retain(retain))
    with torch.device("meta"):
        wrapper = MegaKVForCausalLM(config)
    wrapper.model = model
    return wrapper.eval()


def export_for_transformers(model_dir: str | Path, out_dir: str | Path, retain: str = "all",
                            dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """A megakv model directory -> a transformers directory.

    Holds config.json (model_type "megakv", `retain`, auto_map), generation_config.json,
    model.safetensors, the tokenizer files when the model has a tokenizer, and the loader shim.
    (A training run becomes a model directory first: `megakv-convert from-checkpoint RUN_DIR OUT`.)
    """
    from megakv.hf.checkpoint import (
        copy_tokenizer_files,
        read_generation_config,
        special_token_ids,
        write_generation_config,
    )
    from megakv.model_dir import (
        CONFIG_FILE,
        WEIGHTS_FILE,
        is_model_dir,
        load_model,
        stored_dtype,
        tokenizer_path,
        write_directory_atomically,
    )

    if not is_model_dir(model_dir):
        raise ValueError(f"{model_dir} is not a megakv model directory ({CONFIG_FILE} + {WEIGHTS_FILE}): export a "
                         "training run with `megakv-convert from-checkpoint RUN_DIR OUT_DIR` first, or import a "
                         "transformers checkpoint with `megakv-convert from-hf`")
    # Without a dtype, the weights' own (a bf16 model stays bf16, as `to-hf` keeps it).
    model, tokenizer_dir = load_model(model_dir, "cpu", dtype or stored_dtype(model_dir)), tokenizer_path(model_dir)
    retain = check_retain_fits(normalise_retain(retain), model.cfg.n_layers)  # before anything is written
    wrapper = hf_model_from_megakv(model, retain)
    token_ids = special_token_ids(model.cfg, tokenizer_dir)
    for name, value in token_ids.items():
        setattr(wrapper.config, name, value)
    wrapper.config.architectures = [MegaKVForCausalLM.__name__]
    if dtype is not None:
        wrapper.config.dtype = dtype

    def fill(tmp: Path) -> None:
        wrapper.save_pretrained(tmp)  # with the loader shim and auto_map
        write_generation_config(tmp, token_ids, read_generation_config(model_dir))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
            # megakv's tokenizer metadata too, so megakv's own tools load the export's tokenizer as before.
            if (Path(tokenizer_dir) / TOKENIZER_METADATA_FILE).is_file():
                shutil.copy2(checked_source(Path(tokenizer_dir) / TOKENIZER_METADATA_FILE, Path(tokenizer_dir)),
                             tmp / TOKENIZER_METADATA_FILE)

    return write_directory_atomically(out_dir, fill, overwrite)


def check_retain_fits(retain: str, n_layers: int) -> str:
    """The retain an export stores must describe this model: `every:K` with K beyond its depth is refused.

    (Evaluation may sweep every:1..4 over any model; a stored default that silently means "layer 0 only"
    is a mistake.)
    """
    resolve_plan(retain, n_layers)
    text = retain.strip().lower()
    if text.startswith("every:") and int(text.split(":", 1)[1]) > n_layers:
        raise ValueError(f"bad retention spec {retain!r}: K must be at most the model's {n_layers} layers "
                         f"(every:{n_layers} already keeps layer 0 alone)")
    return retain


def is_megakv_hf_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        loaded = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON ({e})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{config} holds a JSON {type(loaded).__name__}, not an object of settings")
    return loaded.get("model_type") == MODEL_TYPE


def stored_retain(path: str | Path) -> str:
    """The `retain` an exported directory's config.json holds (what from_pretrained uses by default)."""
    return normalise_retain(json.loads((Path(path) / "config.json").read_text()).get("retain", "all"))


def load_megakv_hf_dir(path: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> tuple[MegaKVModel, str]:
    """An exported directory -> (megakv model, its retain setting), without going through transformers."""
    from megakv.hf.checkpoint import read_hf_weights
    from megakv.model_dir import model_from_state_dict

    config = MegaKVConfig.from_pretrained(path)
    cfg = config.to_model_config()
    state = {key.removeprefix("model."): value for key, value in read_hf_weights(path).items()}

    return model_from_state_dict(cfg, state, device, dtype, source=str(path)), config.retain


__all__ = ["MODEL_TYPE", "MegaKVConfig", "MegaKVForCausalLM", "export_for_transformers", "hf_model_from_megakv",
           "is_megakv_hf_dir", "load_megakv_hf_dir", "register_with_auto_classes", "stored_retain"]
