"""megakv-train: pre-train (or continue) an R-CLA model with DeepSpeed.

  megakv-train CONFIG.yaml [key=value ...] [--resume auto]

Single process:       megakv-train megakv/recipes/tiny.yaml train.run_dir=runs/tiny data.datasets=[PREFIX]
torchrun:             torchrun --nproc_per_node 2 -m megakv.cli.train CONFIG.yaml ...
deepspeed launcher:   deepspeed --num_gpus 2 --module megakv.cli.train CONFIG.yaml ...

Writes RUN_DIR (train.run_dir) with the resolved config.yaml, the generated ds_config.json, checkpoints/,
tensorboard/, logs/rank*.log, metrics.jsonl and status.json.

Exit codes: 0 finished, or stopped by SIGTERM/SIGUSR1 after saving a checkpoint (status.json "state" is
"finished" or "preempted"; a requeued job continues with --resume auto); 2 configuration or launch error
(reported before any process group starts when it can be); 3 stopped after train.max_nonfinite_steps
non-finite steps in a row, or when no step of the launch was finite (the last good checkpoint is kept); 1
anything else (status.json "failed", with the error). When one rank fails, every other rank exits with
that rank's message and exit code within parallel.timeout seconds. A second SIGTERM/SIGINT (more than a
second after the first: copies of one cancellation come together) aborts at once, without saving.
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
from pathlib import Path

from megakv.config.errors import ConfigError
from megakv.train import EXIT_CONFIG, EXIT_FAILED, EXIT_OK

QUIET_RANK_EXIT_DELAY_S = 3.0  # a rank that leaves the report of a shared mistake to rank 0 waits this long
QUIET_RANK_AGENT_WAIT_S = 60.0  # ... or this long under torchrun, whose agent stops it when rank 0 exits


def _quiet_rank_wait(rank: int, error: Exception) -> None:
    """No store to wait on (--dry-run): leave rank 0 time to say the shared mistake before exiting.

    Under torchrun the agent stops this rank as soon as rank 0 exits, so it can wait as long as rank 0 needs
    (a loaded machine takes seconds to import torch); if it is still here after that, it says it itself."""
    stopped_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    time.sleep(QUIET_RANK_AGENT_WAIT_S if stopped_by_agent else QUIET_RANK_EXIT_DELAY_S)
    if stopped_by_agent:
        print(f"[rank {rank}] megakv-train: error: {error}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megakv-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (see megakv/recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200 routing.q_cross=0.5, "
                                                     "or more YAML files (e.g. megakv-data's data.yaml), in order")
    parser.add_argument("--resume", choices=["auto", "none"], default=None,
                        help="auto: continue from the newest intact checkpoint in train.run_dir, if any")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although train.global_batch, routing.*, data.reset_attention_mask / "
                             "reset_position_ids, or train.micro_batch with routing.per_micro_batch differ from the "
                             "checkpoint's (each change is logged); model.*, "
                             "the data's identity and ZeRO-3 <-> 1/2 are refused whatever this says")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and launch, write config.yaml and ds_config.json (dry-run.* beside an "
                             "existing run's), do not train")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _prepare(args: argparse.Namespace, held: list):
    """The launch checks and the run directory's config files; `held` gets the run-directory lock (rank 0)."""
    from megakv.config import load_config, save_config
    from megakv.parallel.context import pin_deepspeed_to
    from megakv.parallel.layout import ParallelLayout
    from megakv.train.preflight import preflight
    from megakv.train.run_dir import write_json_atomically
    from megakv.train.run_lock import take_run_dir

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.allow_config_change:
        overrides.append("checkpoint.allow_config_change=true")
    cfg = load_config(args.config, overrides)
    pin_deepspeed_to(cfg.train.device)  # before DeepSpeed is imported: it picks its accelerator once
    layout = ParallelLayout.from_env(cfg.parallel)
    locks = layout.rank == 0 and not args.dry_run  # rank 0 holds the run directory for the whole launch
    run_dir = Path(cfg.train.run_dir)
    # Before the checks when it exists: they read checkpoints that another launch may be writing.
    if locks and run_dir.is_dir():
        held.append(take_run_dir(run_dir))
    with warnings.catch_warnings():
        if layout.rank != 0:  # the launch checks' notes are about the config, the same on every rank: say them once
            warnings.simplefilter("ignore")
        launch = preflight(cfg, layout)
    config_file, ds_config_file = run_files(launch.run_dir, args.dry_run)
    if layout.rank == 0:
        launch.run_dir.mkdir(parents=True, exist_ok=True)
        if locks and not held:
            held.append(take_run_dir(launch.run_dir))
        save_config(cfg, config_file)
        write_json_atomically(ds_config_file, launch.ds_config)
    return cfg, layout, launch, (config_file, ds_config_file)


def run_files(run_dir: Path, dry_run: bool) -> tuple[Path, Path]:
    """Where the resolved config.yaml and ds_config.json go. A dry run beside an existing run's files writes
    dry-run.* copies: the run's own say what it trained with (a requeued fine-tune reads its init_from)."""
    from megakv.train.run_dir import CONFIG, DS_CONFIG

    prefix = "dry-run." if dry_run and (run_dir / CONFIG).exists() else ""
    return run_dir / f"{prefix}{CONFIG}", run_dir / f"{prefix}{DS_CONFIG}"


def _prepare_run_dir(launch) -> None:
    """Rank 0, once every rank passed its checks: say what the resume passed over, clear what a crash left."""
    from megakv.train.checkpoint import remove_partial_saves
    from megakv.train.metrics import drop_records_after
    from megakv.train.run_dir import METRICS, checkpoints_dir

    for notice in (launch.resume.notices if launch.resume else ()):
        print(f"megakv-train: WARNING: {notice}", file=sys.stderr)
    for path in remove_partial_saves(checkpoints_dir(launch.run_dir)):
        print(f"megakv-train: removed {path}, left by an interrupted save", file=sys.stderr)
    drop_records_after(launch.run_dir / METRICS, launch.resume.state.step if launch.resume else 0)


def _backend(cfg, layout) -> str:
    """The process-group backend init_parallel would choose (NCCL on GPUs, gloo on CPU, or as configured)."""
    from megakv.parallel.context import resolve_device

    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    if resolve_device(cfg.train.device, layout.local_rank).type == "cpu":
        return "gloo"
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().communication_backend_name()


def _record_failure(launch, layout, message: str, rank: int) -> None:
    """status.json says `failed`, with the error, when the run had started (written by rank 0)."""
    from megakv.train.run_dir import read_status, write_status

    if layout.rank != 0:
        return
    try:
        previous = read_status(launch.run_dir) or {}
        if previous.get("state") not in (None, "running"):
            return
        write_status(launch.run_dir, "failed", step=previous.get("step"), failed_rank=rank, error=message[-2000:])
    except (OSError, ValueError) as e:  # a full disk, often the very failure being recorded: the error still stands
        print(f"megakv-train: could not record the failure in {launch.run_dir}/status.json ({e})", file=sys.stderr)


def _train(cfg, layout, launch, guard, stop) -> int:
    from megakv.parallel import init_parallel, shutdown_parallel
    from megakv.parallel.layout import tensor_group_spread_warning
    from megakv.train.launch_guard import exit_for_peer
    from megakv.train.logs import close_logging, setup_logging
    from megakv.train.loop import Trainer
    from megakv.train.run_dir import LOGS
    from megakv.train.shared_dir import check_run_dir_shared

    log = setup_logging(layout.rank, launch.run_dir / LOGS, cfg.logging)
    if launch.resume is not None:  # every rank's log file has them; the console once, from rank 0
        level = logging.WARNING if layout.rank == 0 else logging.INFO
        for notice in launch.resume.notices:
            log.log(level, "%s", notice)
        for change in launch.resume.config_changes:
            log.log(level, "resuming with a changed setting: %s", change)
    if guard is not None:
        guard.init_process_group(_backend(cfg, layout))
        guard.watch(lambda failure: exit_for_peer(
            failure, layout.rank, lambda f: _record_failure(launch, layout, f.message, f.rank)))
    ctx = init_parallel(layout, cfg.parallel, cfg.train.device)
    check_run_dir_shared(launch.run_dir, layout.rank)
    log.info("layout %s, device %s, backend %s", json.dumps(layout.describe()), ctx.device, ctx.backend)
    if (spread := tensor_group_spread_warning(layout)) and layout.rank == 0:
        log.warning("%s", spread)
    trainer = Trainer(cfg, launch, ctx, stop)
    try:
        trainer.setup()
        code = trainer.run()
    finally:
        trainer.close()
    if guard is not None:
        guard.stop_watching()
    shutdown_parallel()
    close_logging()
    return code


def _exit(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # A process group can abort the interpreter's teardown (gloo: "terminate called without an active
    # exception"); everything is flushed and closed, so leave directly with the real exit code.
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    from megakv.train.signals import StopRequest

    args = build_parser().parse_intermixed_args(argv)
    stop = StopRequest() if args.dry_run else StopRequest().catch_early()  # a SIGUSR1 during the launch is kept
    held: list = []  # the run-directory lock
    try:
        return _launch(args, stop, held)
    finally:  # reached by the returns of a launch that did not train (one that trains ends in _exit)
        for lock in held:
            lock.release()
        stop.release_early()


def _launch(args: argparse.Namespace, stop, held: list) -> int:
    from megakv.config.parallel import ParallelConfig
    from megakv.train.launch_guard import LaunchGuard, env_rank_world

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # more threads per rank thrash a CPU box (see docs)
    # DeepSpeed's ZeRO calls collectives torch has renamed; one warning per call would flood the console.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    rank, _world = env_rank_world()
    cfg = error = None
    try:
        cfg, layout, launch, written = _prepare(args, held)
    except (ConfigError, OSError, ValueError, RuntimeError) as e:  # OSError: e.g. a full or read-only disk
        error = e
    if args.dry_run and error is None:
        print(f"megakv-train: launch checked; wrote {written[0]} and {written[1].name}")
        return EXIT_OK
    timeout = cfg.parallel.timeout if cfg is not None else ParallelConfig().timeout
    guard = None
    if not args.dry_run:
        try:
            guard = LaunchGuard.connect(timeout)
        except Exception as e:  # noqa: BLE001 - no rendezvous: nothing to coordinate, say why and stop
            print(f"[rank {rank}] megakv-train: error: cannot reach the other ranks through the launcher's "
                  f"rendezvous (MASTER_ADDR/MASTER_PORT) within parallel.timeout={timeout:g}s: {e}", file=sys.stderr)
            if error is None:
                return EXIT_FAILED
    if error is not None:
        said = rank == 0 or not isinstance(error, ConfigError)  # a config mistake is every rank's: say it once
        if said:
            print(f"[rank {rank}] megakv-train: error: {error}", file=sys.stderr)
        if guard is not None:
            guard.report(str(error), EXIT_CONFIG, said=said)
            if not said and not guard.wait_until_said(0):
                print(f"[rank {rank}] megakv-train: error: {error}", file=sys.stderr)  # rank 0 never did
        elif not said:
            _quiet_rank_wait(rank, error)
        return EXIT_CONFIG
    if guard is not None:
        failure = guard.agree()
        if failure is not None:
            print(failure.describe(rank), file=sys.stderr)
            guard.mark_said()
            return failure.code or EXIT_FAILED
    if layout.rank == 0:
        _prepare_run_dir(launch)
    from megakv.data.errors import DataError
    from megakv.safe_load import UnsafeFileError
    from megakv.train.checkpoint import CheckpointError
    from megakv.train.run_dir import RunDirWriteError

    try:
        code = _train(cfg, layout, launch, guard, stop)
    except (ConfigError, DataError, CheckpointError, UnsafeFileError, RunDirWriteError) as e:  # found while running
        message = str(e)
        print(f"[rank {layout.rank}] megakv-train: error: {message}", file=sys.stderr)
        code = EXIT_CONFIG
        _record_failure(launch, layout, message, layout.rank)
        if guard is not None:
            guard.report(message, code)
    except BaseException as e:  # noqa: BLE001 - report, then leave without interpreter teardown (gloo aborts there)
        peer = guard.wait_for_error(0.5) if guard is not None else None
        if peer is not None:  # our collective failed because a peer stopped: its message is the one that matters
            print(peer.describe(layout.rank), file=sys.stderr)
            code = peer.code or EXIT_FAILED
            _record_failure(launch, layout, peer.message, peer.rank)
        else:
            traceback.print_exc()
            code = EXIT_FAILED
            message = f"{type(e).__name__}: {e}"
            _record_failure(launch, layout, message, layout.rank)
            if guard is not None:
                guard.report(message, code)
    _exit(code)


if __name__ == "__main__":
    sys.exit(main())
