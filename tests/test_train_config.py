"""Fast checks of the training configuration, launch checks and DeepSpeed JSON (no process groups)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from train_data import prepare_tiny_dataset
from train_helpers import TINY_RECIPE

from megakv.cli.train import main as train_main
from megakv.config import ConfigError, load_config, to_yaml
from megakv.optim.schedule import lr_at
from megakv.parallel.layout import ParallelLayout
from megakv.train.checkpoint import CheckpointError, write_pointer
from megakv.train.ds_config import build_ds_config
from megakv.train.preflight import preflight
from megakv.train.state import TrainState


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("train_config_data"))


def tiny(dataset: Path, tmp_path: Path, *overrides: str):
    return load_config(TINY_RECIPE, [f"data.datasets=[{dataset}]", f"train.run_dir={tmp_path / 'run'}",
                                     *overrides])


def layout(world: int, rank: int = 0) -> ParallelLayout:
    return ParallelLayout(world_size=world, rank=rank, local_rank=rank)


def expect_error(field: str, fn, *args):
    with pytest.raises(ConfigError) as info:
        fn(*args)
    assert info.value.field == field, str(info.value)
    assert "Fix:" in str(info.value)
    return info.value


# ----------------------------------------------------------------------------- DeepSpeed JSON


@pytest.mark.parametrize("stage,precision,offload", [(1, "fp32", "none"), (2, "bf16", "none"), (3, "fp32", "none"),
                                                     (3, "fp32", "cpu")])
def test_generated_ds_config_matches_the_config(dataset, tmp_path, stage, precision, offload):
    cfg = tiny(dataset, tmp_path, f"parallel.zero_stage={stage}", f"train.precision={precision}",
               f"parallel.offload_optimizer={offload}", "train.global_batch=16", "train.micro_batch=2",
               "optim.grad_clip=0.5", "optim.lr=1e-3", "optim.beta2=0.99", "optim.weight_decay=0.05")
    ds = build_ds_config(cfg, data_parallel=2)
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4  # 16 / (2 x 2 ranks)
    assert ds["gradient_clipping"] == 0.5  # always explicit (DeepSpeed's default would be 1.0)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is False
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True  # nothing JIT-compiles
    assert (params["lr"], params["betas"], params["weight_decay"]) == (1e-3, [0.9, 0.99], 0.05)
    assert ("offload_optimizer" in ds["zero_optimization"]) is (offload == "cpu")
    assert "scheduler" not in ds  # the schedule is megakv's own (optim.*), passed to the engine as an object
    # bf16 sums micro-batch gradients in fp32 where DeepSpeed keeps its ZeRO optimizer (stage 2, 3)
    assert ds.get("data_types") == ({"grad_accum_dtype": "fp32"} if precision == "bf16" and stage >= 2 else None)


def test_cli_dry_run_writes_resolved_config_and_ds_json(dataset, tmp_path):
    run = tmp_path / "run"
    code = train_main([str(TINY_RECIPE), f"data.datasets=[{dataset}]", f"train.run_dir={run}",
                       "parallel.zero_stage=3", "parallel.ds_fragment=zero3", "--dry-run"])
    assert code == 0
    ds = json.loads((run / "ds_config.json").read_text())
    cfg = load_config(run / "config.yaml")
    assert to_yaml(cfg) == (run / "config.yaml").read_text()
    assert ds["zero_optimization"]["stage"] == 3 == cfg.parallel.zero_stage
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 50_000_000  # from the fragment
    assert ds["train_batch_size"] == cfg.train.global_batch
    assert ds["gradient_accumulation_steps"] == cfg.train.global_batch // cfg.train.micro_batch  # one rank
    # A second dry run with other settings leaves the run's own files alone (they replaced them, so a requeued
    # fine-tune read an init_from it was never trained from): it writes dry-run.* beside them.
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "ds_config.json")}
    assert train_main([str(TINY_RECIPE), f"data.datasets=[{dataset}]", f"train.run_dir={run}", "optim.lr=0.5",
                       "parallel.zero_stage=1", "--dry-run"]) == 0
    assert {name: (run / name).read_bytes() for name in before} == before
    assert load_config(run / "dry-run.config.yaml").optim.lr == 0.5
    assert json.loads((run / "dry-run.ds_config.json").read_text())["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("fragment", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_every_shipped_fragment_agrees_with_its_stage(dataset, tmp_path, fragment):
    stage = 3 if fragment.startswith("zero3") else int(fragment[-1])
    offload = "cpu" if "offload" in fragment else "none"
    cfg = tiny(dataset, tmp_path, f"parallel.zero_stage={stage}", f"parallel.offload_optimizer={offload}",
               f"parallel.ds_fragment={fragment}")
    assert build_ds_config(cfg, 1)["zero_optimization"]["stage"] == stage


def test_fragment_contradicting_the_config_is_an_error(dataset, tmp_path):
    cfg = tiny(dataset, tmp_path, "parallel.zero_stage=2", "parallel.ds_fragment=zero3")
    err = expect_error("parallel.zero_stage", build_ds_config, cfg, 1)
    assert "zero_optimization.stage=3" in err.problem
    bad = tmp_path / "clip.json"
    bad.write_text(json.dumps({"gradient_clipping": 5.0, "zero_optimization": {"overlap_comm": True}}))
    cfg = tiny(dataset, tmp_path, f"parallel.ds_fragment={bad}")
    expect_error("optim.grad_clip", build_ds_config, cfg, 1)
    expect_error("parallel.ds_fragment", build_ds_config, tiny(dataset, tmp_path, "parallel.ds_fragment=nope"), 1)
    # bf16 at ZeRO-1 with fp32 accumulation: DeepSpeed switches to its BF16 optimizer, whose checkpoints export
    # and megakv-eval could not read (the run trained, then 'is not a zero checkpoint')
    accumulate = tmp_path / "accumulate.json"
    accumulate.write_text(json.dumps({"data_types": {"grad_accum_dtype": "fp32"}}))
    err = expect_error("train.precision", build_ds_config, tiny(dataset, tmp_path, "train.precision=bf16",
                                                                "parallel.zero_stage=1",
                                                                f"parallel.ds_fragment={accumulate}"), 1)
    assert "data_types.grad_accum_dtype" in err.problem
    assert build_ds_config(tiny(dataset, tmp_path, "train.precision=bf16", "parallel.zero_stage=2",
                                f"parallel.ds_fragment={accumulate}"), 1)["data_types"] == {"grad_accum_dtype": "fp32"}



@pytest.mark.parametrize("fragment, field", [
    ({"bf16": {"check_grad_overflow": False}}, "megakv's generated DeepSpeed config"),  # non-finite skipping
    ({"steps_per_print": 10}, "megakv's generated DeepSpeed config"),
    ({"bfloat16": {"enabled": True}}, "train.precision"),  # DeepSpeed's alias of bf16
    ({"zero_optimization": {"cpu_offload": True}}, "parallel.offload_optimizer"),  # alias of offload_optimizer
])
def test_fragment_may_not_change_what_megakv_generates_or_use_an_alias(dataset, tmp_path, fragment, field):
    path = tmp_path / "fragment.json"
    path.write_text(json.dumps(fragment))
    err = expect_error(field, build_ds_config, tiny(dataset, tmp_path, "train.precision=bf16",
                                                    f"parallel.ds_fragment={path}"), 1)
    assert str(path) in err.problem
    path.write_text(json.dumps({"bf16": {"check_grad_overflow": True}, "zero_optimization": {"overlap_comm": True}}))
    assert build_ds_config(tiny(dataset, tmp_path, "train.precision=bf16", f"parallel.ds_fragment={path}"),
                           1)["zero_optimization"]["overlap_comm"] is True  # agreeing keys and tuning keys: fine


@pytest.mark.parametrize("fragment", [{"flops_profiler": {"enabled": True, "output_file": "/home/me/.bashrc"}},
                                      {"tensorboard": {"enabled": True, "output_path": "/elsewhere"}},
                                      {"wandb": {"enabled": True, "project": "theirs"}}])
def test_fragment_may_not_make_deepspeed_write_where_it_says(dataset, tmp_path, fragment):
    """A fragment someone sent you set flops_profiler.output_file and DeepSpeed overwrote that file with its
    report (security audit, reproduced); monitors write to paths or services the fragment names."""
    path = tmp_path / "fragment.json"
    path.write_text(json.dumps(fragment))
    err = expect_error("parallel.ds_fragment", build_ds_config, tiny(dataset, tmp_path, f"parallel.ds_fragment={path}"),
                       1)
    assert "write to a path or service the fragment names" in err.problem
    path.write_text(json.dumps({"flops_profiler": {"enabled": True, "profile_step": 2}}))  # to the log: fine
    assert build_ds_config(tiny(dataset, tmp_path, f"parallel.ds_fragment={path}"), 1)["flops_profiler"]["enabled"]
    path.write_text(json.dumps({"tensorboard": {"enabled": False}, "flops_profiler": {"output_file": None}}))
    build_ds_config(tiny(dataset, tmp_path, f"parallel.ds_fragment={path}"), 1)  # switched off: harmless


# ----------------------------------------------------------------------------- bad input, before any process group


def test_batch_sizes_that_do_not_divide(dataset, tmp_path):
    cfg = tiny(dataset, tmp_path, "train.global_batch=8", "train.micro_batch=2")
    err = expect_error("train.global_batch", preflight, cfg, layout(3))  # 8 % (2 x 3) != 0
    assert "2 x 3" in err.problem
    expect_error("train.global_batch", tiny, dataset, tmp_path, "train.global_batch=9", "train.micro_batch=2")


def test_zero_stage_the_layout_cannot_use(dataset, tmp_path):
    cfg = tiny(dataset, tmp_path, "parallel.pipeline=2", "parallel.zero_stage=2")
    expect_error("parallel.zero_stage", preflight, cfg, layout(2))
    expect_error("parallel.zero_stage", tiny, dataset, tmp_path, "parallel.zero_stage=0")
    expect_error("parallel.tensor", preflight, tiny(dataset, tmp_path, "parallel.tensor=2"), layout(3))


def test_data_path_without_bin_idx(dataset, tmp_path):
    cfg = tiny(dataset, tmp_path)
    cfg.data.datasets = [str(dataset), str(tmp_path / "missing" / "train")]
    err = expect_error("data.datasets[1]", preflight, cfg, layout(1))
    assert ".bin" in err.problem and ".idx" in err.problem


def test_tokenizer_larger_than_the_model_vocab(dataset, tmp_path):
    cfg = tiny(dataset, tmp_path, "model.vocab_size=256")  # the tokenizer has 300 tokens
    err = expect_error("model.vocab_size", preflight, cfg, layout(1))
    assert "300" in err.problem


def _fake_checkpoint(run_dir: Path, cfg, data_parallel: int, step: int = 4) -> None:
    tag = f"step_{step:08d}"
    tag_dir = run_dir / "checkpoints" / tag
    tag_dir.mkdir(parents=True)
    TrainState(step=step, layout={"data_parallel": data_parallel}, config_yaml=to_yaml(cfg)).write(tag_dir)
    write_pointer(run_dir / "checkpoints", tag)


def test_resume_checks(dataset, tmp_path):
    cfg = tiny(dataset, tmp_path)
    run = Path(cfg.train.run_dir)
    _fake_checkpoint(run, cfg, data_parallel=2)
    # a run directory with checkpoints is never silently overwritten
    expect_error("checkpoint.resume", preflight, cfg, layout(2))
    # same layout: resumes from `latest`
    launch = preflight(tiny(dataset, tmp_path, "checkpoint.resume=auto"), layout(2))
    assert launch.resume is not None and launch.resume.tag == "step_00000004" and not launch.resume.universal
    # another data-parallel size needs the universal conversion first
    err = expect_error("checkpoint.resume", preflight, tiny(dataset, tmp_path, "checkpoint.resume=auto"), layout(1))
    assert "to-universal" in err.fix
    # a different model in the run directory
    expect_error("model.d_model", preflight, tiny(dataset, tmp_path, "checkpoint.resume=auto", "model.d_model=128"),
                 layout(2))
    # an incomplete directory named by `latest` is refused (never half-loaded)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "step_00000004").mkdir()
    with pytest.raises(CheckpointError, match="none is intact"):
        preflight(tiny(dataset, tmp_path, "checkpoint.resume=auto"), layout(2))


def test_cli_reports_config_errors_with_exit_code_2(dataset, tmp_path, capsys):
    code = train_main([str(TINY_RECIPE), f"data.datasets=[{dataset}]", f"train.run_dir={tmp_path}",
                       "optim.lr=-1"])
    assert code == 2
    assert "optim.lr" in capsys.readouterr().err


# ----------------------------------------------------------------------------- schedule and weight decay


def test_warmup_then_cosine_schedule(dataset, tmp_path):
    cfg = tiny(dataset, tmp_path, "optim.lr=1e-3", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1",
               "train.steps=110")
    lrs = [lr_at(s, cfg.optim, cfg.train.steps) for s in range(cfg.train.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg.optim, cfg.train.steps) == pytest.approx(1e-4)


def test_weight_decay_groups(dataset, tmp_path):
    from megakv.model import MegaKVModel
    from megakv.optim.param_groups import weight_decay_groups

    cfg = tiny(dataset, tmp_path, "optim.decay_embeddings=false")
    model = MegaKVModel(cfg.model)
    groups = {g["name"]: g for g in weight_decay_groups(model, cfg.optim)}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    plain = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == cfg.optim.weight_decay
    assert "layers.0.attn.q_proj.weight" in decayed and "layers.0.mlp.down_proj.weight" in decayed
    assert {"embed.weight", "lm_head.weight", "norm.weight", "layers.0.attn_norm.weight"} <= plain
    assert decayed | plain == set(names.values())


def test_dry_run_reads_the_data_as_the_launch_does(dataset, tmp_path, capsys):
    """--dry-run said 'launch checked', exit 0, for a pair with a bad index, a truncated .bin, no tokens, or ids
    outside the model's vocabulary; the launch refused them only after the process group started."""
    import numpy as np

    from megakv.data.indexed import IndexedWriter
    from megakv.data.metadata import read_meta, write_meta

    def copy(name: str) -> Path:
        for suffix in (".bin", ".idx", ".meta.json"):
            shutil.copy(f"{dataset}{suffix}", tmp_path / f"{name}{suffix}")
        return tmp_path / name

    bad_index = copy("bad_index")
    Path(f"{bad_index}.idx").write_bytes(b"garbage" * 10)
    truncated = copy("truncated")
    Path(f"{truncated}.bin").write_bytes(Path(f"{truncated}.bin").read_bytes()[:100])
    empty = tmp_path / "empty"
    with IndexedWriter(empty, np.uint16) as writer:
        writer.finalize()
    too_big = copy("too_big")
    write_meta(too_big, {**read_meta(too_big), "max_token_id": 100_000})
    for prefix, words in ((bad_index, "not an MMIDIDX index"), (truncated, "truncated"), (empty, "holds no tokens"),
                          (too_big, "outside the model's vocabulary")):
        code = train_main([str(TINY_RECIPE), f"data.datasets=[{prefix}]", f"train.run_dir={tmp_path / 'run'}",
                           f"data.tokenizer={dataset.parent / 'tokenizer'}", "--dry-run"])
        assert code == 2, prefix.name
        assert words in capsys.readouterr().err, prefix.name


def test_data_tokenizer_naming_a_hugging_face_directory_says_which_one_training_reads(dataset, tmp_path):
    """data.tokenizer=<imported model>/tokenizer (what megakv-qa prep and init_from accept) was refused as 'not
    a megakv tokenizer directory' with a fix to train or import one; the fix now names the copy beside the
    data that training reads when data.tokenizer is left unset."""
    hf = tmp_path / "model" / "tokenizer"
    hf.mkdir(parents=True)
    (hf / "tokenizer.json").write_text("{}")
    err = expect_error("data.tokenizer", preflight, tiny(dataset, tmp_path, f"data.tokenizer={hf}"), layout(1))
    assert "holds a Hugging Face tokenizer" in err.fix and "leave data.tokenizer unset" in err.fix
    assert str(dataset.parent / "tokenizer") in err.fix
