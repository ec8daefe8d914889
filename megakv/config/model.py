"""Model architecture settings (the `model:` section; also the whole `config.yaml` of a model directory)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megakv.config.errors import ConfigError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class RopeScalingConfig:
    # "none" or "llama3" (the frequency-dependent scaling of Llama 3.1+ checkpoints).
    type: str = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    """A decoder-only transformer of the Llama / Mistral / Qwen2 / Qwen3 family."""

    family: str = "llama"  # Hugging Face architecture used for export: llama | mistral | qwen2 | qwen3
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int | None = None  # None: d_model // n_heads
    ffn_hidden: int = 704  # SwiGLU inner width
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-6
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama's attention_bias)
    out_bias: bool = False  # bias on the output projection (Llama's attention_bias)
    tie_embeddings: bool = False
    init_std: float = 0.02
    bos_token_id: int | None = None
    # One id, or several that all end a sequence (transformers' form: Llama-3-Instruct lists
    # end_of_text, eom and eot); an import keeps them all, an export writes them back.
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence (empty when none is set)."""
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else (self.eos_token_id,)

    def validate(self, prefix: str = "model") -> None:
        def need(ok: bool, name: str, problem: str, fix: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), problem, fix)

        need(self.family in FAMILIES, "family", f"unknown family, expected one of {FAMILIES}",
             "pick the Hugging Face architecture to export to")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            need(getattr(self, name) > 0, name, "must be positive", "set a positive integer")
        need(self.n_kv_heads <= self.n_heads, "n_kv_heads", f"exceeds n_heads={self.n_heads}",
             "use n_kv_heads <= n_heads (grouped-query attention)")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"n_heads % n_kv_heads != 0 ({self.n_heads} % {self.n_kv_heads})",
             "choose n_kv_heads dividing n_heads")
        if self.head_dim is None:
            need(self.d_model % self.n_heads == 0, "d_model", f"not divisible by n_heads={self.n_heads}",
                 "make d_model a multiple of n_heads or set head_dim explicitly")
        else:
            need(self.head_dim > 0, "head_dim", "must be positive", "set a positive integer or null")
        need(self.resolved_head_dim % 2 == 0, "head_dim", "rotary embeddings need an even head_dim",
             "choose an even head_dim")
        need(self.rope_theta > 0, "rope_theta", "must be positive", "typical values: 10000, 500000, 1e6")
        need(self.rope_scaling.type in ("none", "llama3"), "rope_scaling",
             f"rope_scaling.type {self.rope_scaling.type!r} is not supported", "use 'none' or 'llama3'")
        scaling = self.rope_scaling
        if scaling.type == "llama3":  # a zero factor or equal low/high factors divide by zero: NaN losses
            need(scaling.factor > 0 and scaling.original_max_position_embeddings > 0, "rope_scaling",
                 f"llama3 needs a positive factor and original_max_position_embeddings (factor {scaling.factor}, "
                 f"original_max_position_embeddings {scaling.original_max_position_embeddings})",
                 "copy rope_scaling from the checkpoint's config.json (Llama 3.1: factor 8, 8192)")
            need(0 < scaling.low_freq_factor < scaling.high_freq_factor, "rope_scaling",
                 f"llama3 needs 0 < low_freq_factor < high_freq_factor (got {scaling.low_freq_factor}, "
                 f"{scaling.high_freq_factor})", "Llama 3.1 uses low_freq_factor 1 and high_freq_factor 4")
        need(self.norm_eps > 0, "norm_eps", "must be positive", "typical values: 1e-5, 1e-6")
        need(self.init_std > 0, "init_std", "must be positive", "typical value: 0.02")
        if self.family in ("llama", "mistral"):
            need(not self.qk_norm, "qk_norm", f"family {self.family} has no q/k norm",
                 "set family=qwen3 to export a model with q/k norm")
        if self.family == "qwen3":  # transformers' Qwen3 always applies q/k norm: an export would differ
            need(self.qk_norm, "qk_norm", "family qwen3 always has q/k norm",
                 "set qk_norm=true, or family=llama (no q/k norm, attention_bias) or qwen2 (q/k/v bias)")
        if self.family == "mistral":
            need(not (self.qkv_bias or self.out_bias), "qkv_bias", "mistral has no attention bias",
                 "set family=qwen2 (q/k/v bias) or llama (attention_bias)")
        if self.family == "qwen2":
            need(self.qkv_bias and not self.out_bias, "qkv_bias",
                 "qwen2 always has q/k/v bias and never an output-projection bias",
                 "set qkv_bias=true and out_bias=false")
        if self.family in ("llama", "qwen3"):
            need(self.qkv_bias == self.out_bias, "qkv_bias",
                 f"{self.family}'s attention_bias covers q/k/v and output together (out_bias={self.out_bias})",
                 "set qkv_bias and out_bias to the same value, or use family=qwen2 for q/k/v bias only")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = self.eos_token_ids if name == "eos_token_id" else (getattr(self, name),)
            need(all(i is None or 0 <= i < self.vocab_size for i in ids), name,
                 f"outside the vocabulary [0, {self.vocab_size})", "use the tokenizer's id or null")
        need(self.eos_token_id != [], "eos_token_id", "an empty list", "list at least one id, or use null")
