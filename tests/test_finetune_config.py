"""Fine-tuning configs: data.seq_len apart from the model's context, and checkpoint.init_from supplying the
model section (a config may have no `model:`; any model.* given must agree, caught by --dry-run)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from train_data import prepare_tiny_dataset
from train_helpers import CHILD_ENV, REPO, launch_train, step_losses

from megakv.config import ConfigError, ModelConfig, load_config
from megakv.data.loader import build_data, micro_batches
from megakv.model import MegaKVModel
from megakv.model_dir import load_model, save_model_dir
from megakv.parallel.runners import causal_lm_loss
from megakv.train.export import consolidated_state_dict

CONTEXT, WINDOW = 64, 16
TINY_MODEL = ModelConfig(vocab_size=320, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                         max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_tiny_dataset(tmp_path_factory.mktemp("finetune_data"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("finetune_model") / "base"
    save_model_dir(TINY_MODEL, MegaKVModel(TINY_MODEL, init_seed=7).state_dict(), out)
    return out


def finetune_yaml(tmp_path, body: str = ""):
    path = tmp_path / "finetune.yaml"
    path.write_text("routing:\n  strategy: none\noptim:\n  lr: 1.0e-3\n  warmup_steps: 0\n"
                    "train:\n  steps: 4\n  global_batch: 4\n  micro_batch: 2\ncheckpoint:\n  every: 0\n"
                    "validation:\n  every: 0\nlogging:\n  tensorboard: false\n" + body)
    return path


def test_init_from_supplies_the_model_section(tmp_path, model_dir):
    cfg = load_config(finetune_yaml(tmp_path), [f"checkpoint.init_from={model_dir}"])
    assert cfg.model == TINY_MODEL  # no model: section at all; the default would be 6 layers, 256 context
    assert cfg.seq_len == CONTEXT  # data.seq_len defaults to the model's context
    agreeing = load_config(finetune_yaml(tmp_path), [f"checkpoint.init_from={model_dir}", "model.n_layers=4",
                                                     "model.head_dim=null", "model.rope_theta=10000"])
    assert agreeing.model == TINY_MODEL


@pytest.mark.parametrize("override, field, dir_value", [
    ("model.ffn_hidden=96", "model.ffn_hidden", "128"),
    ("model.rope_scaling.type=llama3", "model.rope_scaling.type", "'none'"),
    ("model.max_seq_len=8192", "model.max_seq_len", "64"),
])
def test_init_from_refuses_a_model_setting_that_differs_naming_the_field(tmp_path, model_dir, override, field,
                                                                          dir_value):
    with pytest.raises(ConfigError) as error:
        load_config(finetune_yaml(tmp_path), [f"checkpoint.init_from={model_dir}", override])
    assert error.value.field == field
    assert f"differs from {model_dir / 'config.yaml'} ({dir_value})" in str(error.value)


def test_dry_run_catches_the_mismatch_and_a_missing_model_dir(tmp_path, model_dir, dataset):
    def dry(*overrides):
        return subprocess.run([sys.executable, "-m", "megakv.cli.train", str(finetune_yaml(tmp_path)),
                               f"data.datasets=[{dataset}]", f"train.run_dir={tmp_path / 'run'}", *overrides,
                               "--dry-run"], cwd=REPO, env={**CHILD_ENV, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=120)

    bad = dry(f"checkpoint.init_from={model_dir}", "model.n_kv_heads=4")
    assert bad.returncode == 2, bad.stderr
    assert "model.n_kv_heads" in bad.stderr and "Traceback" not in bad.stderr
    missing = dry(f"checkpoint.init_from={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and "checkpoint.init_from" in missing.stderr and "megakv-convert" in missing.stderr
    run_dir = tmp_path / "a_run"  # a megakv-train run directory holds a config.yaml too, of another kind
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model:\n  n_layers: 4\n")
    a_run = dry(f"checkpoint.init_from={run_dir}")
    assert a_run.returncode == 2 and "a training run directory" in a_run.stderr
    assert f"megakv-convert from-checkpoint {run_dir}" in a_run.stderr
    # A mistyped init_from must not borrow the model of whatever run train.run_dir holds (the requeue fallback
    # applies only to a run fine-tuned from that very directory).
    (run_dir / "checkpoints" / "step_00000001").mkdir()
    (run_dir / "checkpoints" / "step_00000001" / "megakv_state.json").write_text("{}")
    (run_dir / "config.yaml").write_text("model:\n  n_layers: 2\ncheckpoint:\n  init_from: null\n")
    with pytest.raises(ConfigError, match="not a megakv model directory"):
        load_config(finetune_yaml(tmp_path), [f"checkpoint.init_from={tmp_path / 'typo'}", f"train.run_dir={run_dir}"])
    fine = dry(f"checkpoint.init_from={model_dir}", f"data.seq_len={WINDOW}")
    assert fine.returncode == 0, fine.stderr


def test_dry_run_catches_weights_that_are_not_the_directorys_model(tmp_path, model_dir, dataset):
    """A model directory whose config.yaml does not describe its weights (edited, or a received one saying
    n_layers: 40000), or without its weights: the launch checks say so from the safetensors header. Before, the
    dry run passed and the launch failed after the process group started, a ValueError traceback, exit 1."""
    import shutil

    def dry(init_from):
        return subprocess.run([sys.executable, "-m", "megakv.cli.train", str(finetune_yaml(tmp_path)),
                               f"data.datasets=[{dataset}]", f"train.run_dir={tmp_path / 'run'}",
                               f"checkpoint.init_from={init_from}", "--dry-run"], cwd=REPO,
                              env={**CHILD_ENV, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)

    edited = shutil.copytree(model_dir, tmp_path / "edited")
    config = edited / "config.yaml"
    config.write_text(config.read_text().replace("n_layers: 4", "n_layers: 40000"))
    bad = dry(edited)
    assert bad.returncode == 2, bad.stderr
    assert "checkpoint.init_from" in bad.stderr and "n_layers=40000, but the weights hold 4 layers" in bad.stderr
    assert "Traceback" not in bad.stderr
    bare = shutil.copytree(model_dir, tmp_path / "bare")
    (bare / "model.safetensors").unlink()
    no_weights = dry(bare)
    assert no_weights.returncode == 2 and f"{bare / 'model.safetensors'} does not exist" in no_weights.stderr
    assert "Traceback" not in no_weights.stderr


def test_seq_len_longer_than_the_context_is_refused(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="data.seq_len.*model.max_seq_len=64"):
        load_config(finetune_yaml(tmp_path), [f"checkpoint.init_from={model_dir}", "data.datasets=[x]",
                                              "data.seq_len=65"])
    with pytest.raises(ConfigError, match="data.seq_len"):
        load_config(None, ["data.datasets=[x]", "data.seq_len=0"])


def test_data_windows_follow_data_seq_len(tmp_path, model_dir, dataset):
    cfg = load_config(finetune_yaml(tmp_path), [f"checkpoint.init_from={model_dir}", f"data.datasets=[{dataset}]",
                                                f"data.seq_len={WINDOW}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert cfg.seq_len == WINDOW and cfg.model.max_seq_len == CONTEXT
    data = build_data(cfg.data, cfg.seq_len, is_builder=True)
    assert data.train[0].shape == (WINDOW + 1,)
    inputs, labels = micro_batches(data.train, 0, 4, 2, 0, 1)[0]
    assert inputs.shape == labels.shape == (2, WINDOW)


@pytest.mark.slow
def test_finetune_at_a_shorter_window_trains_resumes_and_exports_the_models_context(tmp_path, model_dir, dataset):
    common = [f"checkpoint.init_from={model_dir}", f"data.datasets=[{dataset}]", f"data.seq_len={WINDOW}",
              "optim.weight_decay=0.0"]
    straight = tmp_path / "straight"
    run = launch_train([*common, f"train.run_dir={straight}"], nproc=1, config=finetune_yaml(tmp_path))
    assert run.ok, run.output[-4000:]
    losses = step_losses(straight)
    assert sorted(losses) == [1, 2, 3, 4]

    # Step 1's loss, recomputed here from the model directory on the same 16-token windows at positions 0..15.
    cfg = load_config(finetune_yaml(tmp_path), [*common, f"train.run_dir={straight}"])
    data = build_data(cfg.data, cfg.seq_len, is_builder=True)
    model = load_model(model_dir)
    with torch.no_grad():
        batches = micro_batches(data.train, 0, 4, 2, 0, 1)
        expected = sum(float(causal_lm_loss(model(x), y)) for x, y in batches) / len(batches)
    assert losses[1] == pytest.approx(expected, rel=1e-5)

    # Interrupted after step 2 and resumed: the same losses, bit for bit (the data position counts windows),
    # also when the base model directory is gone by then (a requeued job: its checkpoint holds the model).
    import shutil

    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    own = [f"checkpoint.init_from={base}", *common[1:]]
    resumed = tmp_path / "resumed"
    stop = launch_train([*own, f"train.run_dir={resumed}", "train.debug.sigterm_at_step=2"], nproc=1,
                        config=finetune_yaml(tmp_path))
    assert stop.ok, stop.output[-4000:]
    shutil.rmtree(base)
    again = launch_train([*own, f"train.run_dir={resumed}"], nproc=1, resume=True, config=finetune_yaml(tmp_path))
    assert again.ok, again.output[-4000:]
    continued = step_losses(resumed)
    assert [continued[s] for s in (3, 4)] == [losses[s] for s in (3, 4)]

    # The export keeps the model's own context, not the training window.
    exported_cfg, _, _ = consolidated_state_dict(straight)
    assert exported_cfg.max_seq_len == CONTEXT and exported_cfg == TINY_MODEL


def test_init_from_a_model_trained_with_another_tokenizer_is_refused(tmp_path, dataset):
    """Other token ids would make the weights meaningless without any error (the loss looked like a random
    initialisation's): the launch is refused, naming both tokenizers; a copy of the data's tokenizer is fine."""
    from megakv.parallel.layout import ParallelLayout
    from megakv.train.preflight import preflight

    state = MegaKVModel(TINY_MODEL, init_seed=7).state_dict()
    same = save_model_dir(TINY_MODEL, state, tmp_path / "same", tokenizer_dir=dataset.parent / "tokenizer")
    other_tokenizer = prepare_tiny_dataset(tmp_path / "other", vocab_size=310).parent / "tokenizer"
    other = save_model_dir(TINY_MODEL, state, tmp_path / "other_model", tokenizer_dir=other_tokenizer)

    def launch(model):
        cfg = load_config(finetune_yaml(tmp_path), [f"checkpoint.init_from={model}", f"data.datasets=[{dataset}]",
                                                    f"train.run_dir={tmp_path / 'run'}"])
        return preflight(cfg, ParallelLayout(world_size=1, rank=0, local_rank=0))

    launch(same)
    with pytest.raises(ConfigError) as error:
        launch(other)
    assert error.value.field == "checkpoint.init_from"
    assert str(other_tokenizer.name) in error.value.problem and str(dataset.parent / "tokenizer") in error.value.problem
    assert f"--tokenizer {other / 'tokenizer'}" in error.value.fix

    # A model imported with megakv-convert from-hf carries a plain transformers tokenizer directory (no megakv
    # metadata): the check was skipped for it, the main fine-tuning path. Now its encodings are compared.
    import shutil

    from megakv.hf.tokenizer import write_hf_tokenizer

    for model, source in ((same, dataset.parent / "tokenizer"), (other, other_tokenizer)):
        shutil.rmtree(model / "tokenizer")
        write_hf_tokenizer(source, model / "tokenizer")
        assert not (model / "tokenizer" / "megakv_tokenizer.json").exists()
    launch(same)
    with pytest.raises(ConfigError, match="trained with the tokenizer"):
        launch(other)


def test_a_pipeline_finetune_reads_only_its_layers_and_trains_as_one_process(tmp_path, model_dir, dataset):
    """With checkpoint.init_from every pipeline stage loaded the whole dense model (SmolLM2 on 3 stages: rank 0
    peaked 0.4 GiB higher); now it reads its own layers from the file, and the run still equals the
    one-process fine-tune step by step, K/V crossing the stage boundary (rcla), also split over 2 tensor ranks."""
    from megakv.parallel.materialize import SafetensorsWeights
    from megakv.train.loop import _init_weights

    common = [f"checkpoint.init_from={model_dir}", f"data.datasets=[{dataset}]", f"data.seq_len={WINDOW}",
              "routing.strategy=rcla", "routing.q_cross=0.75", "parallel.zero_stage=1", "train.steps=3"]
    config = finetune_yaml(tmp_path)
    assert isinstance(_init_weights(load_config(config, [*common, "parallel.pipeline=2"]), str(model_dir)),
                      SafetensorsWeights)
    one = launch_train([*common, f"train.run_dir={tmp_path / 'one'}"], nproc=1, config=config)
    assert one.ok, one.output[-4000:]
    assert f"weights loaded from checkpoint.init_from={model_dir}" in one.output  # said, not only done
    pp2 = launch_train([*common, "parallel.pipeline=2", f"train.run_dir={tmp_path / 'pp2'}"], nproc=2,
                       config=config)
    assert pp2.ok, pp2.output[-4000:]
    tp2pp2 = launch_train([*common, "parallel.pipeline=2", "parallel.tensor=2", f"train.run_dir={tmp_path / 'tp'}"],
                          nproc=4, config=config)  # each stage's heads filled from the file too
    assert tp2pp2.ok, tp2pp2.output[-4000:]
    reference = step_losses(tmp_path / "one")
    for run in ("pp2", "tp"):
        staged = step_losses(tmp_path / run)
        assert sorted(staged) == [1, 2, 3]
        for step in (1, 2, 3):
            assert staged[step] == pytest.approx(reference[step], rel=1e-6), (run, step, staged, reference)


def test_a_bf16_finetune_keeps_the_model_directorys_fp32_weights_as_its_masters(tmp_path, model_dir, dataset):
    """DeepSpeed built the fp32 masters of a bf16 run from its bf16 copy of the module, so a fine-tune from
    fp32 weights began from their bf16 rounding (188,990 of 188,992 values off, up to 3.9e-3; audit). With a
    step too small to move them (lr 1e-30), the exported masters now equal the model directory bit for bit,
    on one process, two pipeline stages, two tensor ranks and three ZeRO-3 ranks."""
    source = {k: v for k, v in load_model(model_dir).state_dict().items() if not k.startswith("rope.")}
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in source.values())  # bf16 would round
    common = [f"checkpoint.init_from={model_dir}", f"data.datasets=[{dataset}]", f"data.seq_len={WINDOW}",
              "train.precision=bf16", "optim.lr=1e-30", "optim.weight_decay=0.0", "train.steps=1",
              "checkpoint.every=1"]
    layouts = {"zero2": (1, ["parallel.zero_stage=2"]),
               "pp2": (2, ["parallel.pipeline=2", "parallel.zero_stage=1"]),
               "tp2": (2, ["parallel.tensor=2", "parallel.zero_stage=1"]),
               # 3 ranks: the last one's partitions are padded (20,480 embedding values do not split in 3)
               "zero3dp3": (3, ["parallel.zero_stage=3", "train.global_batch=6", "train.micro_batch=2"])}
    for name, (nproc, extra) in layouts.items():
        run = launch_train([*common, *extra, f"train.run_dir={tmp_path / name}"], nproc=nproc,
                           config=finetune_yaml(tmp_path))
        assert run.ok, run.output[-4000:]
        _, masters, _ = consolidated_state_dict(tmp_path / name)
        differing = sorted(k for k in source if not torch.equal(masters[k], source[k]))
        assert differing == [], (name, differing[:5])


def test_a_finetune_export_keeps_the_base_models_sampling_defaults(tmp_path, model_dir, dataset, capsys):
    """from-hf keeps an imported model's generation_config.json in its model directory, but a fine-tune's export
    (from-checkpoint) dropped it: transformers' generate() on the fine-tuned model decoded greedily where the
    base sampled. The export now carries the init_from directory's settings, with megakv's token ids. With the
    base directory removed since, the export silently had none; it now says so and how to restore them."""
    import json
    import shutil

    from megakv.cli.convert import main as convert_main

    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    (base / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.8}))
    run_dir = tmp_path / "run"
    run = launch_train([f"checkpoint.init_from={base}", f"data.datasets=[{dataset}]", f"train.run_dir={run_dir}",
                        "train.steps=1"], nproc=1, config=finetune_yaml(tmp_path))
    assert run.ok, run.output[-4000:]
    for name, extra in (("mk", []), ("hf", ["--hf"])):
        assert convert_main(["from-checkpoint", str(run_dir), str(tmp_path / name), *extra]) == 0
        settings = json.loads((tmp_path / name / "generation_config.json").read_text())
        assert (settings["do_sample"], settings["temperature"], settings["top_p"]) == (True, 0.7, 0.8), settings
    assert "warning" not in capsys.readouterr().err

    shutil.rmtree(base)
    for name, extra in (("mk_later", []), ("hf_later", ["--hf"])):
        out = tmp_path / name
        assert convert_main(["from-checkpoint", str(run_dir), str(out), *extra]) == 0
        err = capsys.readouterr().err
        assert f"warning: checkpoint.init_from {base} (the model this run fine-tuned) is not found" in err, err
        assert "copy generation_config.json from the base model into" in err and f"into {out}" in err, err
        settings = (out / "generation_config.json")
        assert not settings.exists() or "do_sample" not in json.loads(settings.read_text())
