"""Global shuffle across shards: a seeded permutation of every row, in two passes.

Pass 1 reads the megabatches in plan order. For each one, the rows are
dealt to shards by a multivariate hypergeometric draw against the shards'
remaining capacities (exactly what cutting a uniform random permutation of
all rows into the shards gives), in a random order, and the rows of shards
being written now are kept: in memory when they fit in half the available
RAM, else spilled to a local file (one per megabatch, grouped by shard,
column by column). Pass 2 writes each shard by a uniform random
interleaving of its pieces. Together that is a uniform random permutation
of all rows. Spilled, memory stays at one megabatch plus one row group; kept
in memory, the pieces take the size of the shards being written.

Every draw depends only on the seed and the plan, never on which shards are
already done, so a resumed export writes exactly the rows the first one
would have: finished shards are skipped, not re-dealt.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from vaultsh.errors import UserError
from vaultsh.export.rows import Block, take

_EXACT_LIMIT = 10**9  # numpy's multivariate hypergeometric needs sum(colors) below this


def allocate(rng: np.random.Generator, remaining: np.ndarray, r: int) -> np.ndarray:
    """How many of `r` rows go to each shard, given the shards' remaining capacities.

    Exact (multivariate hypergeometric) below 10**9 remaining rows; above it a
    sequence of binomial draws clipped to the capacities, which still deals
    every row to exactly one slot.
    """
    remaining = np.asarray(remaining, dtype=np.int64)
    total = int(remaining.sum())
    if r > total:
        raise ValueError(f"{r} rows do not fit in {total} remaining slots")
    if total < _EXACT_LIMIT:
        return rng.multivariate_hypergeometric(remaining, r, method="marginals").astype(np.int64)
    counts = np.zeros_like(remaining)
    left, rest = r, total
    for s, cap in enumerate(remaining):
        cap = int(cap)
        if left == 0:
            break
        rest_after = rest - cap
        if rest_after == 0:
            c = left
        else:
            c = int(rng.binomial(left, cap / rest))
            c = min(max(c, left - rest_after), cap, left)
        counts[s] = c
        left -= c
        rest = rest_after
    return counts


@dataclass
class _Column:
    name: str
    dtype: np.dtype
    inner: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.inner, dtype=np.int64))


@dataclass
class Spill:
    """Pass 1's output: pieces of each shard, in local files, or in memory when they fit (`in_memory`)."""

    directory: str | None
    columns: list[_Column] = field(default_factory=list)
    # shard index -> [(path, offset, rows)] in plan (megabatch) order; in memory: (None, block, rows)
    pieces: dict[int, list[tuple]] = field(default_factory=dict)
    bytes: int = 0

    @property
    def in_memory(self) -> bool:
        return self.directory is None

    @property
    def row_bytes(self) -> int:
        return sum(c.row_bytes for c in self.columns)

    def add(self, m: int, block: Block, by_shard: list[tuple[int, np.ndarray]]) -> int:
        """Spill the rows `idx` of `block` for each (shard, idx); returns bytes written."""
        if not self.columns:
            self.columns = [_Column(k, a.dtype, tuple(a.shape[1:])) for k, a in block.items()]
        if self.directory is None:  # in memory: the gathered copy is the piece, no file written and read back
            written = 0
            for s, idx in by_shard:
                part = take(block, idx)
                self.pieces.setdefault(s, []).append((None, part, len(idx)))
                written += sum(a.nbytes for a in part.values())
            self.bytes += written
            return written
        path = os.path.join(self.directory, f"{m:08d}.spill")
        written = 0
        with open(path, "wb") as f:
            for s, idx in by_shard:
                part = take(block, idx)
                self.pieces.setdefault(s, []).append((path, written, len(idx)))
                for c in self.columns:
                    data = np.ascontiguousarray(part[c.name])
                    f.write(data.data.cast("B"))
                    written += data.nbytes
        self.bytes += written
        return written

    def _read(self, piece: tuple, start: int, n: int) -> Block:
        path, offset, rows = piece
        if path is None:  # in memory: `offset` is the piece's block
            return {name: arr[start : start + n] for name, arr in offset.items()}
        out: Block = {}
        with open(path, "rb") as f:
            col_off = offset
            for c in self.columns:
                f.seek(col_off + start * c.row_bytes)
                data = f.read(n * c.row_bytes)
                out[c.name] = np.frombuffer(data, dtype=c.dtype).reshape((n,) + c.inner)
                col_off += rows * c.row_bytes
        return out

    def shard_blocks(self, shard: int, rng: np.random.Generator, group_rows: int) -> Iterator[tuple[Block, int]]:
        """Shard `shard`'s rows as blocks of up to `group_rows`, in a uniform random interleaving."""
        pieces = self.pieces.get(shard, [])
        counts = np.array([p[2] for p in pieces], dtype=np.int64)
        source = np.repeat(np.arange(len(pieces), dtype=np.int32), counts)
        rng.shuffle(source)
        cursors = np.zeros(len(pieces), dtype=np.int64)
        for g0 in range(0, len(source), group_rows):
            lab = source[g0 : g0 + group_rows]
            k = len(lab)
            order = np.argsort(lab, kind="stable")
            need = np.bincount(lab, minlength=len(pieces))
            block: Block = {c.name: np.empty((k,) + c.inner, dtype=c.dtype) for c in self.columns}
            pos = 0
            for j in np.flatnonzero(need):
                n = int(need[j])
                rows = self._read(pieces[j], int(cursors[j]), n)
                at = order[pos : pos + n]
                for name, arr in rows.items():
                    block[name][at] = arr
                cursors[j] += n
                pos += n
            yield block, k * self.row_bytes

    def cleanup(self) -> None:
        self.pieces.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def memory_budget() -> int:
    """Bytes pass 1 may keep in memory instead of spilling: half of what the system has available now."""
    import psutil

    return psutil.virtual_memory().available // 2


def check_space(directory: str, needed: int) -> None:
    """A one-line error when the spill would not fit in `directory`."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        import humanize

        raise UserError(
            f"--shuffle needs {humanize.naturalsize(needed, binary=True)} of local scratch space in {directory}, "
            f"only {humanize.naturalsize(free, binary=True)} free: use --tmp-dir on a larger disk, or fewer shards per run (--max-shards)"
        )


def deal(rng: np.random.Generator, remaining: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts per shard, a random order of the r rows): rows order[cum[s]:cum[s+1]] go to shard s."""
    counts = allocate(rng, remaining, r)
    order = rng.permutation(r)
    return counts, order


def shard_rng(seed: int, shard: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, 1, shard]))


def deal_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, 0]))


def scratch_base(tmp_dir: str | None) -> str | None:
    """The directory spill files go under (None: the system temp); a one-line error when it does not exist."""
    base = tmp_dir or os.environ.get("VAULTSH_TMPDIR") or None
    if base and not os.path.isdir(base):
        raise UserError(f"--tmp-dir {base}: no such directory")
    return base


def spill_dir(tmp_dir: str | None) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="vaultsh-export-", dir=scratch_base(tmp_dir))
