"""Token mode: a seeded mixing buffer across megabatches, and fixed-size flat batches."""

from __future__ import annotations

from typing import Iterator

import torch


class Mixer:
    """A seeded mixing buffer of `capacity` tokens (a reservoir exchange).

    Tokens fill the pool; once it is full, each new token replaces one chosen
    at random, which is emitted. Every token comes out exactly once (`drain`
    empties the pool in random order at the end).
    """

    def __init__(self, capacity: int, generator: torch.Generator):
        self.cap = max(1, int(capacity))
        self.g = generator
        self.fill = 0
        self.pool: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None

    def _alloc(self, x: torch.Tensor, ids: torch.Tensor | None) -> None:
        self.pool = torch.empty((self.cap, x.shape[1]), dtype=x.dtype, device=x.device)
        if ids is not None:
            self.ids = torch.empty(self.cap, dtype=ids.dtype, device=ids.device)

    def add(self, x: torch.Tensor, ids: torch.Tensor | None):
        if self.pool is None:
            self._alloc(x, ids)
        m = x.shape[0]
        take = min(self.cap - self.fill, m)
        if take:
            self.pool[self.fill : self.fill + take] = x[:take]
            if self.ids is not None:
                self.ids[self.fill : self.fill + take] = ids[:take]
            self.fill += take
        outs, out_ids, pos = [], [], take
        while pos < m:
            r = min(m - pos, self.cap)
            slots = torch.randperm(self.cap, generator=self.g)[:r].to(self.pool.device)
            outs.append(self.pool[slots])
            self.pool[slots] = x[pos : pos + r]
            if self.ids is not None:
                out_ids.append(self.ids[slots])
                self.ids[slots] = ids[pos : pos + r]
            pos += r
        if not outs:
            return None, None
        return torch.cat(outs) if len(outs) > 1 else outs[0], (
            (torch.cat(out_ids) if len(out_ids) > 1 else out_ids[0]) if out_ids else None
        )

    def drain(self):
        if self.pool is None or self.fill == 0:
            return None, None
        perm = torch.randperm(self.fill, generator=self.g).to(self.pool.device)
        x = self.pool[: self.fill][perm]
        ids = self.ids[: self.fill][perm] if self.ids is not None else None
        self.fill = 0
        return x, ids


class Batcher:
    """Cuts a stream of [m, D] token tensors into [batch_size, D] batches (views where possible)."""

    def __init__(self, batch_size: int):
        self.b = batch_size
        self.left: torch.Tensor | None = None
        self.left_ids: torch.Tensor | None = None

    def push(self, x: torch.Tensor, ids: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        pos = 0
        if self.left is not None:
            need = self.b - self.left.shape[0]
            if x.shape[0] < need:
                self.left = torch.cat([self.left, x])
                self.left_ids = torch.cat([self.left_ids, ids]) if ids is not None else None
                return
            yield (torch.cat([self.left, x[:need]]),
                   torch.cat([self.left_ids, ids[:need]]) if ids is not None else None)
            self.left = self.left_ids = None
            pos = need
        m = x.shape[0]
        while m - pos >= self.b:
            yield x[pos : pos + self.b], (ids[pos : pos + self.b] if ids is not None else None)
            pos += self.b
        if pos < m:
            self.left = x[pos:]
            self.left_ids = ids[pos:] if ids is not None else None

    def flush(self):
        if self.left is None:
            return None
        out = (self.left, self.left_ids)
        self.left = self.left_ids = None
        return out
