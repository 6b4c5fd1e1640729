"""Timing probes for benchmarks/gpu_check.py: one clock for CPU and CUDA, and a
probe around the worker's forward calls and device-to-host copies.

On CUDA a mark is a recorded `torch.cuda.Event` (read back as GPU time after a
synchronize); on CPU it is `time.perf_counter()`. Everything above the clock
is the same code on both, so `gpu_check.py --smoke` on CPU exercises the path
the GPU run takes.

The probe wraps two names from outside the worker (it never edits it):
`collector.generation.forward_chunks` (which `Worker._capture` imports on
each call) and `collector.worker.DeviceCopier.copy`. If either disappears, or
the worker stops calling them, `install` or `CollectProbe.check` says so
instead of reporting empty figures.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


class Clock:
    """Marks on the GPU timeline (CUDA events) or the host clock (CPU), read as ms."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self._ref = self.mark()

    def mark(self, stream=None):
        """A point on this clock: recorded on `stream` (default: the current stream) on CUDA."""
        if not self.cuda:
            return time.perf_counter()
        import torch

        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream) if stream is not None else ev.record()
        return ev

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def ms(self, mark) -> float:
        """Milliseconds from the clock's start to `mark` (CUDA: after `sync()`)."""
        if not self.cuda:
            return (mark - self._ref) * 1e3
        return self._ref.elapsed_time(mark)


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end] intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def overlap_ms(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Time covered by both the intervals `a` and the intervals `b`."""
    return union_ms(a) + union_ms(b) - union_ms(a + b)


@dataclass
class CollectProbe:
    """What the probe saw in one collection: forward and copy intervals, bytes copied."""

    clock: Clock
    forwards: list = field(default_factory=list)  # (start mark, end mark, rows)
    copies: list = field(default_factory=list)  # (start mark, end mark, bytes)

    def check(self) -> None:
        if not self.forwards:
            raise RuntimeError(
                "the probe saw no forward: does run_worker still call collector.generation.forward_chunks?"
            )
        if not self.copies:
            raise RuntimeError("the probe saw no device-to-host copy: does run_worker still use DeviceCopier.copy?")

    def forward_ms(self) -> list[tuple[float, float]]:
        return [(self.clock.ms(s), self.clock.ms(e)) for s, e, _ in self.forwards]

    def copy_ms(self) -> list[tuple[float, float]]:
        return [(self.clock.ms(s), self.clock.ms(e)) for s, e, _ in self.copies]

    @property
    def copy_bytes(self) -> int:
        return sum(n for _, _, n in self.copies)


@contextmanager
def install(device: str):
    """Wrap the worker's forward and copy entry points for the duration; yields a CollectProbe."""
    import collector.generation as generation
    import collector.worker as worker

    if not hasattr(generation, "forward_chunks") or not hasattr(getattr(worker, "DeviceCopier", None), "copy"):
        raise RuntimeError(
            "collector.generation.forward_chunks or collector.worker.DeviceCopier.copy is gone: "
            "update benchmarks/gpu_probe.py"
        )
    probe = CollectProbe(Clock(device))
    orig_fwd, orig_copy = generation.forward_chunks, worker.DeviceCopier.copy
    lock = threading.Lock()

    def forward_chunks(capture, runner, input_ids, attention_mask, dev):
        start = probe.clock.mark()
        out = orig_fwd(capture, runner, input_ids, attention_mask, dev)
        with lock:
            probe.forwards.append((start, probe.clock.mark(), int(input_ids.shape[0])))
        return out

    def copy(self, dest, src):
        stream = getattr(self, "stream", None)
        if stream is not None:  # start the timing once the side stream has waited for the forward
            import torch

            stream.wait_stream(torch.cuda.current_stream())
        start = probe.clock.mark(stream)
        orig_copy(self, dest, src)
        with lock:
            probe.copies.append((start, probe.clock.mark(stream), dest.numel() * dest.element_size()))

    generation.forward_chunks, worker.DeviceCopier.copy = forward_chunks, copy
    try:
        yield probe
    finally:
        generation.forward_chunks, worker.DeviceCopier.copy = orig_fwd, orig_copy
        probe.clock.sync()


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak on a GPU, sampled process RSS on CPU."""

    def __init__(self, device: str, every_s: float = 0.005):
        self.cuda = str(device).startswith("cuda")
        self.kind = "cuda_max_memory_allocated" if self.cuda else "process_rss_sampled"
        self.peak = 0
        self._every = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(self._every)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            self._thread.join()
