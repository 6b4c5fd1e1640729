"""Bounded prefetch: a pool of download buffers under a byte limit, and a count of files ahead."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from vaultsh.reader.fetch import Closed

_POLL_S = 0.1


class Block:
    """One download buffer's memory."""

    __slots__ = ("memory", "cap")

    def __init__(self, memory, cap: int):
        self.memory = memory  # a numpy array (CPU) or a pinned torch tensor
        self.cap = cap


class Lease:
    """One use of a block for one file: in_use, then free (back in the pool) or disowned (the caller's)."""

    __slots__ = ("block", "state")

    def __init__(self, block: Block):
        self.block = block
        self.state = "in_use"


class BufferPool:
    """Download buffers under a byte limit, reused once nothing refers to them.

    `held` counts every buffer the reader owns: in use (downloading, ready, or
    aliased by the batch being consumed) and free ones kept for reuse. A
    request that does not fit waits (free buffers are dropped first to make
    room); one larger than the whole limit waits until nothing is held and
    then proceeds alone, the only case where `peak` exceeds `limit`.

    CPU buffers are numpy arrays handed out as tensors over a numpy view; a
    weakref finalizer on the view sees the moment the last tensor view of it
    is gone, and the memory goes back on the free list (no page faults for the
    next file). When the consumer moves past a batch whose tensors are views
    (`disown`), the buffer stops counting: what the caller keeps is the
    caller's; it is taken back, if it fits, when the caller lets go. Pinned
    buffers (CUDA) are not pooled: torch's caching host allocator does that.
    """

    def __init__(self, limit: int, pin: bool):
        self.limit = int(limit)
        self.pin = pin
        self.cond = threading.Condition(threading.RLock())  # finalizers may run inside a locked section
        self.held = 0
        self.peak = 0
        self.free: list[Block] = []
        self.closed = False

    def _room(self, size: int) -> bool:
        return self.held + size <= self.limit or self.held == 0

    def acquire(self, size: int, stop: threading.Event) -> tuple[torch.Tensor, Lease]:
        """A uint8 tensor of `size` bytes and its lease (pass it to `release`/`disown`)."""
        with self.cond:
            while True:
                if self.closed or stop.is_set():
                    raise Closed()
                fits = [b for b in self.free if b.cap >= size]
                if fits:
                    block = min(fits, key=lambda b: b.cap)
                    self.free.remove(block)
                    return self._view(Lease(block), size)
                if self._room(size):
                    self.held += size
                    self.peak = max(self.peak, self.held)
                    break
                if self.free:
                    self._drop(self.free.pop(0))
                    continue
                self.cond.wait(_POLL_S)
        try:
            memory = self.alloc(size, self.pin)
        except BaseException:
            self.release_bytes(size)
            raise
        return self._view(Lease(Block(memory, size)), size)

    @staticmethod
    def alloc(size: int, pin: bool):
        """Fresh buffer memory: a numpy array, or a pinned torch tensor when `pin`."""
        if pin:
            return torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return np.empty(size, dtype=np.uint8)

    def _view(self, lease: Lease, size: int) -> tuple[torch.Tensor, Lease]:
        if self.pin:
            return lease.block.memory[:size], lease
        view = lease.block.memory[:size]
        weakref.finalize(view, self._returned, lease)
        return torch.from_numpy(view), lease

    def _drop(self, block: Block) -> None:
        self.held -= block.cap
        block.memory = None

    def _returned(self, lease: Lease) -> None:
        """The last tensor view of a CPU lease is gone: its block can be reused."""
        with self.cond:
            cap = lease.block.cap
            if lease.state == "in_use":
                self.free.append(lease.block)
            elif lease.state == "disowned" and self.held + cap <= self.limit:  # take it back if it fits
                self.held += cap
                self.peak = max(self.peak, self.held)
                self.free.append(lease.block)
            lease.state = "returned"
            if self.closed:
                while self.free:
                    self._drop(self.free.pop())
            self.cond.notify_all()

    def release(self, lease: Lease) -> None:
        """The reader is done with a lease (CPU memory returns to the pool once no view of it is left)."""
        if self.pin:
            with self.cond:
                if lease.state == "in_use":
                    self._drop(lease.block)
                    lease.state = "returned"
                self.cond.notify_all()

    def disown(self, lease: Lease) -> None:
        """The consumer moved past a batch of views of the lease: from now on that memory is the caller's."""
        with self.cond:
            if lease.state == "in_use":
                self.held -= lease.block.cap
                lease.state = "disowned"
                self.cond.notify_all()

    def release_bytes(self, size: int) -> None:
        with self.cond:
            self.held -= size
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            while self.free:
                self._drop(self.free.pop())
            self.cond.notify_all()

    def snapshot(self) -> tuple[int, int, int]:
        """(held, peak, limit)."""
        with self.cond:
            return self.held, self.peak, self.limit


class Slots:
    """A counting semaphore that close() wakes up (files allowed ahead of the consumer)."""

    def __init__(self, n: int):
        self.n = n
        self.cond = threading.Condition()

    def acquire(self, stop: threading.Event) -> None:
        with self.cond:
            while self.n <= 0:
                if stop.is_set():
                    raise Closed()
                self.cond.wait(_POLL_S)
            if stop.is_set():
                raise Closed()
            self.n -= 1

    def release(self) -> None:
        with self.cond:
            self.n += 1
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()
