"""The worker event protocol: one JSON object per line (NDJSON).

Every event has `type`, `time` (unix seconds) and `worker`. The dashboard, the
headless progress printer and the launchers all consume this one schema.

| type      | fields                                                                 |
|-----------|------------------------------------------------------------------------|
| start     | run, model, hooks, store, n_batches, batches_per_upload, pid           |
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
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

EVENT_TYPES = frozenset(
    {"start", "loading", "resume", "progress", "memory", "upload", "committed", "warning", "error", "stopping", "done"}
)


def make_event(type_: str, worker: int, **fields: Any) -> dict:
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    return {"type": type_, "time": time.time(), "worker": worker, **fields}


def encode(event: dict) -> bytes:
    return (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()


def decode(line: bytes | str) -> dict | None:
    """Parse one NDJSON line; None for blank or malformed lines (never raises)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
        return None
    return event


class EventSink:
    """Where a worker sends its events: a file descriptor, a callback, or both.

    Thread-safe (uploader threads emit too). Writing to a closed channel is
    ignored, so a dead dashboard never kills a worker.
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
