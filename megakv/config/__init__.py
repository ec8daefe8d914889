"""Typed configuration: OmegaConf structured dataclasses, nested by concern.

`load_config(path, overrides)` merges defaults <- YAML file <- `key=value` overrides, converts to the
dataclasses and validates everything before any process group or file is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megakv.config.checkpoint import CheckpointConfig
from megakv.config.data import DataConfig
from megakv.config.errors import UNSET, ConfigError
from megakv.config.logging import LoggingConfig
from megakv.config.model import ModelConfig, RopeScalingConfig
from megakv.config.optim import OptimConfig
from megakv.config.parallel import ParallelConfig
from megakv.config.routing import RoutingConfig
from megakv.config.train import DebugConfig, TrainConfig
from megakv.config.validation import ValidationConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DebugConfig",
    "LoggingConfig",
    "MegaKVConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RopeScalingConfig",
    "RoutingConfig",
    "TrainConfig",
    "ValidationConfig",
    "flat_settings",
    "load_config",
    "load_section",
    "save_config",
    "to_yaml",
]

T = TypeVar("T")


@dataclass
class MegaKVConfig:
    """A whole run. Each section validates itself; `validate` adds the checks that span sections. Checks
    that need the world size or the file system run at launch (megakv/train/preflight.py)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    @property
    def seq_len(self) -> int:
        """Tokens per training sample: data.seq_len, else the model's context (model.max_seq_len)."""
        return self.data.seq_len if self.data.seq_len is not None else self.model.max_seq_len

    def validate(self) -> None:
        self.model.validate("model")
        self.routing.validate(self.model.n_layers, "routing")
        if self.data.datasets:  # a config may describe only a model; megakv-train requires data at launch
            self.data.validate("data")
        self.optim.validate("optim")
        self.train.validate("train")
        self.parallel.validate("parallel")
        self.checkpoint.validate("checkpoint")
        self.logging.validate("logging")
        self.validation.validate(self.model.n_layers, "validation")
        if self.data.seq_len is not None and self.data.seq_len > self.model.max_seq_len:
            raise ConfigError("data.seq_len", self.data.seq_len,
                              f"longer than the model's context (model.max_seq_len={self.model.max_seq_len}): "
                              "positions beyond it were never trained", "lower data.seq_len, or null for the context")
        if (self.data.datasets and self.validation.every > 0 and self.data.valid_fraction == 0
                and not self.data.valid_datasets):  # validating on nothing would log NaN losses
            raise ConfigError("validation.every", self.validation.every, "there is no validation data: "
                              "data.valid_fraction is 0 and data.valid_datasets is empty",
                              "hold out data (data.valid_fraction, e.g. 0.01) or list data.valid_datasets, "
                              "or set validation.every=0")
        if (self.data.reset_attention_mask or self.data.reset_position_ids) and self.parallel.pipeline > 1:
            name = "reset_attention_mask" if self.data.reset_attention_mask else "reset_position_ids"
            raise ConfigError(f"data.{name}", True, "document-boundary masking is not implemented for pipeline "
                              f"parallelism (parallel.pipeline={self.parallel.pipeline})",
                              "use parallel.pipeline=1 (tensor and data parallelism support it), or turn it off")
        horizon = self.optim.decay_steps or self.train.steps
        if self.optim.schedule == "wsd" and self.optim.warmup_steps + self.optim.wsd_decay_steps > horizon:
            raise ConfigError("optim.wsd_decay_steps", self.optim.wsd_decay_steps,
                              f"warm-up ({self.optim.warmup_steps}) plus the decay phase exceed the decay horizon "
                              f"of {horizon} steps (optim.decay_steps, else train.steps)",
                              "shorten the decay phase, e.g. to 10-20% of the horizon")
        if self.optim.warmup_steps > self.train.steps:
            raise ConfigError("optim.warmup_steps", self.optim.warmup_steps,
                              f"longer than the run (train.steps={self.train.steps})",
                              "use a warm-up of a few percent of train.steps")


def _lists_from_scalars(schema: DictConfig, source: Any) -> None:
    """Where the schema expects a list and a source gives one value (data.datasets=a/b), make it [a/b]."""
    if not isinstance(source, DictConfig):
        return
    for key in list(source.keys()):
        if key not in schema:
            continue  # a misspelt key: the merge reports it
        expected, given = schema._get_node(key), source._get_node(key)
        if isinstance(expected, ListConfig) and not isinstance(given, (ListConfig, DictConfig)):
            value = given._value()
            if value is not None and not OmegaConf.is_missing(source, key):
                source[key] = [value]
        elif isinstance(expected, DictConfig) and isinstance(given, DictConfig):
            _lists_from_scalars(expected, given)


def _merge(schema: type[T], sources: list[Any]) -> T:
    try:
        structured = OmegaConf.structured(schema)
        for source in sources:
            _lists_from_scalars(structured, source)
        merged = OmegaConf.merge(structured, *sources)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        value = getattr(e, "value", None)
        raise ConfigError(str(key), UNSET if value is None else value, str(e).splitlines()[0],
                          "check the key's spelling and type against megakv/config/") from None


def _read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("<file>", str(path), "config file not found", "pass the path of a YAML config")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, opened = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and opened is not None:
            problem += f" ({context} at line {opened.line + 1}, column {opened.column + 1})"
        raise ConfigError("<file>", str(path), f"not valid YAML{where}: {problem}",
                          "fix the YAML there (indentation, a missing ':' or closing bracket, an unquoted "
                          "special character)") from None
    except UnicodeDecodeError as e:
        raise ConfigError("<file>", str(path), f"not a text file ({e.reason} at byte {e.start})",
                          "pass the path of a YAML config") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError("<file>", str(path), f"holds a YAML {type(loaded).__name__}, not a mapping of sections",
                          "write sections as 'model:', 'train:' ... at the top level")
    return loaded


def _override_sources(overrides: list[str] | None) -> list[Any]:
    """Consecutive key=value items as one dotlist, each YAML file (no '=', a .yaml/.yml name) as its own."""
    sources: list[Any] = []
    pending: list[str] = []
    for item in overrides or []:
        if "=" not in item and item.endswith((".yaml", ".yml")):
            if pending:
                sources.append(_dotlist(pending))
                pending = []
            sources.append(_read_yaml(item))
        else:
            pending.append(item)
    return [*sources, _dotlist(pending)]


def _dotlist(overrides: list[str] | None) -> Any:
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError("<override>", item, "overrides must look like key=value (or name a .yaml file)",
                              "e.g. model.n_layers=8 routing.q_cross=0.5")
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:  # the value after '=' is parsed as YAML
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError("<override>", item, f"the value is not valid YAML ({problem})",
                              "close the bracket or quote the value, e.g. data.datasets=[a,b]") from None
    return OmegaConf.from_dotlist(overrides)


MODEL_DIR_CONFIG = "config.yaml"  # the model section of a megakv model directory (megakv/model_dir.py)


def _model_of_init_dir(sources: list[Any]) -> Any:
    """checkpoint.init_from=DIR supplies the model section (DIR/config.yaml); any model.* the user set must
    agree with it. Returns a source to merge first, or None when init_from is not set."""
    try:
        given = OmegaConf.merge(*sources)
    except OmegaConfBaseException:
        return None  # the typed merge that follows names the mistake
    checkpoint = OmegaConf.select(given, "checkpoint", default=None)
    if isinstance(checkpoint, DictConfig) and OmegaConf.is_missing(checkpoint, "init_from"):  # a recipe's `???`
        raise ConfigError("checkpoint.init_from", "???", "this recipe fine-tunes a model and names none",
                          "pass checkpoint.init_from=MODEL_DIR (megakv-convert from-hf HF_DIR MODEL_DIR makes one)")
    init_from = OmegaConf.select(given, "checkpoint.init_from", default=None)
    if not init_from:
        return None
    path = Path(str(init_from)) / MODEL_DIR_CONFIG
    if (path.parent / "checkpoints").is_dir():  # a megakv-train run directory also holds a config.yaml
        raise ConfigError("checkpoint.init_from", str(init_from), "a training run directory, not a model directory",
                          f"export its weights first: megakv-convert from-checkpoint {init_from} MODEL_DIR, then "
                          "checkpoint.init_from=MODEL_DIR (to continue the run itself: --resume auto)")
    run_dir = Path(str(OmegaConf.select(given, "train.run_dir", default=None) or TrainConfig.run_dir))
    if path.is_file():
        model = load_section(path, ModelConfig, "model")
    elif not Path(str(init_from)).exists() and _fine_tuned_from(run_dir, str(init_from)):
        # A requeued fine-tune whose base model directory was removed: it resumes from its own checkpoints,
        # whose model section its config.yaml holds (a fresh start there is refused: the directory has checkpoints).
        path = run_dir / MODEL_DIR_CONFIG
        model = _merge(ModelConfig, [_read_yaml(path).get("model", {})])
    elif (path.parent / "config.json").is_file():  # a transformers directory, a to-hf-rcla export among them
        raise ConfigError("checkpoint.init_from", str(init_from), f"not a megakv model directory ({path} not found; "
                          "it holds a transformers config.json)",
                          f"import it first: megakv-convert from-hf {init_from} MODEL_DIR (a to-hf-rcla export "
                          "comes back as the model directory it was exported from), then checkpoint.init_from="
                          "MODEL_DIR")
    else:
        raise ConfigError("checkpoint.init_from", str(init_from), f"not a megakv model directory ({path} not found)",
                          "convert it first: megakv-convert from-hf HF_DIR OUT_DIR, or from-checkpoint RUN_DIR OUT_DIR")
    user = OmegaConf.select(given, "model", default=None)
    if isinstance(user, DictConfig):
        agreed = _merge(ModelConfig, [OmegaConf.structured(model), user])
        for name in _leaf_keys(user):
            mine, theirs = OmegaConf.select(OmegaConf.structured(agreed), name), OmegaConf.select(
                OmegaConf.structured(model), name)
            if mine != theirs:
                shorter = "; to train on shorter samples set data.seq_len" if name == "max_seq_len" else ""
                raise ConfigError(f"model.{name}", mine, f"differs from {path} ({theirs!r}), which "
                                  "checkpoint.init_from takes the model section from",
                                  f"drop model.{name} (the model directory decides it), or set it to {theirs!r}"
                                  f"{shorter}")
    return OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.structured(model))})


def _fine_tuned_from(run_dir: Path, init_from: str) -> bool:
    """run_dir is a fine-tune started from init_from with a checkpoint saved (its config.yaml says so)."""
    config = run_dir / MODEL_DIR_CONFIG
    if not config.is_file() or not any((run_dir / "checkpoints").glob("step_*/megakv_state.json")):
        return False
    return OmegaConf.select(_read_yaml(config), "checkpoint.init_from", default=None) == init_from


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node.keys():
        child = node._get_node(key)
        keys += (_leaf_keys(child, f"{prefix}{key}.") if isinstance(child, DictConfig) else [f"{prefix}{key}"])
    return keys


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type[T] = MegaKVConfig) -> T:
    """Load, merge and validate a config; raises ConfigError naming the field on any mistake. `overrides` are
    key=value items or further YAML files (e.g. the data.yaml megakv-data writes), merged in order."""
    sources = ([_read_yaml(path)] if path is not None else []) + _override_sources(overrides)
    if schema is MegaKVConfig:
        from_dir = _model_of_init_dir(sources)
        sources = sources if from_dir is None else [from_dir, *sources]
    cfg = _merge(schema, sources)
    cfg.validate()  # type: ignore[attr-defined]
    return cfg


def load_section(path: str | Path, schema: type[T], prefix: str) -> T:
    """Load one section (e.g. a model directory's config.yaml, which holds only ModelConfig); errors name
    the file and the field as `prefix.field`."""
    source = _read_yaml(path)
    try:
        cfg = _merge(schema, [source])
        cfg.validate(prefix)  # type: ignore[attr-defined]
    except ConfigError as e:
        name = e.field if e.field.startswith(f"{prefix}.") or e.field == prefix else f"{prefix}.{e.field}"
        raise ConfigError(name, e.value, f"{e.problem.rstrip('.')} (in {path})", e.fix) from None
    return cfg


def flat_settings(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"section.key": value} of a config as plain containers (OmegaConf.to_container); lists stay values."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flat_settings(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
