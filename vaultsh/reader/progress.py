"""Progress and throughput of a reader pass, for the caller (`reader.stats`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields


@dataclass
class ReaderStats:
    """Progress and throughput of the current (or last) pass.

    `bytes_downloaded` counts file bytes fetched from the store; `states_bytes`
    the bytes of the `states` tensors handed out (in the output dtype);
    `tokens` the real (unmasked) tokens handed out and `positions` every
    position (N*T) of the megabatches read; `dropped` how many tokens each
    filter dropped (masked, skip_positions, exclude_token_ids, max_norm). `wait_s` is the time the consumer
    spent blocked inside `next()` waiting for data. `peak_buffered_bytes` is
    the most download-buffer memory the reader held at once (at most
    `buffer_bytes`, unless a single file is larger than that).
    """

    files_total: int = 0
    files_read: int = 0
    files_skipped: int = 0
    skipped: list = field(default_factory=list)  # [(uri, reason)]
    dropped: dict = field(default_factory=dict)  # filter name -> tokens dropped
    sequences: int = 0
    tokens: int = 0
    positions: int = 0
    batches: int = 0
    bytes_downloaded: int = 0
    states_bytes: int = 0
    retries: int = 0
    wait_s: float = 0.0
    elapsed_s: float = 0.0
    buffered_bytes: int = 0
    peak_buffered_bytes: int = 0
    buffer_bytes: int = 0

    def _per_s(self, amount: float) -> float:
        return amount / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """Downloaded MB (1e6 bytes) per second of the pass."""
        return self._per_s(self.bytes_downloaded) / 1e6

    @property
    def states_mb_per_s(self) -> float:
        """MB of `states` delivered as tensors per second."""
        return self._per_s(self.states_bytes) / 1e6

    @property
    def tokens_per_s(self) -> float:
        return self._per_s(self.tokens)

    @property
    def wait_fraction(self) -> float:
        """Share of the pass the consumer spent waiting for data."""
        return self._per_s(self.wait_s)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["skipped"] = [list(s) for s in self.skipped]
        out["dropped"] = dict(self.dropped)
        out.update(
            mb_per_s=self.mb_per_s,
            states_mb_per_s=self.states_mb_per_s,
            tokens_per_s=self.tokens_per_s,
            wait_fraction=self.wait_fraction,
        )
        return out


class Counters:
    """Thread-safe counters behind ReaderStats (one per pass)."""

    def __init__(self, files_total: int = 0):
        self.lock = threading.Lock()
        self.s = ReaderStats(files_total=files_total)
        self.t0: float | None = None
        self.t_end: float | None = None

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        self.t_end = time.perf_counter()

    def add(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self.s, k, getattr(self.s, k) + v)

    def drop(self, counts: dict[str, int]) -> None:
        with self.lock:
            for k, v in counts.items():
                self.s.dropped[k] = self.s.dropped.get(k, 0) + v

    def skipped(self, uri: str, reason: str) -> None:
        with self.lock:
            self.s.files_skipped += 1
            self.s.skipped.append((uri, reason))

    def snapshot(self, buffered: tuple[int, int, int] | None = None) -> ReaderStats:
        """A copy; `buffered` is (held, peak, limit) of the buffer pool."""
        with self.lock:
            out = ReaderStats(**{f.name: getattr(self.s, f.name) for f in fields(self.s)})
            out.skipped = list(self.s.skipped)
            out.dropped = dict(self.s.dropped)
            if self.t0 is not None:
                out.elapsed_s = (self.t_end or time.perf_counter()) - self.t0
        if buffered is not None:
            out.buffered_bytes, out.peak_buffered_bytes, out.buffer_bytes = buffered
        return out
