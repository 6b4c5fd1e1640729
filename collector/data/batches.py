"""Batching: `BatchStream` turns the data section into global batches, sharded over workers."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

from collector.data.encode import Encoder
from collector.data.sources import document_stream, plan_sources
from collector.data.specs import Batch, Document, SourceSpec
from vaultsh.errors import ConfigError, UserError

log = logging.getLogger("collector.data")  # the name it has always logged under


def _spec_value(spec: Any, name: str, default: Any = None) -> Any:
    return getattr(spec, name, default)


class BatchStream:
    """This worker's batches: global indices in [start_batch, n_batches) with b % num_workers == worker.

    After iteration: ``produced`` (batches yielded), ``exhausted`` (the source
    ran out before n_batches) and ``available_batches`` (global batches the
    source could fill, when exhausted).
    """

    def __init__(
        self,
        spec: Any,
        tokenizer,
        worker: int = 0,
        num_workers: int = 1,
        *,
        base_dir: str | os.PathLike | None = None,
        source: SourceSpec | None = None,
        max_new_tokens: int = 0,
    ):
        self.spec = spec
        self.tokenizer = tokenizer
        self.worker = int(worker)
        self.num_workers = int(num_workers)
        self.seq_length = int(_spec_value(spec, "seq_length"))
        self.batch_size = int(_spec_value(spec, "batch_size"))
        nb = _spec_value(spec, "n_batches")
        self.n_batches: int | None = None if nb is None else int(nb)
        self.seed = int(_spec_value(spec, "seed", 42))
        self.start_batch = int(_spec_value(spec, "start_batch", 0) or 0)
        self.skip_cache = bool(_spec_value(spec, "skip_cache", False))
        if self.seq_length < 1:
            raise ConfigError(f"data_config.seq_length: must be >= 1, got {self.seq_length}")
        if self.batch_size < 1:
            raise ConfigError(f"data_config.batch_size: must be >= 1, got {self.batch_size}")
        if self.n_batches is not None and self.n_batches < 0:
            raise ConfigError(f"data_config.n_batches: must be >= 0, got {self.n_batches}")
        if self.start_batch < 0:
            raise ConfigError(f"data_config.start_batch: must be >= 0, got {self.start_batch}")
        if self.num_workers < 1 or not 0 <= self.worker < self.num_workers:
            raise ConfigError(f"worker index {self.worker} is not in [0, num_runs={self.num_workers})")
        self.packing = bool(_spec_value(spec, "packing", False))
        self.max_new_tokens = int(max_new_tokens or 0)
        if self.packing and (self.skip_cache or self.max_new_tokens):
            raise ConfigError("data_config.packing: cannot be combined with skip_cache or generation (max_new_tokens)")
        if self.max_new_tokens >= self.seq_length:
            raise ConfigError(
                f"inference.max_new_tokens: {self.max_new_tokens} leaves no room for the prompt "
                f"(seq_length {self.seq_length})"
            )
        # generation mode: rows are prompts of up to seq_length - max_new_tokens tokens; a longer prompt
        # is dropped like skip_cache does (a cut prompt would lose the chat template's generation prompt)
        self.row_length = self.seq_length - self.max_new_tokens
        self.skip_cache = self.skip_cache or self.max_new_tokens > 0

        self.sources = [source] if source is not None else plan_sources(spec, base_dir)
        self.source = self.sources[0]
        self.description = " + ".join(s.key for s in self.sources)
        clean_added = bool(_spec_value(spec, "clean_added_tokens", False))
        clean_sys = bool(_spec_value(spec, "clean_default_system_prompt", False))
        self.encoder = Encoder(
            tokenizer,
            self.row_length,
            clean_added,
            clean_sys,
            data_key=self.description,
            generation_prompt=self.max_new_tokens > 0,
        )
        # packing tokenises whole documents (no truncation: they continue on the next row)
        self._full_encoder = Encoder(tokenizer, 1 << 40, clean_added, clean_sys, data_key=self.description)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = int(eos) if eos is not None else self.pad_id
        self.eos_keep = not (clean_added and self.eos_id in self.encoder.special_ids)
        self.produced = 0
        self.exhausted = False
        self.available_batches: int | None = None

    def batch_indices(self) -> range:
        """Global batch indices this worker is assigned (it may get fewer if the data runs out)."""
        if self.n_batches is None:
            raise ValueError("n_batches is unbounded")
        first = self.start_batch + (self.worker - self.start_batch) % self.num_workers
        return range(first, max(first, self.n_batches), self.num_workers)

    @property
    def planned_batches(self) -> int | None:
        return None if self.n_batches is None else len(self.batch_indices())

    def _owned(self, b: int) -> bool:
        return b >= self.start_batch and b % self.num_workers == self.worker

    def _last_owned(self) -> int | None:
        if self.n_batches is None:
            return None
        r = self.batch_indices()
        return r[-1] if len(r) else -1

    def _groups(self, docs: Iterator[Document], last: int | None) -> Iterator[tuple[int, list[Document], list | None]]:
        """(global index, documents, encodings if owned) for global batches 0, 1, ... up to last."""
        B = self.batch_size
        b = 0
        while last is None or b <= last:
            owned = self._owned(b)
            if not self.skip_cache:
                group = list(itertools.islice(docs, B))
                if len(group) < B:
                    self._mark_exhausted(b)
                    return
                yield b, group, (self.encoder.encode(group) if owned else None)
            else:
                group, encs = [], []
                while len(group) < B:
                    more = list(itertools.islice(docs, B - len(group)))
                    if not more:
                        self._mark_exhausted(b)
                        return
                    if owned:
                        for d, e in zip(more, self.encoder.encode(more)):
                            if not e[2]:
                                group.append(d)
                                encs.append(e)
                    else:
                        group += [d for d, long in zip(more, self.encoder.too_long(more)) if not long]
                yield b, group, (encs if owned else None)
            b += 1

    def _mark_exhausted(self, b: int) -> None:
        self.exhausted = True
        self.available_batches = b
        what = "packed rows" if self.packing else "usable documents"
        if b == 0:
            raise UserError(
                f"data_config.data_key: {self.description!r} has fewer than batch_size={self.batch_size} {what}"
                + (" (skip_cache drops documents longer than seq_length)" if self.skip_cache else "")
            )
        if self.n_batches is None:
            log.info("data source %r ran out after %d global batches", self.description, b)
        elif b < self.n_batches:
            log.warning(
                "data source %r ran out after %d global batches (n_batches=%s); worker %d produced %d",
                self.description,
                b,
                self.n_batches,
                self.worker,
                self.produced,
            )

    def __iter__(self) -> Iterator[Batch]:
        self.produced = 0
        self.exhausted = False
        self.available_batches = None
        last = self._last_owned()
        if last is not None and last < 0:
            return
        docs = self.documents()
        try:
            if self.packing:
                for b, rows in self._packed_groups(docs, last):
                    if rows is not None:
                        yield self._make_packed_batch(b, rows)
                        self.produced += 1
                return
            for b, group, encs in self._groups(docs, last):
                if encs is None:
                    continue
                yield self._make_batch(b, group, encs)
                self.produced += 1
        finally:
            close = getattr(docs, "close", None)
            if close is not None:
                close()

    def documents(self) -> Iterator[Document]:
        """The whole document stream (sources, labels, interleaving, shaping), as every worker sees it."""

        return document_stream(self.spec, self.sources, self.seed, self.encoder.lengths)

    def _packed_groups(self, docs: Iterator[Document], last: int | None) -> Iterator[tuple[int, list | None]]:
        """(global index, rows if owned) of packed batches 0, 1, ... up to last."""
        from collector.packing import pack_rows

        def encoded() -> Iterator[tuple[Any, Any, tuple[int, int]]]:  # (ids, keep, (source, document))
            while True:
                chunk = list(itertools.islice(docs, 64))
                if not chunk:
                    return
                for d, (ids, keep, _long) in zip(chunk, self._full_encoder.encode(chunk)):
                    yield ids, keep, (d.source, d.index)

        rows = pack_rows(encoded(), self.seq_length, self.eos_id, self.eos_keep)
        b = 0
        while last is None or b <= last:
            group = list(itertools.islice(rows, self.batch_size))
            if len(group) < self.batch_size:
                self._mark_exhausted(b)
                return
            yield b, (group if self._owned(b) else None)
            b += 1

    def _make_packed_batch(self, b: int, rows: list) -> Batch:
        import numpy as np
        import torch

        ids = torch.from_numpy(np.stack([r.ids for r in rows]))
        mask = torch.from_numpy(np.stack([r.keep for r in rows]))
        first = [r.segments[0] for r in rows]
        return Batch(
            index=b,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mask=mask,
            doc_index=[doc for _pos, (_src, doc), _off in first],
            source=[(src, doc, off) for _pos, (src, doc), off in first],
            segments=[(i, pos, src, doc, off) for i, r in enumerate(rows) for pos, (src, doc), off in r.segments],
        )

    def _make_batch(self, b: int, docs: list[Document], encs: list) -> Batch:
        import torch

        B, T = len(encs), self.row_length
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        att = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.bool)
        for i, (row, keep, _long) in enumerate(encs):
            n = len(row)
            if n:
                ids[i, :n] = torch.from_numpy(row)
                att[i, :n] = 1
                mask[i, :n] = torch.from_numpy(keep)
        names = sorted({k for d in docs for k in d.labels})
        labels = {k: [d.labels.get(k) for d in docs] for k in names}
        return Batch(
            index=b,
            input_ids=ids,
            attention_mask=att,
            mask=mask,
            doc_index=[d.index for d in docs],
            labels=labels,
            documents=list(docs),
            source=[(d.source, d.index, 0) for d in docs],
        )
