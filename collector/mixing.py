"""Weighted, deterministic interleaving of several document streams.

Each next document comes from stream ``i`` with probability
``weight_i / sum(weights)`` (over the streams still running), drawn from a
numpy generator seeded with ``seed``: the same seed gives the same sequence
of choices, hence the same mixed stream on every worker.

Stopping strategies (the names of ``datasets.interleave_datasets``):

- ``first_exhausted`` (default): stop as soon as a chosen stream has run out,
  so the proportions hold over the whole mixed stream;
- ``all_exhausted``: drop streams as they run out and renormalise the weights
  of the rest, until every stream is used up (no stream is repeated).
"""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")
STRATEGIES = ("first_exhausted", "all_exhausted")
_CHUNK = 4096


def interleave(streams: Sequence[Iterator[T]], weights: Sequence[float], seed: int,
               stopping_strategy: str = "first_exhausted") -> Iterator[T]:
    """Yield items of `streams` interleaved by `weights` (see the module docstring)."""
    import numpy as np

    if len(streams) != len(weights) or not streams:
        raise ValueError("interleave needs one weight per stream and at least one stream")
    if stopping_strategy not in STRATEGIES:
        raise ValueError(f"stopping_strategy {stopping_strategy!r} is not one of {STRATEGIES}")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be > 0, got {list(weights)}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x6D6978])  # 'mix': apart from the sources' own seeds
    its = [iter(s) for s in streams]
    live = [True] * len(its)
    w = np.asarray(weights, dtype=np.float64)
    try:
        while any(live):
            p = np.where(live, w, 0.0)
            p = p / p.sum()
            for c in rng.choice(len(its), size=_CHUNK, p=p):
                try:
                    yield next(its[c])
                except StopIteration:
                    if stopping_strategy == "first_exhausted":
                        return
                    live[c] = False
                    break  # renormalise over the streams left
    finally:
        for it in its:
            close = getattr(it, "close", None)
            if close is not None:
                close()
