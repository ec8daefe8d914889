"""megakv-train: pre-train (or continue) an R-CLA model with DeepSpeed.

  megakv-train CONFIG.yaml [key=value ...] [--resume auto]

Single process:       megakv-train megakv/recipes/tiny.yaml train.run_dir=runs/tiny
torchrun:             torchrun --nproc_per_node 2 -m megakv.cli.train CONFIG.yaml ...
deepspeed launcher:   deepspeed --num_gpus 2 --module megakv.cli.train CONFIG.yaml ...

Writes RUN_DIR (train.run_dir) with the resolved config.yaml, the generated ds_config.json, checkpoints/,
tensorboard/, logs/rank*.log, metrics.jsonl and status.json.

Exit codes: 0 finished, or stopped by SIGTERM/SIGUSR1 after saving a checkpoint (status.json "state" is
"finished" or "preempted"; a requeued job continues with --resume auto); 2 configuration or launch error
(reported before any process group starts when it can be); 3 stopped after train.max_nonfinite_steps
non-finite steps in a row (the last good checkpoint is kept); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
import warnings

from megakv.config.errors import ConfigError
from megakv.train import EXIT_CONFIG, EXIT_FAILED, EXIT_OK

QUIET_RANK_EXIT_DELAY_S = 3.0  # a rank that leaves the report of a shared mistake to rank 0 waits this long


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megakv-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (see megakv/recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200 routing.q_cross=0.5")
    parser.add_argument("--resume", choices=["auto", "none"], default=None,
                        help="auto: continue from the newest complete checkpoint in train.run_dir, if any")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and launch, write config.yaml and ds_config.json, do not train")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _prepare(args: argparse.Namespace):
    from megakv.config import load_config, save_config
    from megakv.parallel.layout import ParallelLayout
    from megakv.train.preflight import preflight
    from megakv.train.run_dir import CONFIG, DS_CONFIG, write_json_atomically

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    layout = ParallelLayout.from_env(cfg.parallel)
    launch = preflight(cfg, layout)
    if layout.rank == 0:
        launch.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, launch.run_dir / CONFIG)
        write_json_atomically(launch.run_dir / DS_CONFIG, launch.ds_config)
    return cfg, layout, launch


def _train(cfg, layout, launch) -> int:
    from megakv.parallel import init_parallel, shutdown_parallel
    from megakv.train.logs import close_logging, setup_logging
    from megakv.train.loop import Trainer
    from megakv.train.run_dir import LOGS

    log = setup_logging(layout.rank, launch.run_dir / LOGS, cfg.logging)
    ctx = init_parallel(layout, cfg.parallel, cfg.train.device)
    log.info("layout %s, device %s, backend %s", json.dumps(layout.describe()), ctx.device, ctx.backend)
    trainer = Trainer(cfg, launch, ctx)
    try:
        trainer.setup()
        code = trainer.run()
    finally:
        trainer.close()
    shutdown_parallel()
    close_logging()
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # more threads per rank thrash a CPU box (see docs)
    # DeepSpeed's ZeRO calls collectives torch has renamed; one warning per call would flood the console.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        cfg, layout, launch = _prepare(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        if os.environ.get("RANK", "0") == "0" or not isinstance(e, ConfigError):  # every rank's mistake: say it once
            print(f"megakv-train: error: {e}", file=sys.stderr)
        else:  # give rank 0 time to say it before the launcher stops every rank
            time.sleep(QUIET_RANK_EXIT_DELAY_S)
        return EXIT_CONFIG
    if args.dry_run:
        print(f"megakv-train: launch checked; wrote {launch.run_dir}/config.yaml and ds_config.json")
        return EXIT_OK
    from megakv.data.errors import DataError

    try:
        code = _train(cfg, layout, launch)
    except (ConfigError, DataError) as e:  # found once the data is opened (e.g. resuming on other data)
        print(f"[rank {layout.rank}] megakv-train: error: {e}", file=sys.stderr)
        code = EXIT_CONFIG
    except BaseException:  # noqa: BLE001 - report, then leave without interpreter teardown (gloo aborts there)
        traceback.print_exc()
        code = EXIT_FAILED
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # A process group can abort the interpreter's teardown (gloo: "terminate called without an active
    # exception"); everything is flushed and closed, so leave directly with the real exit code.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
