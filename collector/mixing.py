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

Why not ``datasets.interleave_datasets``: the streams here are plain Python
iterators of `Document`s from every kind of source (the pydoc topics, local
files read by byte offset, ``hf:`` keys, labelled ``path`` data), most of
which are not `datasets.Dataset` objects and should not need the optional
``datasets`` package; the library's ``all_exhausted`` oversamples (repeats)
streams that ran out, where this one drops them (as the newer
``all_exhausted_without_replacement`` does); and the choices come from
one numpy generator seeded from the run's seed, so every worker rebuilds the
same mixed stream up to its own batches without coordination.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")
STRATEGIES = ("first_exhausted", "all_exhausted")
_CHUNK = 4096


def interleave(
    streams: Sequence[Iterator[T]], weights: Sequence[float], seed: int, stopping_strategy: str = "first_exhausted"
) -> Iterator[T]:
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
