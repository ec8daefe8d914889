"""Check a GPU node's megakv path against the same work on its CPU, in a few minutes:

    python -m megakv.testing.gpu_check --workdir /tmp/megakv-gpu-check [--json report.json]

On a tiny dataset built offline (megakv/testing/tiny_data.py) it trains the tiny recipe (R-CLA, ZeRO-2,
validation at every:1..4) on the CPU in fp32 (the reference), on the GPU in fp32 and in bf16, and checks:
- GPU fp32 training (ZeRO-2 and ZeRO-3) equals the CPU's step by step (losses), bf16 stays near it;
- a GPU run stopped by SIGTERM resumes on the GPU to the uninterrupted run's losses, and on the CPU;
- the trained model scores the same held-out loss at every retention plan on GPU and CPU, greedy decoding
  gives the same tokens, and transformers' own Llama on the GPU (megakv-convert to-hf) gives the same logits
  and greedy tokens as megakv's engine;
- a model built on the GPU starts from the weights the same seed gives on the CPU;
- decode on the GPU at a serving shape: cache bytes and decode speed at every:1, every:2 and every:4.
The process group of a one-GPU run is NCCL's (checked from the run's log). Several ranks per GPU cannot
share NCCL, so pipeline and tensor parallel layouts need a node with 2+ GPUs:
`torchrun --nproc_per_node 2 -m megakv.cli.train ... parallel.pipeline=2` against the one-process run.

`--device cpu` runs every step with the CPU as the "accelerator": the project's own test runs it that way
(machines without a GPU), which checks the plumbing only; the comparisons mean something on a GPU.
Exit status 0 only when every check passes; each line names its tolerance and what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megakv.testing.tiny_data import prepare_tiny_dataset

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
STEPS = 8
PROMPTS = [[5, 9, 14, 3], [7, 7, 20], [11, 30, 2, 8, 40], [60]]
PLANS = ("every:1", "every:2", "every:3", "every:4")


@dataclass
class Check:
    name: str
    passed: bool
    measured: str
    tolerance: str


def child_env(device: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore::FutureWarning")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a bare one-process launch
    if device != "cpu":
        env.pop("DS_ACCELERATOR", None)  # a pin to the CPU would be refused for a GPU run
    # (the CPU runs keep the environment as it is: on a GPU node train.device=cpu must pin DeepSpeed itself)
    return env


def train(dataset: Path, run_dir: Path, device: str, precision: str, *extra: str, resume: bool = False) -> str:
    args = [sys.executable, "-m", "megakv.cli.train", str(RECIPE), f"data.datasets=[{dataset}]",
            f"train.run_dir={run_dir}", f"train.steps={STEPS}", f"train.device={device}",
            f"train.precision={precision}", "validation.every=4", "checkpoint.every=4", "logging.tensorboard=false",
            *extra, *(["--resume", "auto"] if resume else [])]
    started = time.perf_counter()
    proc = subprocess.run(args, env=child_env(device), capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"training {run_dir.name} failed ({proc.returncode}):\n{output[-4000:]}")
    print(f"  trained {run_dir.name} on {device} {precision} in {time.perf_counter() - started:.1f} s", flush=True)
    return output


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: float(r["loss_exact"]) for r in records if "loss_exact" in r}


def max_rel_diff(ours: dict, theirs: dict) -> float:
    if sorted(ours) != sorted(theirs):
        return float("inf")
    return max(abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12) for k in theirs)


def compare(name: str, ours: dict, theirs: dict, rel: float) -> Check:
    diff = max_rel_diff(ours, theirs)
    return Check(name, diff <= rel, f"max relative difference {diff:.2e} over {sorted(theirs)}",
                 f"<= {rel:g}")


def training_checks(dataset: Path, work: Path, device: str) -> tuple[list[Check], Path]:
    cpu = work / "cpu_fp32"
    train(dataset, cpu, "cpu", "fp32")
    gpu_log = train(dataset, work / "gpu_fp32", device, "fp32")
    train(dataset, work / "gpu_bf16", device, "bf16")
    train(dataset, work / "gpu_zero3", device, "fp32", "parallel.zero_stage=3")
    stopped = work / "gpu_fp32_stopped"
    train(dataset, stopped, device, "fp32", "train.debug.sigterm_at_step=4")
    stopped_at = max(losses(stopped))
    train(dataset, stopped, device, "fp32", resume=True)
    on_cpu = work / "gpu_fp32_resumed_on_cpu"
    train(dataset, on_cpu, device, "fp32", "train.debug.sigterm_at_step=4")
    train(dataset, on_cpu, "cpu", "fp32", resume=True)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    checks = [
        Check("process group", f"backend {backend}" in gpu_log, f"log says backend {backend}: "
              f"{f'backend {backend}' in gpu_log}", f"{backend} for a {device} run"),
        compare(f"train {device} fp32 = cpu fp32", losses(work / "gpu_fp32"), losses(cpu), 1e-4),
        compare(f"train {device} bf16 ~ cpu fp32", losses(work / "gpu_bf16"), losses(cpu), 3e-2),
        compare(f"train {device} fp32 ZeRO-3 = cpu fp32 ZeRO-2", losses(work / "gpu_zero3"), losses(cpu), 1e-4),
        Check("SIGTERM stop", stopped_at == 4, f"stopped after step {stopped_at}", "after step 4"),
        compare(f"resume on {device} = uninterrupted", losses(stopped), losses(work / "gpu_fp32"), 1e-5),
        compare(f"{device} checkpoint resumed on cpu ~ cpu run", losses(on_cpu), losses(cpu), 1e-4),
    ]
    return checks, work / "gpu_fp32"


def serving_checks(run_dir: Path, dataset: Path, work: Path, device: str) -> list[Check]:
    from transformers import AutoModelForCausalLM

    from megakv.data.indexed import IndexedDataset
    from megakv.eval.data import make_windows
    from megakv.eval.loss import evaluate_plans
    from megakv.inference.engine import InferenceEngine
    from megakv.model_paths import resolve_model
    from megakv.train.export import export_model_dir

    model_dir = export_model_dir(run_dir, work / "model", overwrite=True)
    hf_dir = export_model_dir(run_dir, work / "hf", hf=True, overwrite=True)
    cpu_model, _ = resolve_model(model_dir, "cpu")
    gpu_model, _ = resolve_model(model_dir, device)
    gpu_bf16, _ = resolve_model(model_dir, device, torch.bfloat16)
    data = IndexedDataset(dataset)
    tokens = torch.from_numpy(data.get(0, 0, min(4096, data.num_tokens)).astype("int64"))
    windows = make_windows(tokens, cpu_model.cfg.max_seq_len, cpu_model.cfg.vocab_size)
    with torch.no_grad():
        scores = {name: {r.retain: r.loss for r in evaluate_plans(m, PLANS, windows)}
                  for name, m in (("cpu", cpu_model), ("gpu", gpu_model), ("bf16", gpu_bf16))}
        greedy = {}
        for name, m in (("cpu", cpu_model), ("gpu", gpu_model)):
            greedy[name] = {plan: InferenceEngine(m, plan).generate(PROMPTS, 24).tokens for plan in PLANS[:2]}
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
        ids = torch.tensor([PROMPTS[0] * 8], device=device)
        logit_diff = (gpu_model(ids).float() - hf(input_ids=ids).logits.float()).abs().max().item()
        eos = list(gpu_model.cfg.eos_token_ids) or None
        hf_greedy = [hf.generate(torch.tensor([p], device=device), max_new_tokens=24, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
        mine = InferenceEngine(gpu_model).generate(PROMPTS, 24, eos_id=eos).tokens
    agree = [a == b for plan in PLANS[:2] for a, b in zip(greedy["gpu"][plan], greedy["cpu"][plan])]
    return [
        compare(f"held-out loss {device} fp32 = cpu at every:1..4", scores["gpu"], scores["cpu"], 1e-5),
        compare(f"held-out loss {device} bf16 ~ cpu at every:1..4", scores["bf16"], scores["cpu"], 2e-2),
        Check(f"greedy tokens {device} = cpu (every:1, every:2)", all(agree),
              f"{sum(agree)} of {len(agree)} prompts identical", "all"),
        Check(f"transformers Llama logits = megakv on {device}", logit_diff <= 1e-4,
              f"max abs difference {logit_diff:.2e}", "<= 1e-4"),
        Check(f"transformers generate() = megakv engine on {device}", hf_greedy == mine,
              f"{sum(a == b for a, b in zip(hf_greedy, mine))} of {len(PROMPTS)} prompts identical", "all"),
    ]


def init_check(device: str) -> Check:
    """A model built on the device starts from the weights the same seed gives on the CPU."""
    from megakv.config import ModelConfig
    from megakv.model import MegaKVModel

    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64)
    on_cpu = MegaKVModel(cfg, init_seed=7).state_dict()
    with torch.device(device):
        built_there = MegaKVModel(cfg, init_seed=7).state_dict()
    same = [name for name, value in on_cpu.items() if torch.equal(built_there[name].cpu(), value)]
    return Check(f"model built on {device} = built on cpu (same seed)", len(same) == len(on_cpu),
                 f"{len(same)} of {len(on_cpu)} tensors identical", "all")


def decode_figures(device: str, quick: bool) -> dict[str, dict[str, float]]:
    """Cache bytes and decode speed of a serving-sized model (random weights) at three retention plans."""
    from megakv.config import ModelConfig
    from megakv.inference.engine import InferenceEngine
    from megakv.model import MegaKVModel

    shape = (dict(vocab_size=512, d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, ffn_hidden=256,
                  max_seq_len=256) if quick else
             dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=4, ffn_hidden=5632,
                  max_seq_len=4096))
    batch, prompt_len, new_tokens = (2, 64, 8) if quick else (32, 2048, 64)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with torch.device(device):  # initialised where it runs: a 1B-parameter model is slow to build on a CPU
        model = MegaKVModel(ModelConfig(**shape), init_seed=0).to(dtype).eval()
    prompts = torch.randint(0, shape["vocab_size"], (batch, prompt_len)).tolist()
    figures = {}
    for plan in ("every:1", "every:2", "every:4"):
        engine = InferenceEngine(model, plan)
        with torch.no_grad():
            engine.generate(prompts, 2)  # warm-up
            out = engine.generate(prompts, new_tokens, eos_id=None)
        stats = out.stats
        figures[plan] = {"cache_gib": stats.cache_bytes / 2**30, "ttft_ms": stats.ttft_s * 1e3,
                         "decode_tokens_per_s": stats.decode_tokens_per_s}
    print(f"  decode at {shape['n_layers']} layers d{shape['d_model']}, batch {batch}, prompt {prompt_len}, "
          f"{str(dtype).removeprefix('torch.')} on {device}:")
    base = figures["every:1"]
    for plan, f in figures.items():
        print(f"    {plan}: cache {f['cache_gib']:.3f} GiB ({f['cache_gib'] / base['cache_gib']:.2f}x), first token "
              f"{f['ttft_ms']:.1f} ms, decode {f['decode_tokens_per_s']:.0f} tokens/s "
              f"({f['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x every:1)")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megakv.testing.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="scratch directory (created; runs and models go here)")
    parser.add_argument("--device", default="cuda", help="the accelerator to check (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a small decode shape (for machines without a GPU)")
    parser.add_argument("--json", default=None, help="also write the checks and figures here")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"gpu_check: error: --device {args.device} but torch {torch.__version__} sees no GPU; "
              "use --device cpu to check the plumbing only", file=sys.stderr)
        return 2
    work = Path(args.workdir)
    if work.exists() and any(work.iterdir()):
        print(f"gpu_check: error: --workdir {work} is not empty: give a new directory", file=sys.stderr)
        return 2
    if args.device != "cpu":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}", flush=True)
    dataset = prepare_tiny_dataset(work / "tiny")
    checks, trained = training_checks(dataset, work / "runs", args.device)
    checks += serving_checks(trained, dataset, work, args.device)
    checks.append(init_check(args.device))
    figures = decode_figures(args.device, args.quick)
    for check in checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.name}: {check.measured} (tolerance {check.tolerance})")
    failed = [c.name for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed" + (f"; failed: {failed}" if failed else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "checks": [asdict(c) for c in checks],
                                               "decode": figures}, indent=2) + "\n")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
