"""Retries: botocore's own for each S3 request, one small policy for what botocore cannot retry.

botocore retries every S3 request itself ("standard" mode: throttling, 5xx and
connection errors, exponential backoff with jitter); `botocore_retries` is the
`retries=` setting each S3 client here is built with, `VAULTSH_S3_MAX_ATTEMPTS`
its number of attempts. What botocore cannot retry is work that spans more
than one request or a response body that broke halfway: a ranged read
streamed into a buffer (the reader, export) or a whole upload job (the
collector's uploader). Those go through `RetryPolicy.call`, and nothing else
in vaultsh loops over attempts by hand.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from vaultsh.errors import Cancelled, UserError

T = TypeVar("T")

MAX_ATTEMPTS_ENV = "VAULTSH_S3_MAX_ATTEMPTS"
DEFAULT_S3_ATTEMPTS = 8


def botocore_retries(max_attempts: int = DEFAULT_S3_ATTEMPTS) -> dict:
    """botocore's `Config(retries=...)`: `max_attempts` attempts in all per request, "standard" mode."""
    return {"total_max_attempts": max(1, int(max_attempts)), "mode": "standard"}


def s3_attempts_from_env() -> int | None:
    """`VAULTSH_S3_MAX_ATTEMPTS` as a number (None when unset); a UserError when it is not a whole number >= 1."""
    raw = os.environ.get(MAX_ATTEMPTS_ENV, "").strip()
    if not raw:
        return None
    try:
        attempts = int(raw)
    except ValueError:
        attempts = 0
    if attempts < 1:
        raise UserError(f"{MAX_ATTEMPTS_ENV}={raw!r} is not allowed: use a whole number >= 1")
    return attempts


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all; before retry n (1, 2, ...) wait `backoff * 2**(n-1)` seconds, at most
    `max_delay`, times a random factor in [0.5, 1.5) when `jitter`."""

    attempts: int
    backoff: float
    max_delay: float | None = None
    jitter: bool = False

    def delay(self, retry: int) -> float:
        d = self.backoff * (2 ** (retry - 1))
        if self.max_delay is not None:
            d = min(self.max_delay, d)
        return d * (0.5 + random.random()) if self.jitter else d

    def call(
        self,
        fn: Callable[[], T],
        *,
        retryable: Callable[[Exception], bool],
        on_retry: Callable[[int, Exception], None] | None = None,
        wait: Callable[[float], object] = time.sleep,
        exhausted: Callable[[Exception, int], BaseException] | None = None,
    ) -> T:
        """`fn()`, tried again while it raises an exception `retryable` accepts and attempts are left.

        `on_retry(attempt, exc)` hears of each failed attempt that is retried (attempt 1 is the first);
        `wait(seconds)` waits before the retry, and a true answer gives up at once (Cancelled).
        When the attempts run out, the last exception is raised, or `exhausted(exc, attempts)` made from it.
        """
        attempt = 1
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - `retryable` decides; the rest is re-raised
                if not retryable(exc):
                    raise
                if attempt >= self.attempts:
                    if exhausted is not None:
                        raise exhausted(exc, attempt) from exc
                    raise
                if on_retry is not None:
                    on_retry(attempt, exc)
                if wait(self.delay(attempt)):
                    raise Cancelled() from None
                attempt += 1
