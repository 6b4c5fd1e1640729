"""The worker event protocol: one JSON object per line (NDJSON), as typed records.

Every event has `type`, `time` (unix seconds) and `worker`. The dashboard, the
headless progress printer, `vaultsh watch` and the launchers all read it
through the one `parse` here and fold it into per-worker state with the one
`fold` here; workers write it with `EventSink`.

| type      | fields                                                                 |
|-----------|------------------------------------------------------------------------|
| start     | run, model, hooks, store, n_batches, batches_per_upload, pid, format   |
| loading   | what ("model", "tokenizer", "data"), detail; "data" (sent once the model is loaded) also has model_params, model_bytes, dtype, device |
| resume    | from_megabatch, from_batch                                             |
| progress  | batches, total_batches, tokens, tokens_per_s, megabatch                |
| memory    | rss, children_rss, gpu_allocated, gpu_reserved, system_used, system_total |
| upload    | queued, in_flight_bytes, done_bytes, mb_per_s, retries, failed        |
| committed | megabatch, batch_start, batch_end, tokens, bytes                       |
| warning   | message                                                                |
| error     | message                                                                |
| stopping  | megabatch, filled, batches_per_upload: a stop request was seen; the megabatch in flight is finished and committed first |
| done      | status ("complete", "stopped", "failed"), batches, tokens, megabatches, elapsed; already_complete: true when the shard was complete before this run (nothing written) |

Reading is forgiving, so old event logs and newer workers keep working: a
field of the wrong type reads as absent (None), fields not in the table are
kept in `extra` (the Ray launcher adds `attempt`), and a line that is not a
JSON object of a known type parses to `Invalid` (never an exception), which
the fold counts in `WorkerState.invalid` and reports as a warning.

Standard library only: this is imported by every worker and by the dashboard's
reader threads (thousands of events a second).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vaultsh import fmt
from vaultsh.terminal import one_line

EVENT_TYPES = frozenset(
    {"start", "loading", "resume", "progress", "memory", "upload", "committed", "warning", "error", "stopping", "done"}
)


# -- writing (the worker side) ------------------------------------------------------------------
def make_event(type_: str, worker: int, **fields: Any) -> dict:
    """The wire form of one event (a dict), stamped with the time now."""
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    return {"type": type_, "time": time.time(), "worker": worker, **fields}


def encode(event: Event | dict) -> bytes:
    """One NDJSON line (with its newline) for an event, typed or in wire form."""
    wire = event.to_dict() if isinstance(event, Event) else event
    return (json.dumps(wire, separators=(",", ":"), default=str) + "\n").encode()


class EventSink:
    """Where a worker sends its events: a file descriptor, a callback, or both.

    Thread-safe (uploader threads emit too). Writing to a closed channel is
    ignored, so a dead dashboard never kills a worker. The callback gets the
    wire dict, exactly what was written.
    """

    def __init__(self, worker: int, fd: int | None = None, callback: Callable[[dict], None] | None = None):
        self.worker = worker
        self._fd = fd
        self._callback = callback
        self._lock = threading.Lock()

    def emit(self, type_: str, **fields: Any) -> dict:
        event = make_event(type_, self.worker, **fields)
        with self._lock:
            if self._fd is not None:
                try:
                    os.write(self._fd, encode(event))
                except OSError:
                    self._fd = None
            if self._callback is not None:
                self._callback(event)
        return event


# -- field readers: a wrong type reads as absent ----------------------------------------------------
def _int(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return int(v)
    except (OverflowError, ValueError):  # inf, nan
        return None


def _float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _str(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def _bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def _strs(v: Any) -> list[str] | None:
    return [str(x) for x in v] if isinstance(v, list) else None


# annotation -> (the type a well-formed value has, the reader of any other value)
_Reader = tuple[type, Callable[[Any], Any]]
_READERS: dict[str, _Reader] = {
    "int | None": (int, _int),
    "float | None": (float, _float),
    "str | None": (str, _str),
    "bool | None": (bool, _bool),
    "list[str] | None": (type(None), _strs),  # a list's items are always checked
}
_BY_TYPE: dict[str, type[Event]] = {}


def _register(cls: type[Event]) -> type[Event]:
    """Record how to read each field of `cls` (from its annotations) and its wire type."""
    spec: dict[str, _Reader] = {}
    for klass in reversed(cls.__mro__):
        for name, ann in getattr(klass, "__annotations__", {}).items():
            if ann.startswith("ClassVar") or name == "extra":
                continue
            spec[name] = _READERS[ann]  # a KeyError here is a field type this module cannot read: add a reader
    cls._fields = spec
    if cls.type in EVENT_TYPES:
        _BY_TYPE[cls.type] = cls
    return cls


# -- typed events ---------------------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class Event:
    """Fields common to every event. `extra` holds wire fields this schema does not name."""

    type: ClassVar[str] = ""
    _fields: ClassVar[dict[str, _Reader]] = {}

    worker: int | None = None
    time: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The wire form: `type`, then every field that is set, then `extra`."""
        out: dict[str, Any] = {"type": self.type}
        for name in self._fields:
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        out.update(self.extra)
        return out

    # Read access by wire name, so code written for the dict form keeps working (e.g. an `on_event` callback
    # that reads event["type"]); new code reads the attributes.
    def __getitem__(self, key: str) -> Any:
        if key == "type":
            return self.type
        if key in self._fields:
            v = getattr(self, key)
            if v is not None:
                return v
        elif key in self.extra:
            return self.extra[key]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def keys(self) -> Iterator[str]:
        return iter(self.to_dict())


@_register
@dataclass(slots=True, kw_only=True)
class Start(Event):
    type: ClassVar[str] = "start"
    run: str | None = None
    model: str | None = None
    hooks: list[str] | None = None
    store: str | None = None
    n_batches: int | None = None
    batches_per_upload: int | None = None
    pid: int | None = None
    format: str | None = None


@_register
@dataclass(slots=True, kw_only=True)
class Loading(Event):
    type: ClassVar[str] = "loading"
    what: str | None = None
    detail: str | None = None
    model_params: int | None = None
    model_bytes: int | None = None
    dtype: str | None = None
    device: str | None = None


@_register
@dataclass(slots=True, kw_only=True)
class Resume(Event):
    type: ClassVar[str] = "resume"
    from_megabatch: int | None = None
    from_batch: int | None = None


@_register
@dataclass(slots=True, kw_only=True)
class Progress(Event):
    type: ClassVar[str] = "progress"
    batches: int | None = None
    total_batches: int | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    megabatch: int | None = None


@_register
@dataclass(slots=True, kw_only=True)
class Memory(Event):
    type: ClassVar[str] = "memory"
    rss: int | None = None
    children_rss: int | None = None
    gpu_allocated: int | None = None
    gpu_reserved: int | None = None
    system_used: int | None = None
    system_total: int | None = None


@_register
@dataclass(slots=True, kw_only=True)
class Upload(Event):
    type: ClassVar[str] = "upload"
    queued: int | None = None
    in_flight_bytes: int | None = None
    done_bytes: int | None = None
    mb_per_s: float | None = None
    retries: int | None = None
    failed: int | None = None


@_register
@dataclass(slots=True, kw_only=True)
class Committed(Event):
    type: ClassVar[str] = "committed"
    megabatch: int | None = None
    batch_start: int | None = None
    batch_end: int | None = None
    tokens: int | None = None
    bytes: int | None = None


@_register
@dataclass(slots=True, kw_only=True)
class WorkerWarning(Event):
    type: ClassVar[str] = "warning"
    message: str | None = None


@_register
@dataclass(slots=True, kw_only=True)
class WorkerError(Event):
    type: ClassVar[str] = "error"
    message: str | None = None


@_register
@dataclass(slots=True, kw_only=True)
class Stopping(Event):
    type: ClassVar[str] = "stopping"
    megabatch: int | None = None
    filled: int | None = None
    batches_per_upload: int | None = None


@_register
@dataclass(slots=True, kw_only=True)
class Done(Event):
    type: ClassVar[str] = "done"
    status: str | None = None
    batches: int | None = None
    tokens: int | None = None
    megabatches: int | None = None
    elapsed: float | None = None
    already_complete: bool | None = None


@_register
@dataclass(slots=True, kw_only=True)
class Invalid(Event):
    """A line that is not an event: not JSON, not an object, or an unknown `type`. Never on the wire."""

    type: ClassVar[str] = "invalid"
    reason: str | None = None
    line: str | None = None  # the start of the offending line, for the warning


_LINE_KEPT = 200  # characters of a bad line kept in `Invalid.line`


# -- reading ------------------------------------------------------------------------------------------
def from_dict(d: Any, line: str | None = None) -> Event:
    """A typed event from its wire form (never raises): `Invalid` for anything that is not an event."""
    if not isinstance(d, dict):
        return Invalid(reason=f"not a JSON object ({type(d).__name__})", line=line)
    kind = d.get("type")
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        why = "no event type" if kind is None else f"unknown event type {str(kind)[:40]!r}"
        return Invalid(
            worker=_int(d.get("worker")),
            time=_float(d.get("time")),
            reason=why,
            line=line if line is not None else json.dumps(d, default=str)[:_LINE_KEPT],
        )
    spec = cls._fields
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in d.items():
        how = spec.get(k)
        if how is None:
            if k != "type":
                extra[k] = v
        elif type(v) is how[0]:  # the common case: no conversion
            kwargs[k] = v
        else:
            kwargs[k] = how[1](v)
    return cls(extra=extra, **kwargs)


def as_event(event: Event | dict) -> Event:
    """A typed event from a typed one (itself) or a wire dict."""
    return event if isinstance(event, Event) else from_dict(event)


def parse(line: bytes | str) -> Event | None:
    """One NDJSON line -> a typed event; `Invalid` for a line that is not one; None for a blank line. Never raises."""
    try:
        d = json.loads(line)
    except (ValueError, TypeError):  # UnicodeDecodeError is a ValueError
        text = line.decode("utf-8", "replace") if isinstance(line, (bytes, bytearray)) else str(line)
        if not text.strip():
            return None
        return Invalid(reason="not JSON", line=text.strip()[:_LINE_KEPT])
    except RecursionError:
        return Invalid(reason="nested too deeply", line=None)
    if isinstance(d, dict):
        return from_dict(d)
    text = line.decode("utf-8", "replace") if isinstance(line, (bytes, bytearray)) else str(line)
    return from_dict(d, line=text.strip()[:_LINE_KEPT])


def decode(line: bytes | str) -> dict | None:
    """The wire dict of one valid event line; None for blank, malformed or unknown lines (never raises).

    For readers of raw logs (tests, benchmarks); consumers should `parse` and count what is `Invalid`.
    """
    event = parse(line)
    return None if event is None or isinstance(event, Invalid) else event.to_dict()


# -- folding events into per-worker state ------------------------------------------------------------
# Display states, in the order a healthy worker goes through them.
QUEUED = "queued"
STARTING = "starting"
LOADING = "loading"
RUNNING = "running"
UPLOADING = "uploading"
PAUSED = "paused"
STOPPING = "stopping"
DONE = "done"
STOPPED = "stopped"
FAILED = "failed"
WAITING = "waiting"  # watch mode: no commit seen yet
IDLE = "idle"  # watch mode: no new commit for a while

ACTIVE = frozenset({STARTING, LOADING, RUNNING, UPLOADING, PAUSED, STOPPING})
ENDED = frozenset({DONE, STOPPED, FAILED})
_INVALID_SHOWN = 3  # the first few bad lines of a worker are each reported; then every 1000th


@dataclass
class WorkerState:
    """What one worker's events say about it. The supervisor's `WorkerStatus` adds its own bookkeeping."""

    index: int
    state: str = QUEUED
    detail: str = ""  # e.g. what is loading
    pid: int | None = None
    started: bool = False  # a start event was seen
    ended_at: float | None = None  # the folder's clock (`now`) when the done event came
    # progress
    batches: int = 0
    total_batches: int | None = None
    tokens: int = 0
    tokens_per_s: float = 0.0
    megabatch: int = 0
    last_progress_time: float | None = None  # the worker's own event time (for latency)
    # commits
    committed: int = 0
    committed_tokens: int = 0
    committed_bytes: int = 0
    # upload queue
    queued: int = 0
    in_flight_bytes: int = 0
    done_bytes: int = 0
    mb_per_s: float = 0.0
    retries: int = 0
    upload_failed: int = 0
    # memory (bytes); a supervisor may fill rss from psutil (fresher), else the worker's events do
    rss: int | None = None
    children_rss: int | None = None
    gpu_allocated: int | None = None
    gpu_reserved: int | None = None
    # problems
    warnings: int = 0
    errors: int = 0
    last_error: str | None = None
    invalid: int = 0  # lines on its channel that were not events (malformed or of an unknown type)
    last_invalid: str | None = None  # why the latest one was not an event
    done: Done | None = None  # its done event
    _before_pause: str | None = None  # a held (paused) worker's state to return to
    # milestones: the worker's own event times (its clock) of its start and model load
    _started_event: float | None = None
    _loading_model_since: float | None = None
    _first_batch_seen: bool = False

    @property
    def done_status(self) -> str | None:
        """The done event's status ("" when it gave none); None before one came."""
        return None if self.done is None else self.done.status or ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def fraction(self) -> float | None:
        if not self.total_batches:
            return None
        return min(1.0, self.batches / self.total_batches)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current token rate (None while unknown)."""
        if self.state not in (RUNNING, UPLOADING) or not self.total_batches or not self.batches:
            return None
        if self.tokens_per_s <= 0 or self.tokens <= 0:
            return None
        left = max(0, self.total_batches - self.batches)
        return left * (self.tokens / self.batches) / self.tokens_per_s

    def memory_total(self) -> int | None:
        if self.rss is None:
            return None
        return self.rss + (self.children_rss or 0)


@dataclass(frozen=True, slots=True)
class Note:
    """A line worth showing about one event: a milestone, a warning, an error, a bad line.

    `kind` is the event's type (or "invalid"), so a view can leave out what it shows otherwise.
    """

    level: str  # "info", "warning", "error"
    message: str
    kind: str


def fold(w: WorkerState, event: Event, now: float) -> list[Note]:
    """Update `w` from one of its events; return the lines worth showing (usually none, at most one).

    `now` is the caller's clock (it stamps `ended_at`). A paused or stopping worker (a state its supervisor
    set) keeps that state through later events; a paused one remembers the state to return to.
    """
    handler = _HANDLERS.get(type(event))
    if handler is None:  # a subclass or an Event of no type: fold it as its wire form says
        event = from_dict(event.to_dict())
        handler = _HANDLERS[type(event)]
    note = handler(w, event, now)
    return [] if note is None else [note]


def _set_state(w: WorkerState, state: str) -> None:
    if w.state == PAUSED:
        w._before_pause = state
    elif w.state != STOPPING:
        w.state = state


def _on_start(w: WorkerState, e: Start, now: float) -> Note | None:
    _set_state(w, STARTING)
    w.started = True
    w.total_batches = _keep(e.n_batches, w.total_batches)
    w.pid = _keep(e.pid, w.pid)
    w._started_event, w._first_batch_seen = e.time, False
    return Note("info", f"started (pid {_or(e.pid)}): {_or(e.n_batches)} batches to collect", e.type)


def _on_loading(w: WorkerState, e: Loading, now: float) -> Note | None:
    _set_state(w, LOADING)
    w.detail = e.what or ""
    if e.what == "model":
        w._loading_model_since = e.time
        return Note("info", f"loading model {e.detail or ''}".rstrip(), e.type)
    if e.model_bytes is not None:
        took = _since(w._loading_model_since, e.time)
        return Note(
            "info",
            f"model loaded: {fmt.count(e.model_params or 0)} parameters, {fmt.size(e.model_bytes)} "
            f"{e.dtype or ''} on {_or(e.device)}" + (f" in {took}" if took else ""),
            e.type,
        )
    return None


def _on_resume(w: WorkerState, e: Resume, now: float) -> Note | None:
    w.batches = _keep(e.from_batch, w.batches)
    w.committed = _keep(e.from_megabatch, w.committed)
    return Note("info", f"resuming at megabatch {w.committed} (batch {w.batches})", e.type)


def _on_progress(w: WorkerState, e: Progress, now: float) -> Note | None:
    w.batches = _keep(e.batches, w.batches)
    w.total_batches = _keep(e.total_batches, w.total_batches)
    w.tokens = _keep(e.tokens, w.tokens)
    w.tokens_per_s = _keep(e.tokens_per_s, w.tokens_per_s)
    w.megabatch = _keep(e.megabatch, w.megabatch)
    w.last_progress_time = e.time
    w.detail = ""
    finished = w.total_batches is not None and w.batches >= w.total_batches
    _set_state(w, UPLOADING if finished else RUNNING)
    if w._first_batch_seen:
        return None
    w._first_batch_seen = True
    took = _since(w._started_event, e.time)
    return Note(
        "info",
        f"first batch done ({e.tokens or 0:,} tokens so far)" + (f", {took} after start" if took else ""),
        e.type,
    )


def _on_upload(w: WorkerState, e: Upload, now: float) -> Note | None:
    w.queued = _keep(e.queued, w.queued)
    w.in_flight_bytes = _keep(e.in_flight_bytes, w.in_flight_bytes)
    w.done_bytes = _keep(e.done_bytes, w.done_bytes)
    w.mb_per_s = _keep(e.mb_per_s, w.mb_per_s)
    w.retries = _keep(e.retries, w.retries)
    w.upload_failed = _keep(e.failed, w.upload_failed)
    return None


def _on_memory(w: WorkerState, e: Memory, now: float) -> Note | None:
    w.gpu_allocated, w.gpu_reserved = e.gpu_allocated, e.gpu_reserved
    if w.rss is None:  # psutil in a supervisor is fresher; use the worker's until it has one
        w.rss, w.children_rss = e.rss, e.children_rss
    return None


def _on_committed(w: WorkerState, e: Committed, now: float) -> Note | None:
    w.committed = max(w.committed, (e.megabatch if e.megabatch is not None else -1) + 1)
    w.committed_tokens += e.tokens or 0
    w.committed_bytes += e.bytes or 0
    return Note(
        "info",
        f"megabatch {e.megabatch} committed: {fmt.size(e.bytes or 0)}, {e.tokens or 0:,} tokens "
        f"(batches {e.batch_start}-{(e.batch_end or 0) - 1})",
        e.type,
    )


def _on_warning(w: WorkerState, e: WorkerWarning, now: float) -> Note | None:
    w.warnings += 1
    return Note("warning", _one_line(e.message or ""), e.type)


def _on_error(w: WorkerState, e: WorkerError, now: float) -> Note | None:
    message = _one_line(e.message or "")
    w.errors += 1
    w.last_error = message
    return Note("error", message, e.type)


def _on_stopping(w: WorkerState, e: Stopping, now: float) -> Note | None:
    # the worker saw a stop request (its supervisor's, or a signal from elsewhere: Slurm, kill)
    w.state, w._before_pause = STOPPING, None
    return Note(
        "info",
        f"stopping: finishing megabatch {e.megabatch or 0} ({e.filled or 0}/{e.batches_per_upload or 0} "
        "batches), then exit",
        e.type,
    )


def _on_done(w: WorkerState, e: Done, now: float) -> Note | None:
    status = e.status or ""
    w.done = e
    w.batches = _keep(e.batches, w.batches)
    w.tokens = _keep(e.tokens, w.tokens)
    w.tokens_per_s = 0.0
    w.state = {"complete": DONE, "stopped": STOPPED}.get(status, FAILED)
    w.ended_at = now
    return Note("info", done_line(e), e.type)


def _on_invalid(w: WorkerState, e: Invalid, now: float) -> Note | None:
    w.invalid += 1
    w.last_invalid = e.reason
    if w.invalid > _INVALID_SHOWN and w.invalid % 1000:
        return None
    seen = f" ({w.invalid} so far)" if w.invalid > 1 else ""
    line = f": {_one_line(e.line)[:80]}" if e.line else ""
    return Note("warning", f"ignored a line that is not an event ({e.reason}){seen}{line}", e.type)


_HANDLERS: dict[type, Callable[[WorkerState, Any, float], Note | None]] = {
    Start: _on_start,
    Loading: _on_loading,
    Resume: _on_resume,
    Progress: _on_progress,
    Upload: _on_upload,
    Memory: _on_memory,
    Committed: _on_committed,
    WorkerWarning: _on_warning,
    WorkerError: _on_error,
    Stopping: _on_stopping,
    Done: _on_done,
    Invalid: _on_invalid,
}


def done_line(e: Done) -> str:
    """How a done event reads: 'finished: 4 batches, 400 tokens, 2 megabatches in 12s; statistics written'."""
    status = e.status or ""
    totals = f"{e.batches or 0} batches, {e.tokens or 0:,} tokens, {e.megabatches or 0} megabatches"
    if e.already_complete:
        return f"already complete: {totals}; nothing to do"
    took = f" in {_duration(e.elapsed)}" if e.elapsed is not None else ""
    if status == "complete":
        return f"finished: {totals}{took}; statistics written"
    if status == "stopped":
        return f"stopped: {totals} committed{took}; statistics written"
    return f"ended ({status or 'unknown'}): {totals} committed{took}"


def _keep(v, current):
    return current if v is None else v


def _or(v: Any) -> Any:
    return "?" if v is None else v


def _since(t0: float | None, t1: float | None) -> str | None:
    return _duration(t1 - t0) if t0 is not None and t1 is not None and t1 >= t0 else None


def _duration(s: float) -> str:
    """Like fmt.duration, with tenths under ten seconds ('3.0s')."""
    return f"{s:.1f}s" if 0 <= s < 10 else fmt.duration(s)


def _one_line(text: Any) -> str:
    """One printable line (a worker's message may hold newlines or terminal escapes), at most 2000 characters."""
    return one_line(text)[:2000]
