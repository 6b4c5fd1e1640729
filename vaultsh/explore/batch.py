"""The most recently committed megabatch of a hook, sequence by sequence: the dashboard's batch viewer's data.

Headless (no textual): `LatestBatches(run)` finds a hook's newest commit
record (read incrementally: records already seen are not read again), then
`load(hook)` reads that file's header, its `input_ids` and `mask` (and the
small `source` rows), and the run's tokenizer once. `Batch.heat(i, value)` is
`view --heat` on sequence i: one ranged read of that sequence's rows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vaultsh import tokens as dec
from vaultsh.errors import NotFoundError, UserError
from vaultsh.explore.heat import HeatResult, heat
from vaultsh.explore.text import Pieces, load_pieces
from vaultsh.explore.values import ValueFn, value_fn
from vaultsh.run import CommitRecord, FileRecord, Run

if TYPE_CHECKING:
    from vaultsh.megabatch import MegabatchHeader


@dataclass
class Batch:
    """One committed megabatch, its token ids and mask in memory; states read a sequence at a time."""

    run: Run
    hook: str
    file: FileRecord
    record: CommitRecord
    header: MegabatchHeader
    ids: list[list[int]]
    mask: list[list[bool]]
    pieces: Pieces
    sources: list[dict] | None = None

    @property
    def key(self) -> str:
        return self.file.key

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def d_model(self) -> int:
        return self.header.d_model

    def segments(self, i: int) -> list[tuple[str, bool]]:
        """Sequence i as (text, real) runs: real text decoded, masked runs apart (`vaultsh.tokens.segments`)."""
        return dec.segments(self.pieces.handle, self.ids[i], self.mask[i])

    def heat(self, i: int, value: int | ValueFn | None = None) -> HeatResult:
        """Sequence i coloured by `value`: its token norms (None), a dimension (an int), or any `ValueFn` (a
        direction, an SAE feature): `view --heat`'s values."""
        if not isinstance(value, ValueFn):
            value = value_fn(norm=True) if value is None else value_fn(dim=value)
        return heat(self.run.store, self.key, i, value, header=self.header, pieces=self.pieces)


def open_run(uri: str) -> Run | None:
    """The run at `uri` (a local path or s3:// URI); None while nothing has been written there yet."""
    try:
        return Run.at(uri)
    except NotFoundError:
        return None


def newest(commits: list[CommitRecord], hook: str) -> tuple[CommitRecord, FileRecord] | None:
    """The commit record (and its file of `hook`) committed last: latest `created`, then (worker, index)."""
    best = None
    for rec in commits:
        f = rec.files.get(hook)
        if f is not None and (best is None or (rec.created, rec.worker, rec.index) > best[0]):
            best = ((rec.created, rec.worker, rec.index), rec, f)
    return None if best is None else (best[1], best[2])


class LatestBatches:
    """The newest committed megabatch of each hook of one run; cheap to ask again (records are read once)."""

    def __init__(self, run: Run | str):
        self._uri = run if isinstance(run, str) else run.uri
        self.run: Run | None = run if isinstance(run, Run) else None
        self._known: dict = {}
        self._pieces: Pieces | None = None
        self.commits: list[CommitRecord] = []
        self._lock = threading.RLock()  # a viewer's older load, still on its thread, never races a newer one

    @property
    def uri(self) -> str:
        return self._uri

    def refresh(self) -> list[CommitRecord]:
        """Read the commit records that are new since the last call; every record, in (worker, index) order."""
        with self._lock:
            if self.run is None:
                self.run = open_run(self._uri)
                if self.run is None:
                    return []
            self.commits = self.run.iter_commits(known=self._known)
            return self.commits

    def hooks(self) -> list[str]:
        """The hooks the records name (after `refresh`)."""
        return sorted({h for rec in self.commits for h in rec.files})

    def load(self, hook: str) -> Batch | None:
        """The newest committed megabatch of `hook`, read; None while none is committed.

        Raises UserError (one line) when its file is missing or unreadable."""
        with self._lock:
            return self._load(hook)

    def _load(self, hook: str) -> Batch | None:
        from vaultsh.megabatch import read_megabatch, read_source
        from vaultsh.provenance import as_dict, source_names

        self.refresh()
        found = newest(self.commits, hook)
        if found is None or self.run is None:
            return None
        rec, f = found
        store = self.run.store
        mb = read_megabatch(store, f.key, names=["input_ids", "mask"])  # the header, then two ranged reads
        header = mb.header
        assert (
            header is not None and mb.input_ids is not None and mb.mask is not None
        )  # asked for (mask: all-true without one)
        if self._pieces is None:
            self._pieces = load_pieces(store, self.run.name, header.metadata)
        sources = None
        if header.has_source:
            src, _ = read_source(store, f.key, header)
            try:
                names = source_names(self.run.read_metadata(hook))
            except UserError:
                names = None
            sources = [as_dict(row, names) for row in src.tolist()] if src is not None else None
        return Batch(self.run, hook, f, rec, header, mb.input_ids.tolist(), mb.mask.tolist(), self._pieces, sources)
