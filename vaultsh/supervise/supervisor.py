"""The headless run supervisor: start, pause, stop and restart local workers; state from events.

The dashboard, `vaultsh collect --headless` with several workers, and tests
all drive this one object; it never imports textual. Workers are started by a
`launcher(index) -> WorkerHandle` (a real subprocess, or a test double), their
events are fed in with `feed` (from reader threads), and a caller's loop calls
`tick()` a few times a second to notice exits, start queued workers and
sample memory and rates. Views read `snapshot()`: the latest value of every
field, so high-rate progress events coalesce into one redraw.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vaultsh import fmt
from vaultsh.events import Event, Start, as_event, parse
from vaultsh.supervise.process import WorkerHandle, last_log_line, tail_lines, tree_memory
from vaultsh.supervise.state import (
    ACTIVE,
    ENDED,
    FAILED,
    PAUSED,
    QUEUED,
    STARTING,
    STOPPED,
    STOPPING,
    EventLog,
    LogLine,
    WorkerStatus,
    apply_event,
    describe_exit,
    exit_status,
)

HISTORY = 300  # samples (one a second) kept for the charts
SAMPLE_EVERY_S = 1.0


@dataclass
class RunInfo:
    """What the run summary shows; filled from the config, then from workers' start events."""

    run: str = ""
    model: str = ""
    hooks: list[str] = field(default_factory=list)
    store: str = ""
    config: str = ""
    num_runs: int = 1
    plan: list[str] = field(default_factory=list)  # lines of a plan summary (vaultsh plan), when there is one


@dataclass
class Totals:
    """Run-wide sums for the summary line."""

    workers: int
    by_state: dict[str, int]
    batches: int
    total_batches: int | None
    tokens: int
    tokens_per_s: float
    committed: int
    committed_bytes: int
    queued: int
    in_flight_bytes: int
    mb_per_s: float
    retries: int
    rss: int
    gpu_allocated: int | None
    elapsed: float


class Supervisor:
    """Local workers of one run, each from `launcher(index)`, at most `concurrency` at a time."""

    read_only = False

    def __init__(
        self,
        launcher: Callable[[int], WorkerHandle],
        machines: Iterable[int],
        concurrency: int | None = None,
        info: RunInfo | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[Event], None] | None = None,
        sample_memory: bool = True,
    ):
        self.launcher = launcher
        self.machines = list(machines)
        if not self.machines:
            raise ValueError("no workers to supervise")
        self.concurrency = max(1, concurrency or len(self.machines))
        self.info = info or RunInfo()
        self.clock = clock
        self.on_event = on_event
        self.sample_memory = sample_memory
        self.workers: dict[int, WorkerStatus] = {i: WorkerStatus(i) for i in self.machines}
        self.handles: dict[int, WorkerHandle] = {}
        self.log = EventLog()
        self.tokens_history: deque[float] = deque(maxlen=HISTORY)
        self.upload_history: deque[float] = deque(maxlen=HISTORY)
        self.system_memory: tuple[int, int] | None = None  # (used, total)
        self.version = 0  # bumped on every change, so views can skip identical redraws
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.stopping_all = False
        self._exited: dict[int, float] = {}  # index -> when its exit was first seen
        self._settled: set[int] = set()  # indices whose current process has ended and been accounted
        self._last_sample = float("-inf")
        self._lock = threading.RLock()

    # -- starting ---------------------------------------------------------
    def start(self) -> None:
        """Start the first `concurrency` workers; the rest wait as `queued`."""
        with self._lock:
            self.started_at = self.clock()
            self._fill_slots()

    def _fill_slots(self) -> None:
        if self.stopping_all:
            return
        running = sum(1 for w in self.workers.values() if w.active)
        for i in self.machines:
            if running >= self.concurrency:
                break
            if self.workers[i].state == QUEUED:
                self._launch(i)
                running += 1

    def _launch(self, i: int) -> None:
        w = self.workers[i]
        now = self.clock()
        handle = self.launcher(i)
        self.handles[i] = handle
        self._exited.pop(i, None)
        self._settled.discard(i)
        w.state, w.detail, w.started_at, w.ended_at, w.exit_code = STARTING, "", now, None, None
        w.done, w.tokens_per_s, w.rss, w.children_rss = None, 0.0, None, None
        w.queued, w.in_flight_bytes, w.mb_per_s = 0, 0, 0.0
        w.log_path = handle.log_path
        try:
            handle.start(functools.partial(self._on_lines, i))
        except OSError as exc:
            w.state, w.last_error, w.ended_at = FAILED, f"could not start: {exc}", now
            w.log.append(self.log.add(now, i, "error", w.last_error))
            self._settled.add(i)
        w.pid = handle.pid
        self._touch()

    # -- events -----------------------------------------------------------
    def _on_lines(self, i: int, lines: list[bytes]) -> None:
        events = [e for e in map(parse, lines) if e is not None]  # a bad line is an `Invalid` event: counted, shown
        if events:
            self.feed_many(events, worker=i)

    def feed(self, event: Event | dict, worker: int | None = None) -> None:
        """Apply one worker event, typed or its wire dict (thread-safe). `worker` overrides the event's own index."""
        self.feed_many([event], worker)

    def feed_many(self, events: Iterable[Event | dict], worker: int | None = None) -> None:
        """Apply events in order under one lock (a reader thread's batch); `on_event` then gets them typed."""
        typed = [as_event(e) for e in events]
        if worker is not None:
            typed = [e if e.worker == worker else dataclasses.replace(e, worker=worker) for e in typed]
        with self._lock:
            now = self.clock()
            for event in typed:
                w = self.workers.get(event.worker) if event.worker is not None else None
                if w is None:
                    continue
                apply_event(w, event, self.log, now)
                if isinstance(event, Start):
                    self._learn_info(event)
            self.version += 1
        if self.on_event is not None:
            for event in typed:
                self.on_event(event)

    def set_plan(self, lines: list[str]) -> None:
        """Show a plan summary in the run summary (thread-safe; it may arrive after the workers start)."""
        with self._lock:
            self.info.plan = [str(line) for line in lines]
            self._touch()

    def _learn_info(self, event: Start) -> None:
        info = self.info
        info.run = info.run or (event.run or "")
        info.model = info.model or (event.model or "")
        if not info.hooks and event.hooks is not None:
            info.hooks = list(event.hooks)
        if event.store:
            info.store = event.store

    # -- the caller's loop ------------------------------------------------
    def tick(self) -> None:
        """Notice exits, start queued workers, sample memory and rates (call a few times a second)."""
        with self._lock:
            now = self.clock()
            for i, handle in list(self.handles.items()):
                if i in self._settled:
                    continue
                code = handle.poll()
                if code is None:
                    continue
                # Let the reader drain what the worker wrote before it ended (briefly: a
                # grandchild holding the pipe open must not stall the view).
                first_seen = self._exited.setdefault(i, now)
                reader_done = getattr(handle, "reader_done", None)
                if reader_done is not None and not reader_done(0.05) and now - first_seen < 2.0:
                    continue
                self._settle_exit(i, code, now)
                self._settled.add(i)
            self._fill_slots()
            if self.ended_at is None and self.started_at is not None and self.finished:
                self.ended_at = now
                self._note(None, self._final_line())
            if now - self._last_sample >= SAMPLE_EVERY_S:
                self._last_sample = now
                self._sample()

    def _final_line(self) -> str:
        states: dict[str, int] = {}
        for w in self.workers.values():
            states[w.state] = states.get(w.state, 0) + 1
        t = self.totals(list(self.workers.values()))
        counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        return (
            f"run finished ({counts}): {t.tokens:,} tokens, {t.committed} megabatches, "
            f"{fmt.size(t.committed_bytes)} committed"
        )

    def _settle_exit(self, i: int, code: int, now: float) -> None:
        w = self.workers[i]
        was_failed = w.state == FAILED
        exit_status(w, code, now, last_log_line(w.log_path) if code != 0 else None)
        if w.state == FAILED and not (was_failed and w.errors):
            w.log.append(self.log.add(now, i, "error", f"worker {i} failed: {w.last_error}"))
        elif w.state == FAILED and code < 0:
            w.log.append(self.log.add(now, i, "error", f"worker {i} {describe_exit(code)}"))
        self._touch()

    def _sample(self) -> None:
        active = [w for w in self.workers.values() if w.active]
        self.tokens_history.append(sum(w.tokens_per_s for w in active if w.state != PAUSED))
        self.upload_history.append(sum(w.mb_per_s for w in active if w.state != PAUSED))
        if self.sample_memory:
            import psutil

            live = {i: h.pid for i, h in self.handles.items() if self.workers[i].active and h.pid}
            if live:
                mem = tree_memory(list(live.values()))
                for i, pid in live.items():
                    if pid in mem:
                        self.workers[i].rss, self.workers[i].children_rss = mem[pid]
            vm = psutil.virtual_memory()
            self.system_memory = (vm.total - vm.available, vm.total)
        self._touch()

    @property
    def finished(self) -> bool:
        """True when no worker is running and none will start."""
        states = [w.state for w in self.workers.values()]
        if any(s in ACTIVE for s in states):
            return False
        if any(i not in self._settled for i in self.handles):
            return False  # said "done" but the process has not exited yet
        return self.stopping_all or all(s in ENDED for s in states)

    def _touch(self) -> None:
        self.version += 1

    # -- control ----------------------------------------------------------
    def _targets(self, i: int | None) -> list[int]:
        if i is None:
            return list(self.machines)
        if i not in self.workers:
            raise KeyError(f"no worker {i}")
        return [i]

    def pause(self, i: int | None = None) -> list[int]:
        """SIGSTOP the worker's process group (all workers when `i` is None); returns who paused."""
        done = []
        with self._lock:
            for j in self._targets(i):
                w = self.workers[j]
                if w.active and w.state not in (PAUSED, STOPPING) and self.handles[j].send(signal.SIGSTOP, group=True):
                    w._before_pause, w.state = w.state, PAUSED
                    done.append(j)
            if done:
                self._note(None if i is None else i, f"paused worker{'s' if len(done) > 1 else ''} {_list(done)}")
        return done

    def resume(self, i: int | None = None) -> list[int]:
        """SIGCONT paused workers; returns who resumed."""
        done = []
        with self._lock:
            for j in self._targets(i):
                w = self.workers[j]
                if w.state == PAUSED and self.handles[j].send(signal.SIGCONT, group=True):
                    w.state, w._before_pause = w._before_pause or STARTING, None
                    done.append(j)
            if done:
                self._note(None if i is None else i, f"resumed worker{'s' if len(done) > 1 else ''} {_list(done)}")
        return done

    def toggle_pause(self, i: int | None = None) -> list[int]:
        """Pause if any target is running, else resume."""
        targets = self._targets(i)
        running = any(self.workers[j].active and self.workers[j].state not in (PAUSED, STOPPING) for j in targets)
        return self.pause(i) if running else self.resume(i)

    def stop(self, i: int | None = None) -> list[int]:
        """Graceful stop: SIGTERM, the worker commits its megabatch in flight and exits.

        A second stop of a worker that is already stopping makes it leave at once
        (its uncommitted megabatch is dropped; the run stays consistent).
        With `i` None, queued workers will not start either.
        """
        done = []
        with self._lock:
            if i is None:
                self.stopping_all = True
                for j in self.machines:
                    if self.workers[j].state == QUEUED:
                        self.workers[j].state = STOPPED
            for j in self._targets(i):
                w = self.workers[j]
                if not w.active:
                    continue
                handle = self.handles[j]
                if handle.send(signal.SIGTERM):
                    if w.state == PAUSED:
                        handle.send(signal.SIGCONT, group=True)
                    again = w.state == STOPPING
                    w.state, w._before_pause = STOPPING, None
                    done.append(j)
                    if again:
                        self._note(j, f"worker {j}: stopping now, dropping its uncommitted megabatch")
            if done:
                self._note(
                    None if i is None else i,
                    f"stopping worker{'s' if len(done) > 1 else ''} {_list(done)} after the megabatch in flight",
                )
            self._touch()
        return done

    def kill(self, i: int) -> bool:
        """SIGKILL a worker's process group (an abort; its uncommitted megabatch is lost)."""
        with self._lock:
            ok = self.handles[i].send(signal.SIGKILL, group=True) if i in self.handles else False
            if ok:
                self._note(i, f"killed worker {i}")
            return ok

    def restart(self, i: int) -> bool:
        """Start a failed or stopped worker again; it resumes after its last commit."""
        with self._lock:
            w = self.workers[i]
            if w.state not in (FAILED, STOPPED) or (i in self.handles and self.handles[i].poll() is None):
                return False
            w.restarts += 1
            w.last_error = None
            self.stopping_all = False
            self.ended_at = None
            self._note(i, f"restarting worker {i} (it resumes after its last commit)")
            self._launch(i)
            return True

    def _note(self, worker: int | None, message: str) -> None:
        line = self.log.add(self.clock(), worker, "info", message)
        if worker is not None:
            self.workers[worker].log.append(line)
        self._touch()

    # -- reading ----------------------------------------------------------
    def snapshot(self) -> list[WorkerStatus]:
        """A copy of every worker's status (safe to read while events keep arriving)."""
        with self._lock:
            out = []
            for w in self.workers.values():
                c = copy.copy(w)
                c.log = deque(w.log, maxlen=w.log.maxlen)
                out.append(c)
            return out

    def logs_since(self, seq: int) -> list[LogLine]:
        with self._lock:
            return self.log.since(seq)

    def log_tail(self, i: int, n: int = 40) -> list[str]:
        """The last lines of worker `i`'s log file (its stdout/stderr)."""
        return tail_lines(self.workers[i].log_path, n)

    def totals(self, workers: list[WorkerStatus] | None = None) -> Totals:
        ws = workers if workers is not None else self.snapshot()
        by_state: dict[str, int] = {}
        for w in ws:
            by_state[w.state] = by_state.get(w.state, 0) + 1
        totals_known = all(w.total_batches is not None for w in ws)
        gpu = [w.gpu_allocated for w in ws if w.gpu_allocated is not None and w.active]
        end = self.ended_at if self.ended_at is not None else self.clock()
        return Totals(
            workers=len(ws),
            by_state=by_state,
            batches=sum(w.batches for w in ws),
            total_batches=sum(w.total_batches or 0 for w in ws) if totals_known else None,
            tokens=sum(w.tokens for w in ws),
            tokens_per_s=sum(w.tokens_per_s for w in ws if w.active and w.state != PAUSED),
            committed=sum(w.committed for w in ws),
            committed_bytes=sum(w.committed_bytes for w in ws),
            queued=sum(w.queued for w in ws if w.active),
            in_flight_bytes=sum(w.in_flight_bytes for w in ws if w.active),
            mb_per_s=sum(w.mb_per_s for w in ws if w.active and w.state != PAUSED),
            retries=sum(w.retries for w in ws),
            rss=sum(w.memory_total() or 0 for w in ws if w.active),
            gpu_allocated=sum(gpu) if gpu else None,
            elapsed=0.0 if self.started_at is None else max(0.0, end - self.started_at),
        )

    def running(self) -> bool:
        return any(w.active for w in self.workers.values())

    def wait(self, timeout: float | None = None, interval: float = 0.2) -> bool:
        """Tick until finished (or `timeout` seconds); True when finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.tick()
            if self.finished:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def exit_code(self) -> int:
        """0 when every worker completed or was stopped, else 1."""
        return 0 if all(w.state != FAILED for w in self.workers.values()) else 1


def _list(items: list[int]) -> str:
    return ", ".join(str(i) for i in items)
