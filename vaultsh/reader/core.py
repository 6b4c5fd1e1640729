"""ActivationReader: stream the committed megabatches of a hook directory as tensors."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import warnings
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import torch

from vaultsh.errors import FormatError, NotFoundError, UserError
from vaultsh.reader import decode as dec
from vaultsh.reader.fetch import Closed, StoreSpec, TransientExhausted, resolve
from vaultsh.reader.filters import AlignmentError, TokenFilter
from vaultsh.reader.prefetch import FetchOptions, FileTask, Item, Part, Prefetcher
from vaultsh.reader.progress import Counters, ReaderStats
from vaultsh.reader.stage import NORMALIZE_MODES, Norm, Staged, StagedPart, Stager, normalizer, parse_dtype, seed_of
from vaultsh.reader.tokens import Batcher, Columns, Mixer
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
        self.given = self.uri  # as the caller named it, for messages
        self.shape = dec.metadata_shape(md)
        self.dtype = dec.metadata_dtype(md)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["store"] = None  # reopened from the spec in the new process
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.store = self.spec.open()


def _hook_dirs(run: str | os.PathLike, hooks: Sequence[str]) -> list[str]:
    """The hook directories RUN/HOOK of one run (an s3:// URI, a local path, or a run name in `store=`)."""
    base = os.fspath(run).rstrip("/")
    if not os.path.isdir(base) or "://" in base:
        return [f"{base}/{h}" for h in hooks]
    out = []
    for h in hooks:
        path = os.path.join(base, h)
        if not os.path.isdir(path):
            there = sorted(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, "metadata.json")))
            raise UserError(
                f"{base}: no hook {h!r} in this run" + (f"; hooks there: {', '.join(there[:20])}" if there else "")
            )
        out.append(path)
    return out


def _align_key(f: FileRecord) -> tuple:
    """What names the same megabatch in every hook directory (and in runs made over the same data)."""
    return ("mb", f.worker, f.index) if f.worker is not None and f.index is not None else ("name", f.name)


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(x.numel() * x.element_size() for x in tensors)


def _whole(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise UserError(f"{name}={v!r} is not allowed: use a whole number >= {lo}")
    return v


class ActivationReader:
    """Stream the committed megabatches of one hook directory (or several) as tensors.

    source: a hook directory: `s3://bucket/run/hook`, a local path
        `vault/run/hook`, or `run/hook` inside `store=`; or a list of them
        (same T and D), read one after the other in the order given.
        With `hooks=`: a run (`s3://bucket/run`, `vault/run`, or `run` inside
        `store=`).
    hooks: aligned reads of several hooks of one run: each batch's `states`
        is a dict hook -> tensor of the same tokens in the same order (one
        file order, one token permutation, one fetch per megabatch for all
        hooks); `input_ids` must agree across the hooks' files, else an
        AlignmentError names the file and position. `ActivationReader.zip`
        does the same across runs.
    device: where tensors are delivered ("cpu", "cuda", "cuda:1", ...). For
        CUDA, download buffers are pinned and copies are non-blocking on a side
        stream (`pin_memory=False` turns pinning off).
    dtype: convert `states` to this floating dtype (default: as stored).
    return_ids / return_mask / return_labels / return_file: include
        `input_ids` / `mask` / `labels` (a dict) / `file` (its URI) and
        `file_index` in each megabatch dict.
    return_source: include `source`, where each sequence came from: [N, 3]
        int64 (source index into metadata.json's `sources`, document or row
        index, token offset in the document; -1 where unknown); in token mode
        [batch, 4] per token, the 4th column its position in the sequence.
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
    normalize: None ("none"), "center" (x - mean), "unit_norm" (x / mean norm:
        mean token norm 1), "mean_norm_sqrt_d" (mean token norm sqrt(d_model),
        SAELens' `expected_average_only_in`), "center_unit_norm" ((x - mean) / sqrt(sum var)) or
        "standardize" ((x - mean) / std per feature), with the run's
        statistics.json (or `stats=`, a RunningStats); `normalization_factor`
        is the scale applied.
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
    skip_positions / exclude_token_ids / max_norm_factor: token filters,
        applied alike to every hook: drop positions 0..k-1 of each sequence,
        drop these token ids, drop tokens whose norm in `norm_hook` (default:
        the first hook) is above max_norm_factor x its median norm (from what
        `vaultsh norms` wrote for the hook when there is one, else the mean
        norm of its statistics.json). Token mode drops them; megabatch mode
        clears them in `mask`. `stats.dropped` counts what each filter dropped.
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
        hooks: Sequence[str] | str | None = None,
        store=None,
        device: str | torch.device = "cpu",
        dtype=None,
        return_ids: bool = True,
        return_mask: bool = True,
        return_labels: bool = False,
        return_file: bool = False,
        return_source: bool = False,
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
        skip_positions: int = 0,
        exclude_token_ids: Sequence[int] | None = None,
        max_norm_factor: float | None = None,
        norm_hook: str | None = None,
        _token_shuffle: bool = False,
        _zip: bool = False,
    ):
        if on_error not in ("raise", "skip"):
            raise UserError(f"on_error={on_error!r} is not allowed; use 'raise' or 'skip'")
        if verify not in ("size", "sha256"):
            raise UserError(f"verify={verify!r} is not allowed; use 'size' or 'sha256'")
        if normalize == "none":
            normalize = None
        if normalize is not None and normalize not in NORMALIZE_MODES:
            raise UserError(f"normalize={normalize!r} is not allowed; use one of {', '.join(NORMALIZE_MODES)} or None")
        for name, v, lo in (
            ("prefetch", prefetch, 1),
            ("connections", connections, 1),
            ("range_bytes", range_bytes, 1),
            ("stage_threads", stage_threads, 1),
            ("retries", retries, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("start", start, 0),
            ("skip_positions", skip_positions, 0),
        ):
            _whole(name, v, lo)
        if batch_size is not None:
            _whole("batch_size", batch_size, 1)
        if buffer_bytes is not None:
            _whole("buffer_bytes", buffer_bytes, 1)
        if shuffle_buffer and not tokens:
            raise UserError("shuffle_buffer mixes tokens across megabatches: it needs tokens=True")

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(
                f"device {str(device)!r} requested but CUDA is not available (torch.cuda.is_available() is False)"
            )
        want_pin = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self._pin = want_pin and torch.cuda.is_available()
        self.dtype = parse_dtype(dtype)
        self.return_ids, self.return_mask = bool(return_ids), bool(return_mask)
        self.return_labels, self.return_file = bool(return_labels), bool(return_file)
        self.return_source = bool(return_source)
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

        sources, self._layout = self._plan_sources(source, hooks, _zip)
        self._sources: list[_Source] = []
        for src in sources:
            spec, st, run_name, hook = resolve(src, store)
            try:
                s = _Source(spec, st, run_name, hook, Run(st, run_name).read_metadata(hook))
            except ValueError as exc:  # an invalid hook directory name
                raise UserError(f"{src!r}: {exc}") from None
            s.given = os.fspath(src)
            self._sources.append(s)
        self._groups: list[list[tuple[int, FileRecord]]] = []
        self.refresh()
        if self.start > len(self._groups):
            raise UserError(f"start={self.start} is past the end: {len(self._groups)} committed file(s)")
        if self._layout is None:
            shapes = {s.shape[1:] for s in self._sources if s.shape}
            if len(shapes) > 1:
                raise UserError(f"sources have different [T, D] in metadata.json: {sorted(shapes)}")
        else:
            seq = {s.shape[1] for s in self._sources if s.shape}
            if len(seq) > 1:
                raise UserError(
                    "aligned hooks must hold the same tokens, but their metadata.json sequence "
                    f"lengths differ: {sorted(seq)}"
                )
        self.median_norm: float | None = None  # of norm_hook, when max_norm_factor is set
        self._filter = self._token_filter(skip_positions, exclude_token_ids, max_norm_factor, norm_hook)

        self._norms: list[Norm] | None = None
        if normalize is not None:
            self._norms = [
                normalizer(stats if stats is not None else self._read_stats(i), normalize)
                for i in range(len(self._sources))
            ]

        self._counters = Counters(len(self._groups))
        self._pf: Prefetcher | None = None
        self._files_done = 0
        self._n_shards = self.world_size
        self._closed = False
        self._pid = os.getpid()

    # -- set-up helpers ------------------------------------------------------
    @staticmethod
    def _plan_sources(source, hooks, zipped: bool) -> tuple[list, list[list[tuple[str, int]]] | None]:
        """The hook directories to open and, for aligned reads, per run the (hook, source index) pairs."""
        if hooks is None:
            if zipped:
                raise UserError("ActivationReader.zip needs hooks=[...]: the hooks to read from each run")
            sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
            if not sources:
                raise UserError("no source given: pass a hook directory (s3://bucket/run/hook or a local path)")
            return sources, None
        hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if not hooks or not all(isinstance(h, str) and h for h in hooks):
            raise UserError(
                f"hooks={hooks!r}: give a list of hook names, e.g. ['blocks.3.hook_mlp_in', 'blocks.3.hook_mlp_out']"
            )
        if len(set(hooks)) != len(hooks):
            raise UserError(f"hooks={hooks!r} names a hook twice")
        runs = list(source) if zipped else [source]
        if not zipped and not isinstance(source, (str, os.PathLike)):
            raise UserError(
                "with hooks=, source is one run; to read the same tokens from several runs use "
                "ActivationReader.zip(run_a, run_b, hooks=[...])"
            )
        sources, layout = [], []
        for run in runs:
            dirs = _hook_dirs(run, hooks)
            layout.append([(h, len(sources) + j) for j, h in enumerate(hooks)])
            sources.extend(dirs)
        return sources, layout

    @classmethod
    def zip(cls, *runs, hooks: Sequence[str] | str, **kwargs) -> ActivationReader:
        """Read the same tokens from several runs (e.g. two models over the same data, same tokenizer).

        Each batch's `states` is a tuple with one dict hook -> tensor per run, in
        the order given; megabatches are matched by (worker, index) and their
        input_ids must be equal, else an AlignmentError names the first
        mismatch (file, sequence, position).
        """
        if len(runs) < 2:
            raise UserError("ActivationReader.zip needs at least two runs")
        return cls(list(runs), hooks=hooks, _zip=True, **kwargs)

    def refresh(self) -> None:
        """Re-list the committed files (new megabatches since construction); applies to the next pass."""
        per_source = []
        for s in self._sources:
            files = Run(s.store, s.run).committed_files(s.hook)
            if not files:
                raise UserError(self._nothing_message(s.given, s))
            per_source.append(files)
        if self._layout is None:
            self._groups = [[(i, f)] for i, files in enumerate(per_source) for f in files]
            return
        keyed = [{_align_key(f): f for f in files} for files in per_source]
        common = [k for k in (_align_key(f) for f in per_source[0]) if all(k in m for m in keyed[1:])]
        if not common:
            raise AlignmentError(
                "no megabatch is in every hook directory: "
                + ", ".join(f"{s.uri} has {len(m)}" for s, m in zip(self._sources, keyed))
            )
        extra = [(s, len(m) - len(common)) for s, m in zip(self._sources, keyed) if len(m) > len(common)]
        if extra:
            left_out = ", ".join(f"{n} of {s.uri}" for s, n in extra)
            msg = f"aligned read: reading the {len(common)} megabatch(es) every source has; left out: {left_out}"
            logger.warning(msg)
            warnings.warn(msg, stacklevel=3)
        self._groups = [[(i, keyed[i][k]) for i in range(len(self._sources))] for k in common]

    def _token_filter(self, skip_positions, exclude_token_ids, max_norm_factor, norm_hook) -> TokenFilter:
        exclude = None
        if exclude_token_ids is not None:
            ids = list(exclude_token_ids)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
                raise UserError(f"exclude_token_ids={exclude_token_ids!r}: give whole token ids >= 0")
            exclude = torch.tensor(ids, dtype=torch.int64)
        f = TokenFilter(int(skip_positions), exclude)
        if max_norm_factor is None:
            if norm_hook is not None:
                raise UserError("norm_hook names the hook for max_norm_factor; give max_norm_factor too")
            return f
        if (
            isinstance(max_norm_factor, bool)
            or not isinstance(max_norm_factor, (int, float))
            or not max_norm_factor > 0
        ):
            raise UserError(f"max_norm_factor={max_norm_factor!r}: give a positive number (e.g. 10)")
        names = [s.hook for s in self._sources]
        ref = names[0] if norm_hook is None else norm_hook
        if ref not in names:
            raise UserError(f"norm_hook={norm_hook!r} is not one of the hooks read: {', '.join(names)}")
        i = names.index(ref)
        f.norm_part = i if self._layout is not None else 0
        if self._layout is None and len(self._sources) > 1:
            raise UserError(
                "max_norm_factor with several sources read in turn is not supported: "
                "read them one at a time, or as aligned hooks with hooks=[...]"
            )
        self.median_norm = self._median_norm(i)
        f.max_norm = float(max_norm_factor) * self.median_norm
        return f

    def _median_norm(self, i: int) -> float:
        """The hook's median token norm from what `vaultsh norms` wrote, else the mean norm of its statistics.json."""
        s = self._sources[i]
        run = Run(s.store, s.run)
        for key in (run.outliers_key(s.hook), run.legacy_outliers_key(s.hook)):
            try:
                info = json.loads(s.store.get_bytes(key))
            except NotFoundError:
                continue
            except (ValueError, UnicodeDecodeError):
                logger.warning("%s is not valid JSON; using statistics.json's mean norm", s.store.child_uri(key))
                break
            med = info.get("median_norm") if isinstance(info, dict) else None
            if isinstance(med, (int, float)) and not isinstance(med, bool) and med > 0 and math.isfinite(med):
                return float(med)
            logger.warning("%s has no usable median_norm; using statistics.json's mean norm", s.store.child_uri(key))
            break
        stats = self._read_stats(i, why="max_norm_factor")
        if not stats.mean_norm > 0:
            raise UserError(f"max_norm_factor: {s.uri}statistics.json has no positive mean norm")
        return float(stats.mean_norm)

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

    def _read_stats(self, i: int, why: str | None = None) -> RunningStats:
        s = self._sources[i]
        why = why or f"normalize={self.normalize!r}"
        run = Run(s.store, s.run)
        where = f"{s.uri}statistics.json"
        try:
            stats = run.read_statistics(s.hook)
        except FormatError as exc:  # an Activault file without a count: use the committed token count
            if "count" not in str(exc):
                raise
            total = sum(f.n_tokens for g in self._groups for j, f in g if j == i) or 1
            stats = run.read_statistics(s.hook, count=total)
        if stats is None:
            raise UserError(f"{why} needs {where}, which does not exist")
        if stats.count == 0:
            raise UserError(f"{why}: {where} has no tokens counted")
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
        self._counters = Counters(len(self._groups))
        self._pid = os.getpid()

    def __repr__(self) -> str:
        srcs = ", ".join(s.uri for s in self._sources)
        return f"ActivationReader({srcs!r}, files={len(self._groups)}, device={str(self.device)!r})"

    # -- public knobs ----------------------------------------------------------
    def shard(self, rank: int, world_size: int) -> ActivationReader:
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
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= len(self._groups):
            raise UserError(f"file index {index!r} is out of range (0..{len(self._groups)})")
        self.start = index

    @property
    def file_index(self) -> int:
        """Where to resume: `start` plus the files finished in this pass, times the shard count.

        Exact for one reader; with shards it assumes they move in step. In
        token mode a file counts once its tokens entered the batcher (or the
        mixing buffer); tokens still buffered there are not replayed on resume.
        """
        return min(len(self._groups), self.start + self._files_done * self._n_shards)

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

    def hook_metadata(self, hook: str | None = None) -> dict | None:
        """metadata.json of `hook` (one of `hooks`; for zip, the first run's), or of the first source."""
        if hook is None:
            return self.metadata
        for s in self._sources:
            if s.hook == hook:
                return s.metadata
        raise UserError(f"hook {hook!r} is not read here (hooks: {', '.join(self.hooks)})")

    @property
    def files(self) -> list[FileRecord]:
        """Every committed file (aligned reads: of the first hook), in read order (before `start` and sharding)."""
        return [g[0][1] for g in self._ordered()]

    @property
    def hooks(self) -> list[str]:
        """The hooks read (aligned reads: in the order of each batch's states dict)."""
        return [s.hook for s in self._sources] if self._layout is None else [h for h, _ in self._layout[0]]

    @property
    def normalization_factor(self):
        """The scale applied by `normalize` (y = (x - shift) * factor): a float (or a per-feature tensor for
        "standardize"); a dict hook -> factor for aligned reads (a tuple of them for zip); None without."""
        if self._norms is None:
            return None
        return self._shape([scale for _, scale in self._norms])

    # -- ordering and sharding -------------------------------------------------
    def _shape(self, per_source: list):
        """Per-source values -> what a batch holds: one value, a dict by hook, or (zip) a tuple of dicts."""
        if self._layout is None:
            return per_source[0]
        runs = tuple({h: per_source[i] for h, i in run} for run in self._layout)
        return runs if len(runs) > 1 else runs[0]

    def _ordered(self) -> list[list[tuple[int, FileRecord]]]:
        recs = list(self._groups)
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
            parts = [
                Part(i, f.key, self._sources[i].store.child_uri(f.key), f.size, f.sha256, f.n_sequences)
                for i, f in ordered[pos]
            ]
            tasks.append(FileTask(pos, parts))
        return tasks, n

    # -- iteration -------------------------------------------------------------
    def _stage(self, stager: Stager, buf: torch.Tensor, task: FileTask) -> Staged:
        parts = []
        for p in task.parts:
            src = self._sources[p.source]
            view = buf if len(task.parts) == 1 else buf[p.offset : p.offset + p.size]
            if self.verify == "sha256" and p.sha256:
                dec.check_sha256(view.numpy().data.cast("B"), p.sha256, p.uri)
            d = dec.decode(view, p.uri, labels=self.return_labels and not self.tokens)
            dec.check(d, p.uri, src.shape, src.dtype, p.n_sequences)
            parts.append(StagedPart(p.source, d.states, d.input_ids, d.mask, d.labels, p.uri, d.source))
        return stager.stage(parts, buf, task.pos)

    def __iter__(self) -> Generator[dict, None, None]:  # a generator: close() stops its downloads
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
            connections=self.connections,
            range_bytes=self.range_bytes,
            # a task of an aligned read stages one file per hook: as many threads per task keep the same
            # staging parallelism per file as a single-hook read
            stage_threads=min(8, self.stage_threads * len(self._sources)) if self._layout else self.stage_threads,
            retries=self.retries,
            retry_backoff=self.retry_backoff,
            pin=self._pin,
        )
        stager = Stager(
            self.device,
            self.dtype,
            self._norms,
            self.tokens,
            self.return_ids,
            self.return_mask,
            self.return_labels,
            seed_of(self.seed, self.epoch) if self._token_shuffle else None,
            self._filter,
            self.return_source,
        )
        self._counters.start()
        pf = self._pf = Prefetcher(
            tasks,
            [s.store for s in self._sources],
            opts,
            lambda buf, task: self._stage(stager, buf, task),
            self._counters,
        )
        try:
            batches = self._token_batches(pf, stager) if self.tokens else self._megabatches(pf, stager)
            yield from batches
        finally:
            if not pf.at_exit:  # else the exit hook closed it and this runs while the interpreter tears down
                self._counters.stop()
            pf.close()

    def _handle_error(self, item: Item) -> None:
        """on_error="skip": warn, log and count a bad file; otherwise (or a network error) raise."""
        exc = item.error
        assert exc is not None  # called for a failed item
        if isinstance(exc, Closed):
            raise UserError("the reader was closed during iteration")
        content = (
            isinstance(exc, (FormatError, NotFoundError))
            and not isinstance(exc, TransientExhausted)
            and not isinstance(exc, AlignmentError)
        )
        if self.on_error != "skip" or not content:
            raise exc
        reason = str(exc)
        self._counters.skipped(item.task.uri, reason)
        logger.warning("skipping %s: %s", item.task.uri, reason)
        # stacklevel: past _take, _megabatches/_token_batches and _iterate, to the code iterating the reader
        warnings.warn(f"vaultsh reader: skipping {item.task.uri}: {reason}", SkippedFileWarning, stacklevel=5)
        self._files_done += 1

    def _take(self, item: Item, stager: Stager) -> Staged | None:
        """A prefetched file's staged tensors, delivered to `stager` and counted; None for a file that failed
        (after _handle_error skipped it, or raised)."""
        if item.error is not None:
            self._handle_error(item)
            return None
        st = item.staged
        assert st is not None  # an item without an error is staged
        stager.deliver(st)
        self._counters.add(files_read=1, sequences=st.sequences, positions=st.positions)
        self._counters.drop(st.dropped)
        return st

    def _megabatches(self, pf: Prefetcher, stager: Stager):
        for item in pf.items():
            st = self._take(item, stager)
            if st is None:
                continue
            out: dict[str, Any] = {"states": self._shape(st.states)}
            if self.return_ids:
                out["input_ids"] = st.input_ids
            if self.return_mask:
                out["mask"] = st.mask
            if self.return_labels:
                out["labels"] = st.labels
            if self.return_source:
                out["source"] = st.source
            if self.return_file:
                out["file"], out["file_index"] = item.task.uri, item.task.pos
            self._counters.add(tokens=st.tokens, batches=1, states_bytes=_nbytes(st.states))
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

        extra = 2 if self.return_source else 1

        def emit(cols):  # cols: the states of each source, the token ids, then (return_source) provenance
            xs = cols[:-extra]
            out = {"states": self._shape(xs)}
            if self.return_ids:
                out["input_ids"] = cols[len(xs)]
            if self.return_source:
                out["source"] = cols[-1]
            self._counters.add(batches=1, tokens=cols[0].shape[0], states_bytes=_nbytes(xs))
            return out

        for item in pf.items():
            st = self._take(item, stager)
            if st is None:
                continue
            assert st.input_ids is not None  # token mode: the stager keeps the ids (aligned through the mixer)
            cols: Columns = [*st.states, st.input_ids]
            if self.return_source:
                assert st.source is not None  # asked for
                cols.append(st.source)
            pf.done(item)
            self._files_done += 1
            if self.shuffle_buffer:
                if mixer is None:  # sized from metadata.json's megabatch, else from this file
                    per_file = max((s.shape[0] * s.shape[1] for s in self._sources if s.shape), default=st.positions)
                    mixer = Mixer(self.shuffle_buffer * max(1, per_file), g)
                mixed = mixer.add(cols)
                if mixed is None:
                    continue
                cols = mixed
            yield from (emit(b) for b in batcher.push(cols))
        if mixer is not None:
            drained = mixer.drain()
            if drained is not None:
                yield from (emit(b) for b in batcher.push(drained))
        rest = batcher.flush()
        if rest is not None and not self.drop_last:
            yield emit(rest)

    # -- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        """Stop background downloads and drop buffers (the reader can't be iterated again)."""
        self._closed = True
        if self._pf is not None:
            self._pf.close()

    def __enter__(self) -> ActivationReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if self._pf is not None:
                self._pf.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def as_data_provider(self, epochs: int | None = None) -> Iterator:
        """An iterator (`next()`) of bare state batches for trainers that pull tensors, e.g. SAELens'
        `SAETrainer(data_provider=...)`: `[batch_size, D]` tensors (token mode), or per batch a dict
        hook -> tensor for aligned reads. Endless by default (each pass reshuffled with
        `set_epoch`); `epochs=N` stops after N passes.
        """
        if epochs is not None:
            _whole("epochs", epochs, 1)
        if not self.tokens:
            raise UserError(
                "as_data_provider() yields token batches: make the reader with tokens=True (and batch_size=...)"
            )

        def provider():
            e = self.epoch
            done = 0
            while epochs is None or done < epochs:
                self.set_epoch(e)
                got = False
                for batch in self:
                    got = True
                    yield batch["states"]
                if not got:
                    raise UserError("the reader delivered no tokens in a whole pass: nothing to train on")
                e += 1
                done += 1

        return provider()

    def as_dataset(self, states_only: bool = False):
        """A torch IterableDataset over this reader (DataLoader workers each take a share of the files);
        `states_only=True`: its items are the bare state batches, as `as_data_provider` gives them."""
        from vaultsh.reader.dataset import ActivationDataset

        return ActivationDataset(reader=self, states_only=states_only)
