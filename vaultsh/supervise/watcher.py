"""Follow a run written elsewhere (Slurm, Ray) by polling its commit records.

Each new commit record is folded into its worker's state as the `committed`
event its worker sent when it wrote it (vaultsh/events.py), so a watched run
counts commits exactly as a supervised one.

`StoreWatcher` presents the same interface as `Supervisor` (snapshot, totals,
logs, history), read-only: it owns no process, so it cannot pause or stop
anything. Only commit records that are new since the last poll are read.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable

from vaultsh.errors import NotFoundError, UserError
from vaultsh.events import Committed, fold
from vaultsh.run import CommitRecord, Run
from vaultsh.supervise.state import DONE, IDLE, RUNNING, WAITING
from vaultsh.supervise.supervisor import RunInfo, Supervisor

_COMMIT_KEY = re.compile(r"w(\d{4,})/(\d{7,})\.json$")
RATE_WINDOW_S = 120.0


class StoreWatcher(Supervisor):
    """A read-only view of run `run_uri` from its commit records, polled every `interval` seconds."""

    read_only = True

    def __init__(
        self,
        run_uri: str,
        interval: float = 2.0,
        idle_after: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.run = Run.at(run_uri)
        cfg = self.run.read_cfg()
        if cfg is None:
            raise NotFoundError(f"{self.run.uri}: no cfg.json there (not a vaultsh run, or not started yet)")
        data = _dict(_dict(cfg.get("config")).get("data"))
        num_runs = _pos_int(cfg.get("num_runs"), 1)
        hooks = list(_dict(cfg.get("hooks")))
        info = RunInfo(
            run=str(cfg.get("run_name") or self.run.name),
            model=str(cfg.get("model_name") or ""),
            hooks=[str(h) for h in hooks],
            store=self.run.uri,
            num_runs=num_runs,
        )
        super().__init__(launcher=_no_launch, machines=range(num_runs), info=info, clock=clock, sample_memory=False)
        n_batches, start = _pos_int(data.get("n_batches"), 0), _pos_int(data.get("start_batch"), 0)
        for i, w in self.workers.items():
            w.state = WAITING
            w.total_batches = len(range(start + (i - start) % num_runs, n_batches, num_runs)) if n_batches else None
        self.interval = interval
        self.idle_after = idle_after
        self._seen: set[str] = set()
        self._last_commit: dict[int, float] = {}
        self._samples: dict[int, deque] = {i: deque() for i in self.workers}
        self._recent: dict[int, deque] = {i: deque(maxlen=200) for i in self.workers}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    # -- polling ----------------------------------------------------------
    def start(self) -> None:
        """Poll once now, then every `interval` seconds in a background thread."""
        self.started_at = self.clock()
        self.poll_once()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="watch-commits")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll_once()

    def poll_once(self) -> int:
        """Read commit records that appeared since the last poll; returns how many."""
        try:
            new = self._read_new()
        except UserError as exc:  # store unreachable, a bad record: say so once, keep polling
            message = f"polling {self.run.uri}: {exc}"
            with self._lock:
                if message != self._error:
                    self._error = message
                    self.log.add(self.clock(), None, "warning", message)
                    self._touch()
            return 0
        now = self.clock()
        with self._lock:
            self._error = None
            num_runs = self.info.num_runs
            for rec in new:
                w = self.workers.get(rec.worker)
                if w is None:
                    continue
                size = sum(f.size for f in rec.files.values())
                # a commit record says what the worker's `committed` event said: the same fold counts it (its
                # notes are left out: the first poll of a long run would fill the events pane with old commits)
                fold(
                    w,
                    Committed(
                        worker=rec.worker,
                        megabatch=rec.index,
                        batch_start=rec.batch_start,
                        batch_end=rec.batch_end,
                        tokens=rec.tokens,
                        bytes=size,
                    ),
                    now,
                )
                w.batches += (
                    len(range(rec.batch_start, rec.batch_end, num_runs))
                    if num_runs > 1
                    else rec.batch_end - rec.batch_start
                )
                w.tokens += rec.tokens
                self._last_commit[rec.worker] = now
                self._recent[rec.worker].append(
                    f"{rec.created}  megabatch {rec.index}: batches {rec.batch_start}-{rec.batch_end - 1}, "
                    f"{rec.tokens:,} tokens, {size:,} bytes"
                )
            for i, w in self.workers.items():
                samples = self._samples[i]
                samples.append((now, w.tokens))
                while samples and now - samples[0][0] > RATE_WINDOW_S:
                    samples.popleft()
                t0, k0 = samples[0]
                w.tokens_per_s = (w.tokens - k0) / (now - t0) if now > t0 else 0.0
                if w.total_batches is not None and w.batches >= w.total_batches:
                    w.state, w.tokens_per_s = DONE, 0.0
                elif i not in self._last_commit:
                    w.state = WAITING
                else:
                    w.state = IDLE if now - self._last_commit[i] > self.idle_after else RUNNING
            if new:
                self._touch()
            if self.ended_at is None and all(w.state == DONE for w in self.workers.values()):
                self.ended_at = now
        return len(new)

    def _read_new(self) -> list[CommitRecord]:
        base = self.run.commits_prefix()
        fresh = []
        for info in self.run.store.iter_objects(base):
            if info.key in self._seen:
                continue
            m = _COMMIT_KEY.search(info.key[len(base) :])
            if not m:
                continue
            fresh.append(info.key)
        out = []
        for key in sorted(fresh):
            try:
                data = self.run.store.get_range(key, 0, 1 << 20)
            except NotFoundError:
                continue
            rec = CommitRecord.from_json(data, self.run.store.child_uri(key))
            self._seen.add(key)
            out.append(rec)
        return out

    # -- the Supervisor interface, read-only --------------------------------
    def tick(self) -> None:
        with self._lock:
            now = self.clock()
            if now - self._last_sample >= 1.0:
                self._last_sample = now
                self._sample()

    @property
    def finished(self) -> bool:
        return all(w.state == DONE for w in self.workers.values())

    def pause(self, i=None) -> list[int]:
        return []

    def resume(self, i=None) -> list[int]:
        return []

    def toggle_pause(self, i=None) -> list[int]:
        return []

    def stop(self, i=None) -> list[int]:
        return []

    def restart(self, i) -> bool:
        return False

    def kill(self, i) -> bool:
        return False

    def running(self) -> bool:
        return False  # nothing of ours to stop: quitting never asks

    def log_tail(self, i: int, n: int = 40) -> list[str]:
        """Worker i's latest commits, one line each (its own logs live where it runs)."""
        with self._lock:
            return list(self._recent.get(i, ()))[-n:]


def _no_launch(i: int):
    raise RuntimeError("a watcher starts no workers")


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _pos_int(v, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default
