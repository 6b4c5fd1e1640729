"""What a run looks like from its workers' events: one `WorkerStatus` per worker.

Pure data: no processes, no threads, no terminal. The supervisor applies
every event to a `WorkerStatus` as it arrives (cheap field updates, the one
`fold` of vaultsh/events.py), and the views read a snapshot whenever they
redraw, so a burst of progress events collapses into one redraw of the latest
values.
"""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass, field

from vaultsh.events import (  # noqa: F401 - the display states are re-exported: views import them from here
    ACTIVE,
    DONE,
    ENDED,
    FAILED,
    IDLE,
    LOADING,
    PAUSED,
    QUEUED,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
    UPLOADING,
    WAITING,
    Event,
    WorkerState,
    as_event,
    fold,
)

LOG_LINES = 200  # log lines kept per worker


@dataclass
class LogLine:
    """A warning, an error or a supervisor note, numbered in arrival order."""

    seq: int
    time: float
    worker: int | None
    level: str  # "info", "warning", "error"
    message: str
    origin: str = "supervisor"  # "event" when a worker's own event (or a bad line on its channel) said it


@dataclass
class WorkerStatus(WorkerState):
    """Everything the views show about one worker: the fold of its events (`WorkerState`), and the supervisor's
    own bookkeeping of its process."""

    restarts: int = 0
    started_at: float | None = None  # supervisor clock
    exit_code: int | None = None
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    log_path: str | None = None


class EventLog:
    """All log lines of a run (warnings, errors, supervisor notes), numbered."""

    def __init__(self, maxlen: int = 2000):
        self.lines: deque[LogLine] = deque(maxlen=maxlen)
        self.seq = 0

    def add(self, time: float, worker: int | None, level: str, message: str, origin: str = "supervisor") -> LogLine:
        self.seq += 1
        line = LogLine(self.seq, time, worker, level, message, origin)
        self.lines.append(line)
        return line

    def since(self, seq: int) -> list[LogLine]:
        """Lines numbered after `seq` (oldest first)."""
        if not self.lines or self.lines[-1].seq <= seq:
            return []
        return [line for line in self.lines if line.seq > seq]


def apply_event(w: WorkerStatus, event: Event | dict, log: EventLog, now: float) -> None:
    """Update `w` from one worker event (typed, or its wire dict); milestones, warnings, errors and lines that were not
    events go to `log` and to the worker's own log."""
    for note in fold(w, as_event(event), now):
        w.log.append(log.add(now, w.index, note.level, note.message, "event"))


def exit_status(w: WorkerStatus, code: int, now: float, last_log_line: str | None) -> None:
    """The worker process ended with `code` (Popen's returncode): settle its final state."""
    w.exit_code = code
    w.tokens_per_s = 0.0
    if w.ended_at is None:
        w.ended_at = now
    clean = code == 0 and w.done_status in ("complete", "stopped")
    if clean:
        w.state = DONE if w.done_status == "complete" else STOPPED
        return
    if w.state != FAILED or not w.last_error:
        reason = describe_exit(code)
        if w.done_status == "stopped" and code == 130:
            w.state = STOPPED  # a second stop request: it left at once, uncommitted work dropped
            return
        if not w.last_error:
            w.last_error = f"{reason}: {last_log_line}" if last_log_line and code > 0 else reason
    w.state = FAILED


def describe_exit(code: int) -> str:
    """'exited with code 1', 'killed by SIGKILL'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
