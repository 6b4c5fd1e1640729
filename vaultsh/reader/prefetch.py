"""One pass over a list of megabatches: background downloads with parallel ranged reads, staged in order.

A task is one megabatch: one file, or (aligned reads) the files of the same
megabatch in several hook directories or runs, laid out side by side in one
buffer. A scheduler thread starts up to `prefetch` tasks ahead of the
consumer, each into a buffer from a pool under a byte limit (pinned when the
device is CUDA), its ranges spread over a pool of `connections` threads. When
a task's last range lands a staging thread checks and stages it; the consumer
takes items in order.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from vaultsh.errors import FormatError
from vaultsh.reader.buffers import BufferPool, Lease, Slots
from vaultsh.reader.fetch import Closed, read_with_retries
from vaultsh.reader.progress import Counters
from vaultsh.reader.stage import Staged

_POLL_S = 0.1

# Every Prefetcher not yet closed. A generator abandoned mid-iteration is finalized during interpreter
# shutdown, after the standard library's module globals are gone (ThreadPoolExecutor.shutdown then fails
# with "'NoneType' object has no attribute 'Empty'"): the atexit hook closes them while everything still works,
# and a closed Prefetcher's close() returns at once.
_LIVE: weakref.WeakSet[Prefetcher] = weakref.WeakSet()


def _close_live() -> None:
    for pf in list(_LIVE):
        pf.at_exit = True
        pf.close()


atexit.register(_close_live)


_ALIGN = 64  # parts start at multiples of this in a task's buffer, so every tensor view is aligned


@dataclass
class Part:
    """One file of a task, at `offset` in the task's buffer."""

    source: int  # which hook directory
    key: str
    uri: str
    size: int
    sha256: str | None
    n_sequences: int
    offset: int = 0


@dataclass
class FileTask:
    """One megabatch to fetch: its position in the ordered list (the resume index) and its file(s)."""

    pos: int
    parts: list[Part]
    size: int = 0  # bytes of the buffer holding every part

    def __post_init__(self) -> None:
        off = 0
        for p in self.parts:
            p.offset = off
            off += -(-p.size // _ALIGN) * _ALIGN
        self.size = off if len(self.parts) > 1 else (self.parts[0].size if self.parts else 0)

    @property
    def uri(self) -> str:
        return self.parts[0].uri if self.parts else ""


@dataclass
class Item:
    """A file's outcome: staged tensors, or the error that stopped it."""

    task: FileTask
    staged: Staged | None = None
    error: BaseException | None = None
    lease: Lease | None = None  # the buffer the staged tensors are views of (disowned when moved past)


class _Download:
    def __init__(self, task: FileTask, buf: torch.Tensor, lease: Lease, ranges: int):
        self.task = task
        self.buf: torch.Tensor | None = buf
        self.lease: Lease | None = lease
        self.remaining = ranges
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.short: dict[int, int] = {}  # part index -> bytes readable, for parts shorter than listed
        self.future: Future = Future()

    def take_lease(self) -> Lease:
        """The buffer's lease, handed over once: to the pool or the consumer when the download ends."""
        lease, self.lease = self.lease, None
        assert lease is not None, "a download's lease is handed over once"
        return lease


@dataclass
class FetchOptions:
    prefetch: int
    buffer_bytes: int
    connections: int
    range_bytes: int
    stage_threads: int
    retries: int
    retry_backoff: float
    pin: bool


class Prefetcher:
    """Downloads `tasks` in the background and yields their Items in order (`items()`, `done()`)."""

    def __init__(
        self,
        tasks: list[FileTask],
        stores: list,
        opts: FetchOptions,
        stage: Callable[[torch.Tensor, FileTask], Staged],
        counters: Counters,
    ):
        self.tasks = tasks
        self.stores = stores
        self.o = opts
        self.stage_fn = stage
        self.counters = counters
        self.stop = threading.Event()
        self.closed = False
        self.at_exit = False  # closed by the interpreter's exit hook: module globals may be gone since
        self.pool = BufferPool(opts.buffer_bytes, opts.pin)
        self.slots = Slots(opts.prefetch)
        self.ready: queue.Queue = queue.Queue()
        self.io = ThreadPoolExecutor(max_workers=opts.connections, thread_name_prefix="vaultsh-read")
        self.stager = ThreadPoolExecutor(max_workers=opts.stage_threads, thread_name_prefix="vaultsh-stage")
        self.thread = threading.Thread(target=self._schedule, name="vaultsh-prefetch", daemon=True)
        self.thread.start()
        _LIVE.add(self)

    def close(self) -> None:
        """Stop the downloads and let go of the buffers; a second call does nothing (safe at interpreter exit)."""
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        self.pool.close()
        self.slots.wake()
        self.io.shutdown(wait=False, cancel_futures=True)
        self.stager.shutdown(wait=False, cancel_futures=True)
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)
        while True:  # downloads never started or never finished: let go of their buffers
            try:
                dl = self.ready.get_nowait()
            except queue.Empty:
                break
            if isinstance(dl, _Download):
                dl.buf = None

    # -- background ---------------------------------------------------------
    def _schedule(self) -> None:
        try:
            for task in self.tasks:
                self.slots.acquire(self.stop)
                buf, lease = self.pool.acquire(task.size, self.stop)
                per = self.o.range_bytes
                ranges = [(i, s, min(per, p.size - s)) for i, p in enumerate(task.parts) for s in range(0, p.size, per)]
                dl = _Download(task, buf, lease, len(ranges))
                self.ready.put(dl)
                if not ranges:
                    self.stager.submit(self._finish, dl)
                    del buf, lease, dl
                    continue
                for part, start, length in ranges:
                    self.io.submit(self._range, dl, part, start, length)
                del buf, lease, dl  # never keep a buffer alive here while waiting for the next slot
            self.ready.put(None)
        except Closed:
            pass
        except RuntimeError as exc:  # an executor shut down by close()
            if not self.stop.is_set():
                self.ready.put(exc)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self.ready.put(exc)

    def _fetch(self, dl: _Download, part: int, start: int, length: int) -> int:
        p = dl.task.parts[part]
        at = p.offset + start
        buf = dl.buf
        if buf is None:  # close() let go of it
            raise Closed()
        mv = buf.numpy().data.cast("B")[at : at + length]
        return read_with_retries(
            self.stores[p.source],
            p.key,
            p.uri,
            start,
            mv,
            self.stop,
            self.o.retries,
            self.o.retry_backoff,
            on_retry=lambda: self.counters.add(retries=1),
        )

    def _range(self, dl: _Download, part: int, start: int, length: int) -> None:
        # Only dl refers to the buffer here (no memoryview argument or local outlives _fetch), so once
        # _finish drops dl.buf the memory is really free when the pool says so.
        try:
            if dl.error is None and not self.stop.is_set():
                got = self._fetch(dl, part, start, length)
                self.counters.add(bytes_downloaded=got)
                if got < length:
                    with dl.lock:
                        dl.short[part] = min(dl.short.get(part, start + got), start + got)
        except BaseException as exc:  # noqa: BLE001 - reported with the file
            traceback.clear_frames(exc.__traceback__)  # the frames' memoryviews would pin the buffer
            with dl.lock:
                if dl.error is None:
                    dl.error = exc
        finally:
            with dl.lock:
                dl.remaining -= 1
                last = dl.remaining == 0
            if last:
                try:
                    self.stager.submit(self._finish, dl)
                except RuntimeError:  # closed
                    dl.buf = None
                    self.pool.release(dl.take_lease())

    def _finish(self, dl: _Download) -> None:
        item = Item(dl.task)
        try:
            if dl.error is not None:
                raise dl.error
            if dl.short:
                i = min(dl.short)
                p = dl.task.parts[i]
                raise FormatError(
                    f"{p.uri}: truncated or replaced: {dl.short[i]} bytes readable, {p.size} expected (listed size)"
                )
            if dl.buf is None:  # close() let go of it
                raise Closed()
            item.staged = self.stage_fn(dl.buf, dl.task)
        except BaseException as exc:  # noqa: BLE001 - the consumer applies on_error
            traceback.clear_frames(exc.__traceback__)
            item.error, item.staged = exc, None
        dl.buf = None  # a CPU block goes back to the pool as soon as no tensor views it
        lease = dl.take_lease()
        if item.staged is not None and item.staged.aliases:
            item.lease = lease  # the consumer's tensors are views of the buffer
        else:
            self.pool.release(lease)
        dl.future.set_result(item)

    # -- consumer side ------------------------------------------------------
    def items(self) -> Iterator[Item]:
        """Items in file order; call `done(item)` when moving past one."""
        while True:
            t0 = time.perf_counter()
            while True:
                try:
                    dl = self.ready.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    if not self.thread.is_alive() and self.ready.empty():
                        dl = None
                        break
            if isinstance(dl, BaseException):
                raise dl
            if dl is None:
                self.counters.add(wait_s=time.perf_counter() - t0)
                return
            while True:
                try:
                    item = dl.future.result(timeout=_POLL_S)
                    break
                except FutureTimeout:
                    if self.stop.is_set():
                        return
            self.counters.add(wait_s=time.perf_counter() - t0)
            self.slots.release()
            yield item

    def done(self, item: Item) -> None:
        """The consumer moved past `item`: what it still holds of the buffer is its own from now on."""
        item.staged = None
        if item.lease is not None:
            self.pool.disown(item.lease)
            item.lease = None
