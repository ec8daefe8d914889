"""No rank waits for a peer that has already failed.

Every rank of a multi-process launch meets on the launcher's rendezvous store (env://: MASTER_ADDR /
MASTER_PORT, torchrun's agent store included) before the process group exists:

  * launch checks: each rank posts whether its checks passed; a rank that failed posts its message and
    every other rank exits with that message (and the failing rank's exit code) instead of waiting;
  * afterwards a watchdog thread polls the same store, so an error on one rank (a data file it cannot
    read, a crash) ends every other rank within a fraction of a second, even one blocked in a collective;
  * the same thread beats a counter on the store and watches the next rank's (a ring, so the store's load
    grows with the world size, not its square): a rank that freezes or vanishes without a word (SIGSTOP,
    a lost node) is reported by its watcher after `parallel.timeout` seconds, and every rank exits. The
    process group is created with the same timeout (DeepSpeed's own sub-groups keep torch's default, which
    is why the heartbeat is needed).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

POLL_S = 0.1
WATCH_S = 0.25
BEAT_S = 0.25
GONE_S = 1.0  # a peer whose heartbeat has not moved for this long is not going to read a message
ACK_WAIT_S = 10.0  # how long a failing rank keeps the store alive for its peers to read its message


@dataclass(frozen=True)
class PeerFailure:
    rank: int
    message: str
    code: int

    def describe(self, me: int) -> str:
        return f"[rank {me}] megakv-train: stopping because rank {self.rank} failed: {self.message}"


def env_rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class LaunchGuard:
    def __init__(self, store, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives a restart
        self.prefix = f"megakv/attempt{attempt}/"
        self.store = dist.PrefixStore(self.prefix, store)
        self.raw_store = store
        # env:// puts the store in rank 0's process (torchrun keeps its own): exiting there takes it away
        self.hosts_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        self._watching = threading.Event()

    @classmethod
    def connect(cls, timeout_s: float) -> LaunchGuard | None:
        """Meet the other ranks on the launcher's store; None for a single process."""
        rank, world = env_rank_world()
        if world <= 1 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return None
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=timeout_s)))
        store.set_timeout(timedelta(seconds=timeout_s))
        return cls(store, rank, world, timeout_s)

    # ------------------------------------------------------------------ the error board
    def posted_or_raise(self, store=None) -> PeerFailure | None:
        store = store or self.store
        if not store.check(["error"]):
            return None
        raw = json.loads(store.get("error"))
        return PeerFailure(int(raw["rank"]), str(raw["message"]), int(raw["code"]))

    def posted(self) -> PeerFailure | None:
        try:
            return self.posted_or_raise()
        except Exception:  # noqa: BLE001 - the store is gone (its host exited): nothing more to learn
            return None

    def report(self, message: str, code: int, said: bool = True) -> None:
        """Tell every rank why this one stops; the store's host stays until they have read it (or a short while).

        said: this rank has printed the message (a rank that leaves a shared mistake to rank 0 has not)."""
        payload = json.dumps({"rank": self.rank, "message": message, "code": code})
        try:
            self.store.compare_set("error", "", payload)  # the first failure is the one reported
            if not said:  # counted as done once it has heard rank 0 say it (wait_until_said)
                return
            self.mark_said()
            self.store.add("failed", 1)
            if not self.hosts_store:
                return
            deadline = time.monotonic() + min(ACK_WAIT_S, self.timeout_s)
            others = [r for r in range(self.world_size) if r != self.rank]
            beats = {r: self.store.add(f"beat/{r}", 0) for r in others}
            changed = time.monotonic()
            # until every other rank has read the message or failed itself, or none is alive to read it
            beating = any(beats.values())  # before the process group nobody beats: wait the whole while
            while (time.monotonic() < deadline and not (beating and time.monotonic() - changed > GONE_S)
                   and self.store.add("acks", 0) + self.store.add("failed", 0) < self.world_size):
                time.sleep(POLL_S)
                now = {r: self.store.add(f"beat/{r}", 0) for r in others}
                if now != beats:
                    beats, changed = now, time.monotonic()
        except Exception:  # noqa: BLE001 - best effort: the peers still end by parallel.timeout
            pass

    def _acknowledge(self, store=None) -> None:
        try:
            (store or self.store).add("acks", 1)
        except Exception:  # noqa: BLE001
            pass

    def mark_said(self) -> None:
        """This rank has printed why the launch stops (its own failure or a peer's)."""
        try:
            self.store.set(f"said/{self.rank}", "1")
        except Exception:  # noqa: BLE001
            pass

    def wait_until_said(self, rank: int = 0) -> bool:
        """Wait (up to parallel.timeout) until `rank` has printed why the launch stops; False if it never did.

        A rank that leaves a shared mistake to rank 0 must not exit first: a launcher that stops every rank
        when one fails (torchrun, the deepspeed launcher) would stop rank 0 before it says anything."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                if self.store.check([f"said/{rank}"]):
                    self.store.add("failed", 1)  # heard: the store's host need not wait for this rank any more
                    return True
            except Exception:  # noqa: BLE001 - the store is gone with its host: nobody is left to say it
                return False
            time.sleep(POLL_S)
        return False

    def wait_for_error(self, seconds: float) -> PeerFailure | None:
        """After a collective failed here: did a peer explain why? (It may still be posting.)"""
        deadline = time.monotonic() + seconds
        while True:
            failure = self.posted()
            if failure is not None and failure.rank != self.rank:
                self._acknowledge()
                return failure
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S)

    # ------------------------------------------------------------------ the launch checks
    def agree(self) -> PeerFailure | None:
        """This rank passed its checks: wait until every rank did, or one posts why it did not."""
        self.store.add("passed", 1)
        deadline = time.monotonic() + self.timeout_s
        while True:
            failure = self.posted()
            if failure is not None:
                self._acknowledge()
                return failure
            passed = self.store.add("passed", 0)
            if passed >= self.world_size:
                return None
            if time.monotonic() >= deadline:
                return PeerFailure(-1, f"only {passed} of {self.world_size} ranks reached the end of the launch "
                                   f"checks within parallel.timeout={self.timeout_s:g}s; the others are stuck or "
                                   "were never started. Fix: check the other ranks' output and the launcher", 1)
            time.sleep(POLL_S)

    # ------------------------------------------------------------------ after the checks
    def init_process_group(self, backend: str) -> None:
        """The world process group, on this store, with collectives bounded by parallel.timeout."""
        dist.init_process_group(backend, store=dist.PrefixStore("pg/", self.store), rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=self.timeout_s))

    def _watch_store(self):
        """A connection of the watcher's own: one store client serialises its calls, so a main thread waiting
        on the store (DeepSpeed creating a process group waits for every rank there) kept the watcher from
        reading a peer's error until parallel.timeout."""
        try:
            client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=timedelta(seconds=self.timeout_s))
            return dist.PrefixStore(self.prefix, client)
        except Exception:  # noqa: BLE001 - the shared client still works, only slower to notice
            return self.store

    def watch(self, on_failure) -> None:
        """A daemon thread: beat, watch the next rank's beat, and when any rank posts an error (or the
        watched rank or the store goes silent for parallel.timeout) call on_failure(failure), which exits."""
        watched = (self.rank + 1) % self.world_size
        store = self._watch_store()
        lost_store = PeerFailure(-1, f"lost contact with the rendezvous store (MASTER_ADDR:MASTER_PORT, hosted by "
                                 f"rank 0 or the launcher) for {self.timeout_s:g}s (parallel.timeout): it exited or "
                                 "froze", 1)
        contact = {"last": time.monotonic()}  # when a store call last returned (read by the deadman)

        def loop():
            beats, last_beat = -1, -1.0
            seen_change = time.monotonic()
            while self._watching.is_set():
                now = time.monotonic()
                try:
                    if now - last_beat >= BEAT_S:
                        store.add(f"beat/{self.rank}", 1)
                        peer = store.add(f"beat/{watched}", 0)
                        last_beat = now
                        if peer != beats:
                            beats, seen_change = peer, now
                    failure = self.posted_or_raise(store)
                    contact["last"] = time.monotonic()
                except Exception:  # noqa: BLE001 - the store host is gone: the deadman counts the silence
                    failure = None
                if failure is None and now - seen_change > self.timeout_s and self._watching.is_set():
                    failure = PeerFailure(watched, f"rank {watched} stopped responding: no heartbeat for "
                                          f"{self.timeout_s:g}s (parallel.timeout); it froze, was stopped or its "
                                          "machine is gone. Fix: check that rank's log and machine", 1)
                    self.report_for(failure, store)
                if failure is not None and failure.rank != self.rank:
                    self._acknowledge(store)
                    on_failure(failure)
                    return
                time.sleep(WATCH_S)

        def deadman():
            # The store is gone (calls fail) or frozen (SIGSTOP, a hung node: calls block past their own
            # timeout, so the loop above never gets to count): either way no call has returned for a while.
            while self._watching.is_set():
                if time.monotonic() - contact["last"] > self.timeout_s + WATCH_S:
                    on_failure(lost_store)  # no acknowledgement: it would block on the frozen store too
                    return
                time.sleep(WATCH_S)

        self._watching.set()
        threading.Thread(target=loop, name="megakv-launch-guard", daemon=True).start()
        threading.Thread(target=deadman, name="megakv-launch-deadman", daemon=True).start()

    def report_for(self, failure: PeerFailure, store=None) -> None:
        """Post a failure noticed here on behalf of another rank (without waiting)."""
        payload = json.dumps({"rank": failure.rank, "message": failure.message, "code": failure.code})
        try:
            (store or self.store).compare_set("error", "", payload)
        except Exception:  # noqa: BLE001
            pass

    def stop_watching(self) -> None:
        self._watching.clear()


def exit_for_peer(failure: PeerFailure, rank: int, before_exit=None) -> None:
    """Print the failing rank's message, let the caller record it, and leave at once with its exit code."""
    print(failure.describe(rank), file=sys.stderr, flush=True)
    if before_exit is not None:
        try:
            before_exit(failure)
        except Exception:  # noqa: BLE001 - the exit matters more than the record
            pass
    sys.stdout.flush()
    os._exit(failure.code or 1)
