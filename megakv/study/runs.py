"""Train, resume and score the study's models, caching each result under the part's directory.

A run is `megakv-train` in a subprocess (torchrun when nproc > 1) with `--resume auto`, so an interrupted
study continues from the run's last checkpoint, and a finished run (status.json "finished") is not
trained again. Held-out losses per retention are cached in a small json next to the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from omegaconf import OmegaConf

from megakv.config import flat_settings, load_config
from megakv.data.metadata import dataset_identity, loss_mask_identity
from megakv.eval.data import load_eval_tokens, make_windows
from megakv.eval.loss import evaluate_plans
from megakv.locking import LockHeldError, describe_holder, take_lock
from megakv.model_paths import resolve_model
from megakv.train.run_dir import read_status, write_json_atomically
from megakv.train.run_lock import LOCK_FILE

Log = Callable[[str], None]


Settings = TypeVar("Settings")


def scale_settings_of(scales: Mapping[str, Settings], scale: str) -> Settings:
    """A study part's settings for `scale` (its SCALES: cpu, tiny, ...); a ValueError naming the choices else."""
    if scale not in scales:
        raise ValueError(f"unknown study scale {scale!r}: choose one of {', '.join(scales)}")
    return scales[scale]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside (work run beside other work), restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def is_finished(run_dir: Path) -> bool:
    status = read_status(run_dir)
    return status is not None and status.get("state") == "finished"


def train_command(config: Path, run_dir: Path, overrides: Sequence[str], nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "megakv.cli.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "megakv.cli.train"]
    return [*launcher, str(config), f"train.run_dir={run_dir}", *overrides, "--resume", "auto"]


# Settings that do not change the trained model: a cached run is reused whatever they are now.
NOT_COMPARED = ("train.run_dir", "train.debug.", "checkpoint.", "logging.", "validation.", "data.cache_dir",
                "data.valid_datasets", "parallel.timeout")


def settings_changes(run_dir: Path, overrides: Sequence[str], config: Path | None = None) -> list[str]:
    """The settings a run directory's saved config.yaml disagrees with, as 'key: saved -> asked' lines: each
    override, and with `config` (the recipe the run is launched with) every other setting it resolves to.

    Empty when the directory holds no run yet. A study that changed its settings (or its recipe) must not
    silently reuse (or resume into) a model trained with the old ones.
    """
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return []
    saved = OmegaConf.load(saved_path)
    moved = _moved_root(OmegaConf.select(saved, "train.run_dir", default=None), run_dir)
    # megakv-train applies overrides in order, so a key given twice ends with its last value.
    last_override_per_key = {override.split("=", 1)[0]: override for override in overrides}
    changes = []
    for key, override in last_override_per_key.items():
        if key.startswith(NOT_COMPARED):  # e.g. checkpoint.every, asked more often now than the run was saved
            continue
        asked = OmegaConf.select(OmegaConf.from_dotlist([override]), key)
        had = OmegaConf.select(saved, key, default=None)
        asked, had = (OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for v in (asked, had))
        if not _same_setting(asked, had, moved):
            changes.append(f"{key}: {had} -> {asked}")
    if config is not None:
        resolved = flat_settings(OmegaConf.to_container(OmegaConf.structured(load_config(config, list(overrides)))))
        saved_flat = flat_settings(OmegaConf.to_container(saved))
        for key, asked in resolved.items():
            if key in last_override_per_key or key.startswith(NOT_COMPARED) or key not in saved_flat:
                continue
            if not _same_setting(asked, saved_flat[key], moved):
                changes.append(f"{key}: {saved_flat[key]} -> {asked}")
    return changes


def _moved_root(saved_run_dir: str | None, run_dir: Path) -> tuple[Path, Path] | None:
    """(old, new) when the run directory was moved or copied (the study's --out, or a directory above it): the
    saved train.run_dir and this one with their common tail taken off. A path the run was trained with under
    `old` counts as the same setting as that path under `new` (the data prepared inside --out moved with it;
    its content is checked by `_check_inputs`, and megakv-train's resume checks it by fingerprint too)."""
    if not saved_run_dir:
        return None
    old, new = Path(saved_run_dir).resolve(), Path(run_dir).resolve()
    while old.name and old.name == new.name:
        old, new = old.parent, new.parent
    return None if old == new else (old, new)


def _same_setting(asked, had, moved: tuple[Path, Path] | None = None) -> bool:
    """Equal values; paths count as equal when they name the same file (relative or absolute spelling), or the
    same file relative to a moved run directory's root (`moved`: `_moved_root`)."""
    if isinstance(asked, list) and isinstance(had, list):
        return len(asked) == len(had) and all(_same_setting(a, h, moved) for a, h in zip(asked, had))
    if isinstance(asked, str) and isinstance(had, str) and asked != had:
        asked_path, had_path = Path(asked).resolve(), Path(had).resolve()
        if asked_path == had_path:
            return True
        return moved is not None and had_path.is_relative_to(moved[0]) and (
            moved[1] / had_path.relative_to(moved[0]) == asked_path)
    return asked == had


def input_identities(config: Path, overrides: Sequence[str]) -> dict[str, str]:
    """What a run trains on, by content: each training set (with its loss mask) and the model it starts from.
    A study whose settings are unchanged but whose data was prepared again under the same names (or whose
    base model was rebuilt) must not reuse the models trained on the old ones. Keyed by the setting and
    position, not the path: a moved or copied --out (its data and base model with it) is the same input when
    its content is (the settings check decides whether the paths are the same)."""
    cfg = load_config(config, list(overrides))
    identities = {}
    for index, prefix in enumerate(cfg.data.datasets):
        mask = loss_mask_identity(prefix)
        identities[f"data.datasets[{index}]"] = dataset_identity(prefix) + (f"+mask {mask}" if mask else "")
    if cfg.checkpoint.init_from:
        identities["checkpoint.init_from"] = model_fingerprint(Path(cfg.checkpoint.init_from))
    return identities


def _input_names(config: Path, overrides: Sequence[str]) -> dict[str, str]:
    """How an input is named in messages: its kind and resolved path."""
    cfg = load_config(config, list(overrides))
    names = {f"data.datasets[{i}]": f"data {Path(p).resolve()}" for i, p in enumerate(cfg.data.datasets)}
    if cfg.checkpoint.init_from:
        names["checkpoint.init_from"] = f"init_from {Path(cfg.checkpoint.init_from).resolve()}"
    return names


def _by_setting(record: dict[str, str]) -> dict[str, str]:
    """A record written before inputs were keyed by setting ('data /abs/path', 'init_from /abs/path', in the
    settings' order), keyed as now."""
    if not any(key.startswith(("data ", "init_from ")) for key in record):
        return record
    data = [value for key, value in record.items() if key.startswith("data ")]
    keyed = {f"data.datasets[{i}]": value for i, value in enumerate(data)}
    for key, value in record.items():
        if key.startswith("init_from "):
            keyed["checkpoint.init_from"] = value
    return keyed


def _check_inputs(config: Path, run_dir: Path, overrides: Sequence[str]) -> None:
    """Record the run's inputs beside it (RUN_inputs.json) the first time, refuse other ones afterwards. A run
    cached before the record existed is taken as trained on today's inputs (as it was before)."""
    record = run_dir.parent / f"{run_dir.name}_inputs.json"
    now = input_identities(config, overrides)
    if record.is_file():
        then = _by_setting(json.loads(record.read_text()))
        changed = sorted(name for name in {*then, *now} if then.get(name) != now.get(name))
        if changed:
            names = _input_names(config, overrides)
            raise ValueError(f"{run_dir} holds a run trained on other inputs than these "
                             f"({', '.join(names.get(c, c) for c in changed)} changed since: prepared again, or "
                             "rebuilt). Fix: move or delete that directory to train it again on them, or use "
                             "another --out")
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(record, now)


class StudyStopped(Exception):
    """The study was asked to stop (SIGTERM, SIGINT): its trainings were passed the signal and saved."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class Trainings:
    """The trainings a study runs now (every thread's) and the stop signal it received, if any. The study's
    signal handler (megakv/cli/study.py) passes its signal on to each: megakv-train then finishes its step,
    saves a checkpoint ("preempted") and exits, so a rerun resumes it; no new training starts."""

    def __init__(self) -> None:
        self._live: set[subprocess.Popen] = set()
        self._stop: int | None = None

    def stop(self, signum: int) -> int:
        """Ask every running training to save and stop (`signum`, as megakv-train handles it). Returns how
        many were asked. Safe in a signal handler: no lock (the set is copied whole under the GIL)."""
        self._stop = self._stop or signum
        asked = 0
        for process in list(self._live):
            if process.poll() is None:
                _signal(process, signum)
                asked += 1
        return asked

    def add(self, process: subprocess.Popen) -> None:
        self._live.add(process)
        if self._stop:  # the signal came before the process was known here: not passed on yet
            _signal(process, self._stop)

    def discard(self, process: subprocess.Popen) -> None:
        self._live.discard(process)

    def check(self) -> None:
        """Raise StudyStopped once the study was asked to stop."""
        if self._stop:
            raise StudyStopped(self._stop)


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


PR_SET_PDEATHSIG = 1


def _stop_with_parent_thread(parent: int):
    """A preexec_fn: the kernel sends the child SIGTERM when the thread that started it ends, the study's
    SIGKILL or OOM kill included (megakv-train then saves and exits instead of training on as an orphan that
    holds the run's lock). PR_SET_PDEATHSIG rather than a child watching its parent from its own process
    group: megakv-train would have to poll for it (its code, not the study's), a watcher process in between
    can itself be killed, and a process group of its own would no longer get the terminal's Ctrl-C. The
    thread that starts a training waits for it to end, so the signal comes only when the study is gone."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: nothing is imported after the fork

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the study died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


LOCK_WAIT_S = 300.0  # a training left by a killed study saves at its next step boundary, then exits


def _wait_for_leftover(run_dir: Path, log: Log, wait_s: float = LOCK_WAIT_S) -> None:
    """Wait while another process (a training of a study that was killed, saving its checkpoint) holds the
    run's lock, instead of failing at once; after `wait_s` megakv-train's own error names the holder."""
    lock_path = run_dir / LOCK_FILE
    deadline, said = time.monotonic() + wait_s, False
    while lock_path.is_file() and time.monotonic() < deadline:
        try:
            take_lock(lock_path, "megakv-study (checking)").release()
            return
        except LockHeldError as e:
            if not said:
                log(f"{run_dir.name}: waiting for {describe_holder(e.holder)} to save and exit (a training left "
                    f"by an earlier study?), up to {wait_s:.0f} s")
                said = True
            time.sleep(0.5)
        except OSError:
            return  # megakv-train says what is wrong with the directory


SECONDS_FILE = "study_train_seconds.json"  # in the run directory: seconds trained, over every invocation
SECONDS_EVERY_S = 5.0  # the record is brought up to date this often while a training runs: a SIGKILL loses less


def trained_seconds(run_dir: Path) -> dict | None:
    """{"seconds": spent training the run so far, "invocations": how many study invocations trained it}: kept
    in the run directory, added to by each invocation (an interrupted run resumed later counts both)."""
    path = Path(run_dir) / SECONDS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _record_seconds(run_dir: Path, before: dict | None, seconds: float) -> None:
    if not run_dir.is_dir():  # megakv-train stopped before it made the directory: nothing trained
        return
    done = before or {"seconds": 0.0, "invocations": 0}
    write_json_atomically(run_dir / SECONDS_FILE, {"seconds": round(done["seconds"] + seconds, 1),
                                                   "invocations": done["invocations"] + 1})


def train_run(config: Path, run_dir: Path, overrides: Sequence[str], *, log: Log, nproc: int = 1,
              threads: int = 1, trainings: Trainings | None = None) -> float:
    """Train (or finish training) one model; returns the seconds spent here (0 when it was cached).

    megakv-train writes into RUN_train.log beside the run (appended), which is copied to stdout line by line
    with the run's name: its output survives the study (a pipe would break when the study dies, and the
    training's next write, or its signal note, would kill it before it saved). The seconds it trains are added
    to RUN/study_train_seconds.json (also every SECONDS_EVERY_S while it runs): training_time reads them.
    Raises StudyStopped once the study was asked to stop (`trainings`: the study's, for its signal handler).
    """
    trainings = trainings or Trainings()
    changes = settings_changes(run_dir, overrides, config)
    if changes:
        raise ValueError(f"{run_dir} holds a run trained with other settings ({'; '.join(changes)}). Fix: move "
                         "or delete that directory to train it again with these settings, or use another --out")
    _check_inputs(config, run_dir, overrides)
    if is_finished(run_dir):
        log(f"cached: {run_dir}")
        return 0.0
    trainings.check()
    _wait_for_leftover(run_dir, log)
    log(f"training {run_dir.name}: {' '.join(overrides)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    command = train_command(config, run_dir, overrides, nproc)
    log_path = run_dir.parent / f"{run_dir.name}_train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    before = trained_seconds(run_dir)
    start = time.perf_counter()
    with open(log_path, "ab") as sink:
        offset = sink.tell()
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                   preexec_fn=_stop_with_parent_thread(os.getpid()))
    trainings.add(process)
    try:
        _copy_output(process, log_path, offset, run_dir,
                     lambda: _record_seconds(run_dir, before, time.perf_counter() - start))
    except BaseException:
        _signal(process, signal.SIGTERM)  # the study is failing: the training saves and stops too
        process.wait()
        raise
    finally:
        trainings.discard(process)
        _record_seconds(run_dir, before, time.perf_counter() - start)
    if not is_finished(run_dir):
        trainings.check()
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    if not is_finished(run_dir):
        raise RuntimeError(f"{run_dir}: megakv-train returned without finishing (status.json: "
                           f"{read_status(run_dir)}); rerun the study to resume it")
    return time.perf_counter() - start


def _copy_output(process: subprocess.Popen, log_path: Path, offset: int, run_dir: Path,
                 record: Callable[[], None]) -> None:
    """Copy the training's new log lines to stdout, each prefixed with the run's name (two runs train at once
    into one terminal; one write per line), until it exits; `record` the seconds every SECONDS_EVERY_S."""
    pending, recorded = b"", -SECONDS_EVERY_S  # the first time as soon as megakv-train made the run directory
    with open(log_path, "rb") as source:
        source.seek(offset)
        while True:
            ended = process.poll() is not None
            chunk = source.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    sys.stdout.write(f"[{run_dir.name}] {line.decode(errors='replace')}\n")
                sys.stdout.flush()
            elif ended:
                break
            else:
                time.sleep(0.1)
            if time.perf_counter() - recorded > SECONDS_EVERY_S and run_dir.is_dir():
                recorded = time.perf_counter()
                record()
    if pending:
        sys.stdout.write(f"[{run_dir.name}] {pending.decode(errors='replace')}\n")
        sys.stdout.flush()


def timed_train_run(config: Path, run_dir: Path, overrides: Sequence[str], *, log: Log, nproc: int = 1,
                    threads: int = 1, trainings: Trainings | None = None) -> float:
    """`train_run`, returning the seconds the run's training took over every invocation that trained it, also
    for a cached run (`training_time`)."""
    train_run(config, run_dir, overrides, log=log, nproc=nproc, threads=threads, trainings=trainings)
    return training_time(run_dir)[0]


def training_time(run_dir: Path, legacy: float | None = None) -> tuple[float, int]:
    """(seconds, invocations) the run's training took: RUN/study_train_seconds.json; for a run trained before
    that record existed, `legacy` (a time the study recorded then) or RUN_train_seconds.json beside the run,
    else the span of its metrics (0 invocations: not recorded by the study)."""
    if (record := trained_seconds(run_dir)) is not None:
        return float(record["seconds"]), int(record["invocations"])
    old = run_dir.parent / f"{run_dir.name}_train_seconds.json"
    if legacy is None and old.is_file():
        legacy = float(json.loads(old.read_text())["seconds"])
    if legacy is not None:
        return legacy, 1
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = [r for r in rows if "train/loss" in r and "time" in r]
    return (rows[-1]["time"] - steps[0]["time"] + steps[0].get("perf/step_time_s", 0.0) if steps else 0.0), 0


def model_fingerprint(path: Path) -> str:
    """Changes when the model at `path` (a run or model directory) is trained or written again: a cached
    score keyed by it is not reused for a different model saved at the same place."""
    digest = hashlib.sha256()
    for name in ("config.yaml", "status.json", "checkpoints/latest"):
        if (Path(path) / name).is_file():
            digest.update((Path(path) / name).read_bytes())
    latest = Path(path) / "checkpoints" / "latest"
    if latest.is_file():  # the checkpoint's manifest: its run id and every file's sha256 (a retrained model differs)
        state = latest.parent / latest.read_text().strip() / "megakv_state.json"
        if state.is_file():
            digest.update(state.read_bytes())
    for weights in sorted(Path(path).glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def retention_losses(run_dir: Path, data: Path, retains: Sequence[str], *, max_tokens: int, seq_len: int | None = None,
                     cache_name: str = "retention_losses.json", log: Log) -> dict[str, float]:
    """Held-out loss of the run's model at each retention on the first `max_tokens` tokens of `data`.

    Cached in run_dir/cache_name, keyed by the data's content, token budget and window length;
    recomputed only for retentions missing from it.
    """
    cache_path = run_dir / cache_name
    # By content, not path: the same held-out tokens in a moved or copied --out are the same measurement.
    key = f"{dataset_identity(data)}|{max_tokens}|{seq_len}"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    before_content_keys = f"{Path(data).resolve()}|{max_tokens}|{seq_len}"  # written before 2026-12-08
    with_path = [k for k in cache if k.count("|") == 3 and k.split("|", 1)[1] == key]  # path|content: before moves
    migrated = key not in cache and (before_content_keys in cache or bool(with_path))
    if migrated:  # trusted, as the runs cached then are
        cache[key] = cache.pop(before_content_keys) if before_content_keys in cache else cache.pop(with_path[0])
    losses = dict(cache.get(key, {}))
    missing = [r for r in retains if r not in losses]
    if missing:
        model, _ = resolve_model(run_dir)
        model.eval()
        tokens = load_eval_tokens(data, max_tokens=max_tokens)
        windows = make_windows(tokens, seq_len or model.cfg.max_seq_len, model.cfg.vocab_size)
        log(f"scoring {run_dir.name} at {' '.join(missing)} on {len(tokens)} tokens")
        with torch.no_grad():
            for result in evaluate_plans(model, missing, windows):
                losses[result.retain] = result.loss
        cache[key] = losses
    if missing or migrated:
        write_json_atomically(cache_path, cache)
    return {r: losses[r] for r in retains}
