"""Token mode: a seeded mixing buffer across megabatches, and fixed-size flat batches.

Both work on a list of aligned "columns" (the states of each hook, the token
ids, ...), all with the same number of rows: a row is one token, and every
column moves with it, so aligned hooks stay aligned through the mixing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

Columns = list[torch.Tensor]


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
        self.pools: Columns | None = None

    def add(self, cols: Columns) -> Columns | None:
        if self.pools is None:
            self.pools = [torch.empty((self.cap, *c.shape[1:]), dtype=c.dtype, device=c.device) for c in cols]
        m = cols[0].shape[0]
        take = min(self.cap - self.fill, m)
        if take:
            for pool, c in zip(self.pools, cols):
                pool[self.fill : self.fill + take] = c[:take]
            self.fill += take
        outs: list[Columns] = []
        pos = take
        while pos < m:
            r = min(m - pos, self.cap)
            slots = torch.randperm(self.cap, generator=self.g)[:r].to(self.pools[0].device)
            outs.append([pool[slots] for pool in self.pools])
            for pool, c in zip(self.pools, cols):
                pool[slots] = c[pos : pos + r]
            pos += r
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else [torch.cat(parts) for parts in zip(*outs)]

    def drain(self) -> Columns | None:
        if self.pools is None or self.fill == 0:
            return None
        perm = torch.randperm(self.fill, generator=self.g).to(self.pools[0].device)
        out = [pool[: self.fill][perm] for pool in self.pools]
        self.fill = 0
        return out


class Batcher:
    """Cuts a stream of row-aligned columns into batches of `batch_size` rows (views where possible)."""

    def __init__(self, batch_size: int):
        self.b = batch_size
        self.left: Columns | None = None

    def push(self, cols: Columns) -> Iterator[Columns]:
        pos = 0
        if self.left is not None:
            need = self.b - self.left[0].shape[0]
            if cols[0].shape[0] < need:
                self.left = [torch.cat([a, c]) for a, c in zip(self.left, cols)]
                return
            yield [torch.cat([a, c[:need]]) for a, c in zip(self.left, cols)]
            self.left = None
            pos = need
        m = cols[0].shape[0]
        while m - pos >= self.b:
            yield [c[pos : pos + self.b] for c in cols]
            pos += self.b
        if pos < m:
            self.left = [c[pos:] for c in cols]

    def flush(self) -> Columns | None:
        out, self.left = self.left, None
        return out
