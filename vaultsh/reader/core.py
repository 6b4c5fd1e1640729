"""ActivationReader: stream the committed megabatches of a hook directory as tensors."""

from __future__ import annotations

import logging
import os
import random
import warnings
from typing import Any, Iterator, Sequence

import torch

from vaultsh.errors import FormatError, NotFoundError, UserError
from vaultsh.reader import decode as dec
from vaultsh.reader.fetch import Closed, StoreSpec, TransientExhausted, resolve
from vaultsh.reader.prefetch import FetchOptions, FileTask, Item, Prefetcher
from vaultsh.reader.progress import Counters, ReaderStats
from vaultsh.reader.stage import NORMALIZE_MODES, Norm, Staged, Stager, normalizer, parse_dtype, seed_of
from vaultsh.reader.tokens import Batcher, Mixer
from vaultsh.run import FileRecord, Run
from vaultsh.stats import RunningStats

logger = logging.getLogger("vaultsh.reader")

MB = 1 << 20
DEFAULT_RANGE_BYTES = 16 * MB
MIN_RANGE_BYTES = 64 << 10
DEFAULT_CONNECTIONS = 16
MAX_CONNECTIONS = 64


class SkippedFileWarning(UserWarning):
    """A megabatch was skipped (on_error="skip"): missing, truncated, corrupt or of the wrong shape."""


class _Source:
    """One hook directory of one run."""

    def __init__(self, spec: StoreSpec, store, run: str, hook: str, md: dict | None):
        self.spec, self.store, self.run, self.hook, self.metadata = spec, store, run, hook, md
        self.uri = store.child_uri(Run(store, run).hook_prefix(hook))
        self.shape = dec.metadata_shape(md)
        self.dtype = dec.metadata_dtype(md)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["store"] = None  # reopened from the spec in the new process
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.store = self.spec.open()


def _whole(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise UserError(f"{name}={v!r} is not allowed: use a whole number >= {lo}")
    return v


class ActivationReader:
    """Stream the committed megabatches of one hook directory (or several) as tensors.

    source: a hook directory: `s3://bucket/run/hook`, a local path
        `vault/run/hook`, or `run/hook` inside `store=`; or a list of them
        (same T and D), read one after the other in the order given.
    device: where tensors are delivered ("cpu", "cuda", "cuda:1", ...). For
        CUDA, download buffers are pinned and copies are non-blocking on a side
        stream (`pin_memory=False` turns pinning off).
    dtype: convert `states` to this floating dtype (default: as stored).
    return_ids / return_mask / return_labels / return_file: include
        `input_ids` / `mask` / `labels` (a dict) / `file` (its URI) and
        `file_index` in each megabatch dict.
    tokens: False (default) yields one dict per megabatch, `states [N, T, D]`,
        `input_ids [N, T]`, `mask [N, T]`. True yields flat token batches
        `states [batch_size, D]` (+ `input_ids [batch_size]`) with masked
        tokens (padding, special tokens, default system prompts) dropped; the
        last batch may be short unless `drop_last`.
    batch_size: tokens per batch in token mode (default 4096).
    shuffle: seeded shuffle of the file order (default: commit order).
    shuffle_buffer: token mode only: a mixing buffer holding this many
        megabatches' worth of tokens, so batches mix tokens across files
        (seeded; 0 = tokens in file order).
    seed / epoch: fix every random choice; `set_epoch(e)` reshuffles per epoch.
    normalize: None, "center" (x - mean), "unit_norm" (x / mean norm: mean
        token norm 1), "center_unit_norm" ((x - mean) / sqrt(sum var)) or
        "standardize" ((x - mean) / std per feature), with the run's
        statistics.json (or `stats=`, a RunningStats).
    start: skip the first `start` files of the ordered list (resume: pass a
        saved `file_index`).
    rank / world_size (or `shard()`): files start+rank, start+rank+world_size,
        ...; inside a torch DataLoader each worker takes its share of those.
    prefetch: megabatches downloaded ahead of the consumer (default 2).
    buffer_bytes: bound on download-buffer memory held by the reader (default
        (prefetch + 2) x the largest file: the files ahead, the one being
        consumed, and room to take back the one before it for reuse); a file
        larger than the bound is read on its own.
    connections / range_bytes: parallel ranged reads per pass and their size.
    on_error: "raise" (default) or "skip" a missing, truncated, corrupt or
        mis-shaped file (skip: a SkippedFileWarning, a log line, and
        `stats.skipped`). Network errors are retried `retries` times per
        range, then always raised.
    verify: "size" (size, header, shapes and dtype are always checked) or
        "sha256" (also the digest from the commit record, where there is one).
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        store=None,
        device: str | torch.device = "cpu",
        dtype=None,
        return_ids: bool = True,
        return_mask: bool = True,
        return_labels: bool = False,
        return_file: bool = False,
        tokens: bool = False,
        batch_size: int | None = None,
        drop_last: bool = False,
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch: int = 0,
        normalize: str | None = None,
        stats: RunningStats | None = None,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        buffer_bytes: int | None = None,
        connections: int = DEFAULT_CONNECTIONS,
        range_bytes: int = DEFAULT_RANGE_BYTES,
        stage_threads: int = 2,
        pin_memory: bool | None = None,
        on_error: str = "raise",
        verify: str = "size",
        retries: int = 5,
        retry_backoff: float = 0.2,
        _token_shuffle: bool = False,
        _store_spec: StoreSpec | None = None,
    ):
        if on_error not in ("raise", "skip"):
            raise UserError(f"on_error={on_error!r} is not allowed; use 'raise' or 'skip'")
        if verify not in ("size", "sha256"):
            raise UserError(f"verify={verify!r} is not allowed; use 'size' or 'sha256'")
        if normalize is not None and normalize not in NORMALIZE_MODES:
            raise UserError(f"normalize={normalize!r} is not allowed; use one of {', '.join(NORMALIZE_MODES)} or None")
        for name, v, lo in (("prefetch", prefetch, 1), ("connections", connections, 1), ("range_bytes", range_bytes, 1),
                            ("stage_threads", stage_threads, 1), ("retries", retries, 0),
                            ("shuffle_buffer", shuffle_buffer, 0), ("start", start, 0)):
            _whole(name, v, lo)
        if batch_size is not None:
            _whole("batch_size", batch_size, 1)
        if buffer_bytes is not None:
            _whole("buffer_bytes", buffer_bytes, 1)
        if shuffle_buffer and not tokens:
            raise UserError("shuffle_buffer mixes tokens across megabatches: it needs tokens=True")

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {str(device)!r} requested but CUDA is not available "
                            "(torch.cuda.is_available() is False)")
        want_pin = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self._pin = want_pin and torch.cuda.is_available()
        self.dtype = parse_dtype(dtype)
        self.return_ids, self.return_mask = bool(return_ids), bool(return_mask)
        self.return_labels, self.return_file = bool(return_labels), bool(return_file)
        self.tokens = bool(tokens)
        self.batch_size = int(batch_size or 4096)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed, self.epoch = int(seed), int(epoch)
        self.normalize = normalize
        self.start = int(start)
        self.prefetch = int(prefetch)
        self.buffer_bytes = buffer_bytes
        self.connections = min(int(connections), MAX_CONNECTIONS)
        self.range_bytes = max(MIN_RANGE_BYTES, int(range_bytes))
        self.stage_threads = int(stage_threads)
        self.on_error, self.verify = on_error, verify
        self.retries, self.retry_backoff = int(retries), float(retry_backoff)
        self._token_shuffle = bool(_token_shuffle)
        self.rank, self.world_size = 0, 1
        self.shard(rank, world_size)

        sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        if not sources:
            raise UserError("no source given: pass a hook directory (s3://bucket/run/hook or a local path)")
        self._sources: list[_Source] = []
        self._records: list[tuple[int, FileRecord]] = []
        for i, src in enumerate(sources):
            spec, st, run_name, hook = resolve(src, store)
            try:
                s = _Source(_store_spec or spec, st, run_name, hook, Run(st, run_name).read_metadata(hook))
            except ValueError as exc:  # an invalid hook directory name
                raise UserError(f"{src!r}: {exc}") from None
            files = Run(st, run_name).committed_files(hook)
            if not files:
                raise UserError(self._nothing_message(src, s))
            self._sources.append(s)
            self._records.extend((i, f) for f in files)
        if self.start > len(self._records):
            raise UserError(f"start={self.start} is past the end: {len(self._records)} committed file(s)")
        shapes = {s.shape[1:] for s in self._sources if s.shape}
        if len(shapes) > 1:
            raise UserError(f"sources have different [T, D] in metadata.json: {sorted(shapes)}")

        self._norms: list[Norm] | None = None
        if normalize is not None:
            self._norms = [normalizer(stats if stats is not None else self._read_stats(i), normalize)
                           for i in range(len(self._sources))]

        self._counters = Counters(len(self._records))
        self._pf: Prefetcher | None = None
        self._files_done = 0
        self._n_shards = self.world_size
        self._closed = False
        self._pid = os.getpid()

    # -- set-up helpers ------------------------------------------------------
    @staticmethod
    def _nothing_message(src, s: _Source) -> str:
        msg = f"no committed megabatches under {s.uri}"
        run = Run(s.store, s.run)
        try:
            uncommitted = run.uncommitted_files(s.hook)
        except Exception:  # noqa: BLE001 - a hint only
            uncommitted = []
        if uncommitted:
            return msg + f" ({len(uncommitted)} uncommitted file(s) there are ignored until their run commits them)"
        if s.metadata is None:
            try:
                hooks = run.hooks()
            except Exception:  # noqa: BLE001 - a hint only
                hooks = []
            if hooks:
                return msg + f" (no such hook in run {run.name!r}; hooks there: {', '.join(hooks[:20])})"
            return msg + f" (nothing there: is {src!r} a RUN/HOOK directory?)"
        return msg

    def _read_stats(self, i: int) -> RunningStats:
        s = self._sources[i]
        run = Run(s.store, s.run)
        where = f"{s.uri}statistics.json"
        try:
            stats = run.read_statistics(s.hook)
        except FormatError as exc:  # an Activault file without a count: use the committed token count
            if "count" not in str(exc):
                raise
            total = sum(f.n_tokens for j, f in self._records if j == i) or 1
            stats = run.read_statistics(s.hook, count=total)
        if stats is None:
            raise UserError(f"normalize={self.normalize!r} needs {where}, which does not exist")
        if stats.count == 0:
            raise UserError(f"normalize={self.normalize!r}: {where} has no tokens counted")
        if s.shape and stats.d != s.shape[2]:
            raise UserError(f"{where} has d_model {stats.d}, metadata.json says {s.shape[2]}")
        return stats

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pf"] = None
        state["_counters"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._counters = Counters(len(self._records))
        self._pid = os.getpid()

    def __repr__(self) -> str:
        srcs = ", ".join(s.uri for s in self._sources)
        return f"ActivationReader({srcs!r}, files={len(self._records)}, device={str(self.device)!r})"

    # -- public knobs ----------------------------------------------------------
    def shard(self, rank: int, world_size: int) -> "ActivationReader":
        """Read only files rank, rank + world_size, ... (after `start`); returns self."""
        for name, v in (("rank", rank), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"{name}={v!r} must be a whole number")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"shard(rank={rank}, world_size={world_size}): need 0 <= rank < world_size")
        self.rank, self.world_size = rank, world_size
        return self

    def set_epoch(self, epoch: int) -> None:
        """Reseed the file-order shuffle and the mixing buffer for a new epoch."""
        self.epoch = int(epoch)

    def set_file_index(self, index: int) -> None:
        """Start the next pass at position `index` of the ordered list (resume)."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= len(self._records):
            raise UserError(f"file index {index!r} is out of range (0..{len(self._records)})")
        self.start = index

    @property
    def file_index(self) -> int:
        """Where to resume: `start` plus the files finished in this pass, times the shard count.

        Exact for one reader; with shards it assumes they move in step. In
        token mode a file counts once its tokens entered the batcher (or the
        mixing buffer); tokens still buffered there are not replayed on resume.
        """
        return min(len(self._records), self.start + self._files_done * self._n_shards)

    @property
    def stats(self) -> ReaderStats:
        """Progress and throughput of the current (or last) pass."""
        return self._counters.snapshot(self._pf.pool.snapshot() if self._pf is not None else None)

    def progress(self) -> dict:
        """`stats` as a plain dict (with MB/s, tokens/s and the wait share)."""
        return self.stats.to_dict()

    @property
    def metadata(self) -> dict | None:
        """metadata.json of the (first) source."""
        return self._sources[0].metadata

    @property
    def files(self) -> list[FileRecord]:
        """Every committed file, in read order (before `start` and sharding)."""
        return [f for _, f in self._ordered()]

    # -- ordering and sharding -------------------------------------------------
    def _ordered(self) -> list[tuple[int, FileRecord]]:
        recs = list(self._records)
        if self.shuffle:
            random.Random(seed_of(self.seed, self.epoch, 0)).shuffle(recs)
        return recs

    def _my_tasks(self) -> tuple[list[FileTask], int]:
        """This reader's files (after start, rank and DataLoader-worker sharding) and the shard count."""
        shard, n = self.rank, self.world_size
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            shard, n = shard * info.num_workers + info.id, n * info.num_workers
        ordered = self._ordered()
        tasks = []
        for pos in range(self.start + shard, len(ordered), n):
            i, f = ordered[pos]
            uri = self._sources[i].store.child_uri(f.key)
            tasks.append(FileTask(pos, i, f.key, uri, f.size, f.sha256, f.n_sequences))
        return tasks, n

    # -- iteration -------------------------------------------------------------
    def _stage(self, stager: Stager, buf: torch.Tensor, task: FileTask) -> Staged:
        src = self._sources[task.source]
        if self.verify == "sha256" and task.sha256:
            dec.check_sha256(memoryview(buf.numpy()).cast("B"), task.sha256, task.uri)
        d = dec.decode(buf, task.uri, labels=self.return_labels and not self.tokens)
        dec.check(d, task.uri, src.shape, src.dtype, task.n_sequences)
        return stager.stage(d.states, d.input_ids, d.mask, d.labels, buf, task.source, task.pos)

    def __iter__(self) -> Iterator[dict]:
        return self._iterate()

    def _iterate(self):
        if self._closed:
            raise UserError("this reader is closed")
        if os.getpid() != self._pid:  # forked (DataLoader worker): fresh connections
            for s in self._sources:
                s.store = s.spec.open()
            self._pid = os.getpid()
        if self._pf is not None:
            self._pf.close()
        tasks, self._n_shards = self._my_tasks()
        self._files_done = 0
        self._counters = Counters(len(tasks))
        biggest = max((t.size for t in tasks), default=1)
        opts = FetchOptions(
            prefetch=self.prefetch,
            buffer_bytes=self.buffer_bytes or max(1, (self.prefetch + 2) * biggest),
            connections=self.connections, range_bytes=self.range_bytes, stage_threads=self.stage_threads,
            retries=self.retries, retry_backoff=self.retry_backoff, pin=self._pin,
        )
        stager = Stager(self.device, self.dtype, self._norms, self.tokens, self.return_ids, self.return_mask,
                        self.return_labels, seed_of(self.seed, self.epoch) if self._token_shuffle else None)
        self._counters.start()
        pf = self._pf = Prefetcher(tasks, [s.store for s in self._sources], opts,
                                   lambda buf, task: self._stage(stager, buf, task), self._counters)
        try:
            batches = self._token_batches(pf, stager) if self.tokens else self._megabatches(pf, stager)
            yield from batches
        finally:
            self._counters.stop()
            pf.close()

    def _handle_error(self, item: Item) -> None:
        """on_error="skip": warn, log and count a bad file; otherwise (or a network error) raise."""
        exc = item.error
        if isinstance(exc, Closed):
            raise UserError("the reader was closed during iteration")
        content = isinstance(exc, (FormatError, NotFoundError)) and not isinstance(exc, TransientExhausted)
        if self.on_error != "skip" or not content:
            raise exc
        reason = str(exc)
        self._counters.skipped(item.task.uri, reason)
        logger.warning("skipping %s: %s", item.task.uri, reason)
        warnings.warn(f"vaultsh reader: skipping {item.task.uri}: {reason}", SkippedFileWarning, stacklevel=4)
        self._files_done += 1

    def _megabatches(self, pf: Prefetcher, stager: Stager):
        for item in pf.items():
            if item.error is not None:
                self._handle_error(item)
                continue
            st = item.staged
            stager.deliver(st)
            out: dict[str, Any] = {"states": st.states}
            if self.return_ids:
                out["input_ids"] = st.input_ids
            if self.return_mask:
                out["mask"] = st.mask
            if self.return_labels:
                out["labels"] = st.labels
            if self.return_file:
                out["file"], out["file_index"] = item.task.uri, item.task.pos
            self._counters.add(files_read=1, sequences=st.sequences, tokens=st.tokens, positions=st.positions,
                               batches=1, states_bytes=st.states.numel() * st.states.element_size())
            try:
                yield out
            finally:
                del out, st
                pf.done(item)
                self._files_done += 1

    def _token_batches(self, pf: Prefetcher, stager: Stager):
        g = torch.Generator().manual_seed(seed_of(self.seed, self.epoch, 2))
        mixer: Mixer | None = None
        batcher = Batcher(self.batch_size)

        def emit(x, ids):
            out = {"states": x}
            if self.return_ids:
                out["input_ids"] = ids
            self._counters.add(batches=1, tokens=x.shape[0], states_bytes=x.numel() * x.element_size())
            return out

        for item in pf.items():
            if item.error is not None:
                self._handle_error(item)
                continue
            st = item.staged
            stager.deliver(st)
            self._counters.add(files_read=1, sequences=st.sequences, positions=st.positions)
            x, ids = st.states, st.input_ids
            pf.done(item)
            self._files_done += 1
            if self.shuffle_buffer:
                if mixer is None:  # sized from metadata.json's megabatch, else from this file
                    per_file = max((s.shape[0] * s.shape[1] for s in self._sources if s.shape),
                                   default=st.positions)
                    mixer = Mixer(self.shuffle_buffer * max(1, per_file), g)
                x, ids = mixer.add(x, ids)
                if x is None:
                    continue
            yield from (emit(bx, bids) for bx, bids in batcher.push(x, ids))
        if mixer is not None:
            x, ids = mixer.drain()
            if x is not None:
                yield from (emit(bx, bids) for bx, bids in batcher.push(x, ids))
        rest = batcher.flush()
        if rest is not None and not self.drop_last:
            yield emit(*rest)

    # -- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        """Stop background downloads and drop buffers (the reader can't be iterated again)."""
        self._closed = True
        if self._pf is not None:
            self._pf.close()

    def __enter__(self) -> "ActivationReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if self._pf is not None:
                self._pf.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def as_dataset(self):
        """A torch IterableDataset over this reader (DataLoader workers each take a share of the files)."""
        from vaultsh.reader.dataset import ActivationDataset

        return ActivationDataset(reader=self)
