"""A real, throwaway Slurm cluster on this one machine: for the SLURM tests and for trying `slurm/*.sbatch` by hand.

It runs Debian's own daemons (no mocks): one munged, one slurmctld and N slurmd ("node1".."nodeN"). Debian builds
slurmd with multiple-slurmd support, so `slurmd -N nodeK`, each on its own port and all on 127.0.0.1, gives a genuine
N-node allocation: SLURM_NODEID, SLURM_NNODES, SLURM_JOB_NODELIST and `scontrol show hostnames` behave as on a real
cluster, and `srun` starts one task per emulated node.

Everything lives under one directory (munge key and socket, slurm.conf, state, spool, logs, pid files), and the
daemons listen on free ports picked at start-up, so the cluster does not touch the machine's own Slurm configuration.
Clients find it through SLURM_CONF (see `LocalSlurmCluster.env`); sbatch's default `--export=ALL` carries it into jobs.

Node names resolve inside jobs only: the daemons start in a private mount namespace in which a hosts file naming
node1..nodeN is bind-mounted over /etc/hosts. Jobs descend from slurmd, so they see it; the machine's /etc/hosts is
left untouched. Where no mount namespace can be made (an unprivileged container), the names do not resolve and jobs
must use SLURM's NodeAddr (127.0.0.1), as slurm/pretrain.sbatch falls back to doing.

Needs root (CI runs as root) and the Debian packages slurmctld, slurmd, slurm-client and munge, which
`scripts/install_slurm.sh` installs when they are missing.

Python::

    with LocalSlurmCluster(tmp_dir, nodes=2) as cluster:
        job = cluster.sbatch("slurm/pretrain.sbatch", "tiny.yaml", cwd=run_dir)
        records = cluster.wait(job, timeout=120)

Shell::

    python -m megakv.testing.slurm_cluster up --nodes 2    # prints the `export SLURM_CONF=...` line to use
    python -m megakv.testing.slurm_cluster status
    python -m megakv.testing.slurm_cluster down
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_slurm.sh"
DEFAULT_ROOT = Path(tempfile.gettempdir()) / "megakv-slurm"

REQUIRED_COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo")
# States after which a job (or array task) will not run again by itself.
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}
REQUEUE_SETTLE_S = 2.0  # see wait(): let slurmd finish revoking a requeued job's credential


def search_path() -> str:
    """PATH plus /usr/sbin and /sbin, where the daemons are installed and a non-login PATH may not look."""
    parts = [d for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if d]
    return os.pathsep.join(parts + [d for d in ("/usr/sbin", "/sbin") if d not in parts])


class SlurmClusterError(RuntimeError):
    """The local cluster could not be started or used; the message carries the relevant log lines."""


def ensure_slurm_installed(install_script: Path = INSTALL_SCRIPT) -> None:
    """Install the Slurm and munge packages through scripts/install_slurm.sh when any daemon or client is missing."""
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c, path=search_path()) is None]
    if not missing:
        return
    if not install_script.is_file():
        raise SlurmClusterError(
            f"missing {', '.join(missing)} and no installer at {install_script}; "
            "install the Debian packages slurmctld slurmd slurm-client munge"
        )
    proc = subprocess.run(["bash", str(install_script)], capture_output=True, text=True)
    still_missing = [c for c in REQUIRED_COMMANDS if shutil.which(c, path=search_path()) is None]
    if proc.returncode != 0 or still_missing:
        raise SlurmClusterError(
            f"{install_script} failed (exit {proc.returncode}); "
            f"still missing: {', '.join(still_missing) or 'nothing'}\n{proc.stdout}{proc.stderr}"
        )


def _free_ports(count: int) -> list[int]:
    """Ports nobody listens on right now (asked of the kernel all at once, so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _cgroup_v1_freezer_usable() -> bool:
    """proctrack/cgroup (which, like a real cluster, kills every process a step leaves behind) needs the cgroup-v1
    freezer. Probe it by creating and removing a cgroup; otherwise fall back to proctrack/linuxproc."""
    probe = Path(f"/sys/fs/cgroup/freezer/megakv_probe_{os.getpid()}")
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


def _process_alive(pid: int) -> bool:
    """True while `pid` runs. A zombie counts as dead: PID 1 on some CI VMs is no init and reaps late."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parse_scontrol_record(line: str) -> dict[str, str]:
    """`scontrol show ... -o` prints one record per line as `Key=value Key=value ...`; values may contain spaces
    (paths) and `=` (TRES lists), so split only where a space is followed by the next `Key=`."""
    return dict(re.findall(r"(\S+?)=(.*?)(?= \S+?=|$)", line.strip()))


class LocalSlurmCluster:
    """munged + slurmctld + `nodes` slurmd daemons under `root`. Use as a context manager, or call up()/down()."""

    def __init__(
        self,
        root: str | os.PathLike[str] = DEFAULT_ROOT,
        nodes: int = 2,
        *,
        cpus_per_node: int | None = None,
        partition: str = "debug",
        proctrack: str | None = None,
        node_prefix: str = "node",
        first_job_id: int | None = None,
        hosts_namespace: bool = True,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.root = Path(root).resolve()
        self.nodes = nodes
        # Each emulated node may claim all real CPUs; slurm only counts them, they are shared in fact.
        self.cpus_per_node = cpus_per_node or os.cpu_count() or 1
        self.partition = partition
        self.proctrack = proctrack
        self.node_names = [f"{node_prefix}{i}" for i in range(1, nodes + 1)]
        # Two clusters on one machine (two test sessions at once) share the node names, hence the per-job cgroups
        # slurm_nodeK/uid_U/job_J of proctrack/cgroup: start each at its own job id so their jobs never meet.
        self.first_job_id = first_job_id or random.randint(1, 9999) * 100
        self.hosts_namespace = hosts_namespace

    # ---------------------------------------------------------------- paths and environment
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def munge_socket(self) -> Path:
        # munged insists that every directory above its socket is world-searchable, which pytest's temporary
        # directories (0700) are not; a short fixed path also stays within the 108-byte limit of socket paths.
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"megakv-munge-{digest}" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """The current environment plus SLURM_CONF: what every client command (and, through sbatch, every job) needs."""
        return {**os.environ, "PATH": search_path(), "SLURM_CONF": str(self.conf)}

    def _pid_files(self) -> list[Path]:
        run = self.root / "run"
        # Stop order: node daemons, then the controller, then munge (which the others talk to while stopping).
        return sorted(run.glob("slurmd-*.pid")) + [run / "slurmctld.pid", run / "munged.pid"]

    def is_up(self) -> bool:
        for pid_file in self._pid_files():
            try:
                if _process_alive(int(pid_file.read_text().split()[0])):
                    return True
            except (OSError, ValueError, IndexError):
                continue
        return False

    # ---------------------------------------------------------------- start / stop
    def up(self, timeout: float = 30.0) -> LocalSlurmCluster:
        if os.geteuid() != 0:
            raise SlurmClusterError("the local Slurm cluster runs its daemons as root (SlurmUser=root); run as root")
        ensure_slurm_installed()
        if self.is_up():
            raise SlurmClusterError(f"a cluster is already running under {self.root}; stop it first (down)")
        # Old state would bring back old jobs and job ids: always start from an empty directory tree.
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
            (self.root / sub).mkdir(parents=True)
        for name in self.node_names:
            (self.root / "spool" / name).mkdir()
        try:
            self._start_munge()
            self._write_config()
            self._start_slurm()
            self._wait_idle(timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        key = munge / "munge.key"
        self._check(["mungekey", "--create", "--keyfile", str(key)], "mungekey")
        shutil.rmtree(self.munge_socket.parent, ignore_errors=True)
        self.munge_socket.parent.mkdir(mode=0o755)  # munged refuses a socket directory others can write to
        self._check(
            [
                "munged",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={self.log_dir / 'munged.log'}",
                f"--pid-file={self.root / 'run' / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            "munged",
        )

    def _write_config(self) -> None:
        root, etc = self.root, self.root / "etc"
        host = socket.gethostname().split(".")[0]
        proctrack = self.proctrack or (
            "proctrack/cgroup" if _cgroup_v1_freezer_usable() else "proctrack/linuxproc"
        )
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        mem_total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        mem_per_node = max(256, mem_total_mb * 8 // 10 // self.nodes)
        lines = [
            "ClusterName=megakv-local",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
            f"ProctrackType={proctrack}",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            # No accounting daemon, so sacct is unavailable: keep finished jobs visible to `scontrol show job` for an
            # hour, and log every job end (each requeue included) to a text file.
            "MinJobAge=3600",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.log_dir / 'jobcomp.txt'}",
            f"FirstJobId={self.first_job_id}",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name, port in zip(self.node_names, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory={mem_per_node} State=UNKNOWN"
            )
        lines.append(f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        # Only read with proctrack/cgroup. Constrain nothing: the emulated nodes share the machine's CPUs and memory.
        (etc / "cgroup.conf").write_text(
            "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n"
            "ConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n"
        )
        (etc / "hosts").write_text(f"127.0.0.1 localhost {host}\n127.0.0.1 {' '.join(self.node_names)}\n")
        (root / "cluster.json").write_text(
            json.dumps({"nodes": self.node_names, "proctrack": proctrack, "partition": self.partition}, indent=1)
            + "\n"
        )

    def _start_slurm(self) -> None:
        # The daemons fork into the background; the namespace lives on as long as they do.
        start = " && ".join(["slurmctld"] + [f"slurmd -N {name}" for name in self.node_names])
        hosts = self.root / "etc" / "hosts"
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if self.hosts_namespace and subprocess.run([*unshare, "true"], capture_output=True).returncode == 0:
            cmd = [*unshare, "sh", "-c", f"mount --bind '{hosts}' /etc/hosts && {start}"]
        else:
            # No private mount namespace (e.g. an unprivileged container): node names will not resolve inside jobs,
            # and scripts must reach nodes by address (`scontrol show node N` -> NodeAddr), as pretrain.sbatch does.
            self.hosts_namespace = False
            cmd = ["sh", "-c", start]
        with open(self.log_dir / "startup.log", "wb") as out:
            proc = subprocess.run(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if proc.returncode:
            raise SlurmClusterError(f"starting slurmctld/slurmd failed (exit {proc.returncode})\n{self.diagnostics()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.run(["sinfo", "--noheader", "--format=%N %t", "--Node"], check=False)
            states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
            if proc.returncode == 0 and set(states) == set(self.node_names) and set(states.values()) == {"idle"}:
                return
            time.sleep(0.2)
        raise SlurmClusterError(f"nodes not idle after {timeout:.0f} s\n{self.diagnostics()}")

    def down(self, timeout: float = 30.0) -> None:
        """Cancel every job, then stop the daemons by pid. Idempotent. Jobs go first: killing slurmd does not kill the
        jobs it started (slurmstepd survives it)."""
        deadline = time.monotonic() + timeout
        if (self.root / "run" / "slurmctld.pid").exists():
            self.run(["scancel", "--full", f"--user={os.getuid()}"], check=False)
            while time.monotonic() < deadline:
                proc = self.run(["squeue", "--noheader"], check=False)
                if proc.returncode or not proc.stdout.strip():
                    break
                time.sleep(0.2)
        for pid_file in self._pid_files():
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            while _process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _process_alive(pid):
                os.kill(pid, signal.SIGKILL)
            pid_file.unlink(missing_ok=True)
        shutil.rmtree(self.munge_socket.parent, ignore_errors=True)
        # proctrack/cgroup leaves one (empty) cgroup tree per emulated node behind.
        for name in self.node_names:
            for top in Path("/sys/fs/cgroup").glob(f"*/slurm_{name}"):
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
                    try:
                        d.rmdir()
                    except OSError:
                        pass

    def __enter__(self) -> LocalSlurmCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---------------------------------------------------------------- using it
    def run(self, args: Sequence[str], *, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
        """Run a client command (sinfo, scontrol, ...) against this cluster; output captured as text."""
        kwargs.setdefault("env", self.env)
        proc = subprocess.run(list(args), capture_output=True, text=True, **kwargs)
        if check and proc.returncode:
            raise SlurmClusterError(f"{' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc

    def _check(self, args: Sequence[str], what: str) -> None:
        proc = subprocess.run(list(args), capture_output=True, text=True, stdin=subprocess.DEVNULL, env=self.env)
        if proc.returncode:
            raise SlurmClusterError(f"{what} failed (exit {proc.returncode}): {proc.stdout}{proc.stderr}")

    def sbatch(
        self,
        script: str | os.PathLike[str],
        *args: str,
        options: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> int:
        """Submit `script args...` with extra sbatch `options`; returns the job id. `env` is added to the job's
        environment (sbatch exports the submitting environment by default), `cwd` is the submit directory (a relative
        `script` is relative to this process's directory, not to `cwd`)."""
        job_env = {**self.env, **(env or {})}
        script = Path(script).resolve()
        proc = self.run(["sbatch", "--parsable", *options, str(script), *args], env=job_env, cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> list[dict[str, str]]:
        """`scontrol show job` records: one for a plain job, one per array task (pending tasks may share one)."""
        proc = self.run(["scontrol", "--oneliner", "show", "job", str(job_id)], check=False)
        if proc.returncode:
            raise SlurmClusterError(f"job {job_id} unknown: {proc.stderr.strip()}")
        return [parse_scontrol_record(line) for line in proc.stdout.splitlines() if line.strip()]

    def signal(self, job_id: int, sig: str = "USR1", *, batch: bool = False) -> None:
        """`scancel --signal`: to the job's steps, or with batch=True only to the batch shell (what `--signal=B:...`
        does at the time limit, without waiting for slurmctld's 30 s timer)."""
        self.run(["scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id)])

    def release_begin_time(self, job_id: int | str, *, check: bool = True) -> None:
        """A requeued job waits 120 s (Reason=BeginTime) before it may start again; tests cannot afford that."""
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=check)

    def wait(self, job_id: int, timeout: float, *, release_requeued: bool = True, poll: float = 0.3):
        """Wait until the job (every array task) reaches a terminal state; return its records. Requeued jobs are let
        go at once (release_begin_time) unless release_requeued is False."""
        deadline = time.monotonic() + timeout
        held_since: dict[str, float] = {}
        while True:
            records = self.job(job_id)
            if records and all(r.get("JobState") in TERMINAL_STATES for r in records):
                return records
            if release_requeued:
                for r in records:
                    if r.get("JobState") == "PENDING" and r.get("Reason") == "BeginTime":
                        # slurmd revokes the killed run's credential with one-second resolution: a restart in the
                        # same second as the requeue is refused ("Job credential revoked"). Wait a little first.
                        first_seen = held_since.setdefault(r["JobId"], time.monotonic())
                        if time.monotonic() - first_seen >= REQUEUE_SETTLE_S:
                            self.release_begin_time(r["JobId"], check=False)
            if time.monotonic() > deadline:
                states = ", ".join(f"{r.get('JobId')}:{r.get('JobState')}({r.get('Reason')})" for r in records)
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {states}\n{self.diagnostics()}")
            time.sleep(poll)

    def completions(self) -> list[dict[str, str]]:
        """Every job end the controller logged (jobcomp/filetxt), requeues included, oldest first."""
        path = self.log_dir / "jobcomp.txt"
        if not path.exists():
            return []
        return [parse_scontrol_record(line) for line in path.read_text().splitlines() if line.strip()]

    def diagnostics(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log}\n" + "\n".join(tail))
        return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megakv.testing.slurm_cluster", description="Start or stop a throwaway local Slurm cluster."
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_ROOT, help=f"where it all lives (default {DEFAULT_ROOT})")
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes (up; default 2)")
    parser.add_argument("--proctrack", choices=["proctrack/cgroup", "proctrack/linuxproc"], help="default: probe")
    args = parser.parse_args(argv)
    root = args.dir.resolve()
    nodes = args.nodes
    if args.action != "up" and (root / "cluster.json").exists():
        nodes = len(json.loads((root / "cluster.json").read_text())["nodes"])
    cluster = LocalSlurmCluster(root, nodes, proctrack=args.proctrack)
    try:
        if args.action == "up":
            cluster.up()
            print(cluster.run(["sinfo"]).stdout, end="")
            print(f"export SLURM_CONF={cluster.conf}")
        elif args.action == "down":
            cluster.down()
            print(f"stopped the cluster under {root}")
        else:
            if not cluster.is_up():
                print(f"no cluster running under {root}")
                return 1
            print(cluster.run(["sinfo", "--Node", "--long"]).stdout, end="")
            print(cluster.run(["squeue"]).stdout, end="")
            print(f"export SLURM_CONF={cluster.conf}")
    except SlurmClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
