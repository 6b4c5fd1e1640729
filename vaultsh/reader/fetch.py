"""Where the bytes come from: (re)opening stores, ranged reads straight into a buffer, retries.

A file is read into one preallocated buffer by several ranged reads at once;
each read writes in place through the store protocol's `read_into` (see
LocalStore.read_into and S3Store.read_into). Network errors
that may pass are retried with backoff on top of botocore's own retries (`store/retry.py`);
anything else (a missing object, bad credentials) is raised at once.
"""

from __future__ import annotations

import http.client
import logging
import os
import pickle
import threading
from pathlib import Path
from typing import Any

from vaultsh.errors import Cancelled, FormatError, NotFoundError, StoreError, UserError
from vaultsh.store import LocalStore, is_s3_uri, normalize_key, open_store, s3_location
from vaultsh.store.retry import RetryPolicy

logger = logging.getLogger("vaultsh.reader")

_READ_CHUNK = 1 << 20  # bytes copied per read() from an HTTP body
_READINTO_CHUNK = 8 << 20  # bytes read straight into the buffer per call (a close() is seen between calls)


Closed = Cancelled  # the reader was closed while a background thread worked or waited


class TransientExhausted(StoreError):
    """A network error that persisted through every retry (never skipped: not the file's fault)."""


# -- opening stores ----------------------------------------------------------
class StoreSpec:
    """Enough to reopen a store in another process (DataLoader workers). Never printed."""

    def __init__(self, kind: str, **kw: Any):
        self.kind = kind
        self.kw = kw

    def __repr__(self) -> str:  # no credentials, ever
        return f"StoreSpec({self.kind!r})"

    def open(self):
        kw = self.kw
        if self.kind == "local":
            return LocalStore(kw["root"], create=False)
        if self.kind == "uri":
            return open_store(kw["uri"], create=False)
        if self.kind == "object":
            store = kw["store"]
            try:  # a fresh copy: S3Store drops its client when pickled and builds a new one
                return pickle.loads(pickle.dumps(store))
            except Exception:  # noqa: BLE001 - not picklable: share it
                return store
        raise ValueError(f"unknown store kind {self.kind!r}")


def resolve(source: str, store=None) -> tuple[StoreSpec, Any, str, str]:
    """(spec, store, run name, hook) of a hook directory: an s3:// URI, a local path, or RUN/HOOK in `store`."""
    source = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(source, str):
        raise UserError(f"source {source!r} is not a hook directory (s3://bucket/run/hook, a path, or RUN/HOOK)")
    if store is not None:
        try:
            key = normalize_key(source).strip("/")
        except StoreError as exc:
            raise UserError(f"invalid hook directory {source!r}: {exc}") from None
        spec = StoreSpec("object", store=store)
    elif is_s3_uri(source):
        root, key = s3_location(source)  # a StoreError (a UserError) names the URI and what is wrong with it
        spec = StoreSpec("uri", uri=root)
        store = spec.open()
    else:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise UserError(
                f"{source}: no such directory (give a hook directory RUN/HOOK of a local store, or an s3:// URI)"
            )
        path = path.resolve()
        if path.parent == path or path.parent.parent == path.parent:
            raise UserError(f"{source}: a hook directory is STORE/RUN/HOOK; this path is too short")
        spec = StoreSpec("local", root=str(path.parent.parent))
        store = spec.open()
        key = f"{path.parent.name}/{path.name}"
    run, _, hook = key.rpartition("/")
    if not run or not hook:
        raise UserError(f"{source!r}: expected a hook directory RUN/HOOK (e.g. my-run/residuals_10), got {key!r}")
    return spec, store, run, hook


# -- errors ------------------------------------------------------------------
_TRANSIENT_NAMES = {
    "IncompleteReadError",
    "ResponseStreamingError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ProtocolError",
    "IncompleteRead",
    "HTTPClientError",
    "ReadTimeout",
    "ConnectTimeout",
    "NewConnectionError",
    "RemoteDisconnected",
}


def is_transient(exc: BaseException) -> bool:
    """Network trouble that may pass (retry), as opposed to a missing/corrupt file or bad credentials."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (NotFoundError, FormatError)):
            return False
        if isinstance(cur, StoreError):
            if cur.retryable:
                return True
        elif isinstance(cur, (ConnectionError, TimeoutError, http.client.HTTPException)):
            return True
        if type(cur).__name__ in _TRANSIENT_NAMES:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


# -- ranged reads into a buffer ---------------------------------------------
def read_into(store, key: str, start: int, mv: memoryview, stop: threading.Event) -> int:
    """Read bytes start.. of `key` into `mv` through the store's `read_into`; returns how many there were."""
    reader = getattr(store, "read_into", None)
    if reader is not None:
        return reader(key, start, mv, stop)
    data = store.get_range(key, start, len(mv))  # a store without read_into: one extra copy
    mv[: len(data)] = data
    return len(data)


def read_with_retries(
    store,
    key: str,
    uri: str,
    start: int,
    mv: memoryview,
    stop: threading.Event,
    retries: int,
    backoff: float,
    on_retry=None,
) -> int:
    """`read_into` with up to `retries` retries of transient errors (exponential backoff, jittered)."""

    def retryable(exc: Exception) -> bool:
        return not isinstance(exc, Closed) and is_transient(exc) and not stop.is_set()

    def retrying(attempt: int, exc: Exception) -> None:
        if on_retry is not None:
            on_retry()
        logger.info("retrying %s (attempt %d/%d) after %s", uri, attempt + 1, retries + 1, type(exc).__name__)

    def exhausted(exc: Exception, attempts: int) -> TransientExhausted:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return TransientExhausted(
            f"cannot read {uri} (bytes {start}-{start + len(mv) - 1}) after {attempts} attempts: {first}",
            retryable=True,
        )

    policy = RetryPolicy(attempts=retries + 1, backoff=backoff, max_delay=8.0, jitter=True)
    return policy.call(
        lambda: read_into(store, key, start, mv, stop),
        retryable=retryable,
        on_retry=retrying,
        wait=stop.wait,
        exhausted=exhausted,
    )
