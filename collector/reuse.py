"""Reuse an earlier run's exact sequences: `data.reuse_sequences_from: RUN_URI`.

A second run (another model with the same tokenizer) reads the first run's
committed megabatches of the same worker, in order, and feeds their stored
``input_ids`` and ``mask`` batch by batch: the same global batch indices, so
megabatch ``k`` of worker ``w`` holds the same sequences in both runs and
``ActivationReader.zip(run_a, run_b)`` can align them file by file. The
provenance (``source``, ``source_segments``, the ``sources`` names) is copied
too; ``labels.*`` are not.

The attention mask is rebuilt from the stored tensors: all ones when the first
run packed, otherwise 1 up to the last position that is content (``mask``) or
not the padding id (the collector right-pads). Under causal attention only a
trailing masked token equal to the padding id could be read differently, and
its own state is masked anyway.

Refused, one line each, before anything is stored: a first run that is not
there, a tokenizer whose vocabulary fingerprint differs from the one the first
run recorded (or a first run that recorded none), a different batch_size /
seq_length / num_runs / batches_per_upload, and a first run that has not
committed every batch this run asks for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from vaultsh.errors import ConfigError, UserError

# The config-time checks of `reuse_sequences_from` are `check_reuse_section` in
# collector/config/datacheck.py (with the rest of the data section's checks).


def open_batch_stream(cfg: Any, data_spec: Any, tokenizer: Any, worker: int, max_new_tokens: int = 0):
    """The worker's batches: a BatchStream over the data, or the first run's stored sequences."""
    uri = getattr(data_spec, "reuse_sequences_from", None)
    if uri is None:
        from collector.data import BatchStream

        return BatchStream(data_spec, tokenizer, worker=worker, num_workers=cfg.num_runs, max_new_tokens=max_new_tokens)
    return ReusedBatches(cfg, data_spec, tokenizer, worker)


def _open_first_run(uri: str):
    from vaultsh.errors import NotFoundError
    from vaultsh.finalize import open_run

    try:
        run = open_run(uri)
    except NotFoundError as e:
        raise UserError(f"data.reuse_sequences_from: {e}") from None
    cfg = run.read_cfg()
    if cfg is None:
        raise UserError(
            f"data.reuse_sequences_from: {run.uri} has no cfg.json (not a vaultsh run, or it never started)"
        )
    return run, cfg


class ReusedBatches:
    """Worker `worker`'s batches, read from the first run's committed megabatches (see the module docstring)."""

    def __init__(self, cfg: Any, spec: Any, tokenizer: Any, worker: int):
        from collector.provenance import padding_id, tokenizer_fingerprint

        self.uri = str(spec.reuse_sequences_from)
        self.worker = int(worker)
        self.num_workers = int(cfg.num_runs)
        self.batch_size = int(spec.batch_size)
        self.start_batch = int(spec.start_batch or 0)
        self.n_batches = int(spec.n_batches)
        self.run, first = _open_first_run(self.uri)
        where = f"data.reuse_sequences_from: {self.run.uri}"
        fcfg = first.get("config") or {}
        fdata, fupload = fcfg.get("data") or {}, fcfg.get("upload") or {}
        mine = {
            "data.batch_size": spec.batch_size,
            "data.seq_length": spec.seq_length,
            "num_runs": cfg.num_runs,
            "upload.batches_per_upload": cfg.upload.batches_per_upload,
        }
        theirs = {
            "data.batch_size": fdata.get("batch_size"),
            "data.seq_length": fdata.get("seq_length"),
            "num_runs": first.get("num_runs", fcfg.get("num_runs")),
            "upload.batches_per_upload": fupload.get("batches_per_upload"),
        }
        for k, v in mine.items():
            if theirs[k] != v:
                raise ConfigError(
                    f"{where}: {k} is {theirs[k]!r} there and {v!r} here; "
                    "the runs must agree to store the same sequences in the same files"
                )
        self.packed = bool(fdata.get("packing", False))
        self.hook, meta = self._a_hook(first, where)
        fp = meta.get("tokenizer_fingerprint")
        if fp is None:
            raise UserError(
                f"{where}: its metadata.json records no tokenizer_fingerprint (collected before "
                "provenance), so its tokens cannot be checked against this tokenizer"
            )
        if fp != tokenizer_fingerprint(tokenizer):
            raise UserError(
                f"{where}: was tokenized with a different tokenizer (vocabulary fingerprint "
                f"{fp[:19]}... there, {tokenizer_fingerprint(tokenizer)[:19]}... here); "
                "its token ids mean other tokens for this model"
            )
        self.pad_id = int(meta.get("padding_token_id", padding_id(tokenizer)))
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.source_names = list(meta.get("sources") or [])
        self.commits = self.run.iter_commits(worker=self.worker)
        self._check_complete(where)
        self.produced = 0
        self.exhausted = False

    def _a_hook(self, first: dict, where: str) -> tuple[str, dict]:
        """A hook of the first run with a metadata.json (every hook stores the same input_ids)."""
        for h in sorted(first.get("hooks") or {}):
            meta = self.run.read_metadata(h)
            if meta is not None:
                return h, meta
        raise UserError(f"{where}: has no hook with a metadata.json yet (incomplete: nothing was stored)")

    def _wanted(self) -> range:
        k, w = self.num_workers, self.worker
        first = self.start_batch + (w - self.start_batch) % k
        return range(first, max(first, self.n_batches), k)

    def _check_complete(self, where: str) -> None:
        want = self._wanted()
        if not len(want):
            return
        have_end = self.commits[-1].batch_end if self.commits else 0
        indices = [c.index for c in self.commits]
        if indices != list(range(len(indices))):
            raise UserError(
                f"{where}: worker {self.worker}'s commits are not contiguous ({indices[:8]}...): incomplete"
            )
        if have_end <= want[-1]:
            raise UserError(
                f"{where}: incomplete: worker {self.worker} committed global batches up to "
                f"{have_end - 1}, this run needs up to {want[-1]} (finish that run, or lower n_batches)"
            )

    def __iter__(self) -> Iterator:
        from vaultsh import megabatch as mbf

        B, K = self.batch_size, self.num_workers
        self.produced = 0
        for c in self.commits:
            if c.batch_end <= self.start_batch:
                continue
            if c.batch_start >= self.n_batches:
                break
            f = c.files.get(self.hook)
            if f is None:
                raise UserError(
                    f"data.reuse_sequences_from: {self.run.uri}: commit {c.worker}/{c.index} "
                    f"names no file of hook {self.hook!r}"
                )
            header = mbf.read_header(self.run.store, f.key)
            names = ["input_ids", "mask"] + [n for n in (mbf.SOURCE, mbf.SOURCE_SEGMENTS) if n in header.tensors]
            mb = mbf.read_megabatch(self.run.store, f.key, names=names)
            for j, b in enumerate(range(c.batch_start, c.batch_end, K)):
                if b < self.start_batch:
                    continue
                if b >= self.n_batches:
                    return
                yield self._batch(b, mb, j * B, (j + 1) * B, f.key)
                self.produced += 1

    def _batch(self, b: int, mb, lo: int, hi: int, key: str):
        import torch

        from collector.data import Batch

        ids, mask = mb.input_ids[lo:hi].to(torch.int64), mb.mask[lo:hi]
        if ids.shape[0] != self.batch_size:
            raise UserError(f"data.reuse_sequences_from: {key} holds fewer rows than its commit record says")
        if self.packed:
            att = torch.ones_like(ids)
        else:
            real = mask | (ids != self.pad_id)
            pos = torch.arange(ids.shape[1])
            last = torch.where(real, pos, torch.full_like(pos, -1)).max(dim=1).values
            att = (pos[None, :] <= last[:, None]).to(torch.int64)
        source = [(src, doc, off) for src, doc, off in mb.source[lo:hi].tolist()] if mb.source is not None else []
        segments = []
        if mb.source_segments is not None:
            seg = mb.source_segments
            rows = seg[(seg[:, 0] >= lo) & (seg[:, 0] < hi)]
            segments = [(row - lo, position, src, doc, off) for row, position, src, doc, off in rows.tolist()]
        return Batch(
            index=b,
            input_ids=ids,
            attention_mask=att,
            mask=mask,
            doc_index=[s[1] for s in source],
            source=source,
            segments=segments,
        )
