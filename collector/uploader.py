"""A bounded, backpressured upload queue with a pool of uploader threads.

`submit()` blocks while `max_pending` jobs are queued or running, so the
forward loop waits for the store instead of growing memory without bound.
Each job is retried with exponential backoff (`vaultsh.store.retry`); a job that still fails is
recorded and re-raised in the submitting thread by `check()`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

from vaultsh.errors import UserError
from vaultsh.events import Event, Upload
from vaultsh.store.retry import RetryPolicy


class UploadFailed(UserError):
    """An upload that failed after every retry."""


@dataclass
class UploadStats:
    queued: int = 0  # jobs submitted and not finished
    in_flight_bytes: int = 0
    done_bytes: int = 0
    done_jobs: int = 0
    retries: int = 0
    failed: int = 0
    started: float = 0.0

    @property
    def mb_per_s(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done_bytes / elapsed / 1e6 if elapsed > 0 else 0.0

    def event_fields(self) -> dict[str, Any]:
        """The fields of an `upload` event (those vaultsh.events.Upload names), as these stats read now."""
        return {name: getattr(self, name) for name in _EVENT_FIELDS}


# what the `upload` event has beyond every event's fields, in its order
_EVENT_FIELDS = [f.name for f in fields(Upload) if f.name not in {g.name for g in fields(Event)}]


class Uploader:
    def __init__(
        self,
        threads: int = 4,
        max_pending: int = 8,
        attempts: int = 4,
        backoff: float = 0.5,
        on_retry: Callable[[str, int, BaseException], None] | None = None,
    ):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vaultsh-upload")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.attempts = attempts
        self.backoff = backoff
        self.on_retry = on_retry
        self.stats = UploadStats(started=time.monotonic())

    def submit(self, label: str, nbytes: int, job: Callable[[], object]) -> Future:
        """Run `job()` in the pool; blocks while the queue is full."""
        self.check()
        self._slots.acquire()
        with self._lock:
            self.stats.queued += 1
            self.stats.in_flight_bytes += nbytes
        try:
            return self._pool.submit(self._run, label, nbytes, job)
        except BaseException:
            self._release(nbytes, ok=False)
            raise

    def _run(self, label: str, nbytes: int, job: Callable[[], object]):
        ok = False
        try:
            policy = RetryPolicy(attempts=self.attempts, backoff=self.backoff)
            result = policy.call(
                job, retryable=_retryable, on_retry=lambda attempt, exc: self._retry(label, attempt, exc)
            )
            ok = True
            return result
        except BaseException as exc:
            with self._lock:
                if self._error is None:
                    self._error = UploadFailed(f"upload of {label} failed after {self.attempts} attempts: {exc}")
            raise
        finally:
            self._release(nbytes, ok)

    def _retry(self, label: str, attempt: int, exc: BaseException) -> None:
        with self._lock:
            self.stats.retries += 1
        if self.on_retry:
            self.on_retry(label, attempt, exc)

    def _release(self, nbytes: int, ok: bool) -> None:
        with self._lock:
            self.stats.queued -= 1
            self.stats.in_flight_bytes -= nbytes
            if ok:
                self.stats.done_bytes += nbytes
                self.stats.done_jobs += 1
            else:
                self.stats.failed += 1
        self._slots.release()

    def check(self) -> None:
        """Raise the first upload failure, if any, in the caller's thread."""
        if self._error is not None:
            raise self._error

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
        if wait:
            self.check()


def _retryable(exc: Exception) -> bool:
    """Only faults the store marks transient (and OS errors) are retried; a bad bucket or credentials are final."""
    if isinstance(exc, UserError):
        return bool(getattr(exc, "retryable", False))
    return isinstance(exc, OSError)
