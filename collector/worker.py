"""The collection loop: batches -> forward -> hooks -> megabatches -> upload -> commit.

One worker is one process (or one `Worker(...).run()`, which `run_worker` wraps)
that handles machine index `worker` of `num_runs`. It is restartable: it resumes after its last
committed megabatch, and names are deterministic, so a retried or resumed
upload overwrites the same key instead of duplicating data.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from collector import provenance
from collector.generation import generations_jsonl, label_tensors
from collector.uploader import Uploader
from vaultsh import megabatch as mbf
from vaultsh.errors import ConfigError, UserError
from vaultsh.events import EventSink
from vaultsh.run import COMMIT_CHUNK, CommitRecord, FileRecord, Run, metadata_for
from vaultsh.stats import RunningStats
from vaultsh.store import Store, open_store

if TYPE_CHECKING:
    from collector.capture import ActivationCapture
    from collector.data import Batch
    from collector.generation import ChunkRunner

FORMAT_VERSION = 1
_MEMORY_EVERY_S = 2.0
_PROGRESS_EVERY_S = 0.25
MERGE_EVERY_S = 300.0  # per run: each of K workers merges every K * this


class StopFlag:
    """Set by signal handlers: first request stops after the megabatch in flight."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


@dataclass
class _Pending:
    """A megabatch being assembled: preallocated CPU tensors filled batch by batch."""

    index: int
    batch_start: int
    states: dict[str, Any]
    input_ids: Any
    mask: Any
    stats: dict[str, RunningStats]
    rows: int = 0
    seq_len: int = 0
    labels: dict[str, list] = field(default_factory=dict)  # label name -> one value per stored row
    generations: list[dict] = field(default_factory=list)  # generation mode: text records
    filled: int = 0
    tokens: int = 0
    batch_end: int = 0
    futures: list[Future] = field(default_factory=list)
    source: Any = None  # int64 [rows, 3] provenance (collector/provenance.py)
    segments: list = field(default_factory=list)  # packing: (row, position, source, document, offset)

    def buffer_for(self, hook: str, width: int, dtype, device):
        """The host buffer of `hook`'s states (pinned when copying from a GPU)."""
        buf = self.states.get(hook)
        if buf is None:
            import torch

            pin = str(device).startswith("cuda")
            buf = self.states[hook] = torch.empty((self.rows, self.seq_len, width), dtype=dtype, pin_memory=pin)
        return buf

    def stats_for(self, hook: str, width: int) -> RunningStats:
        st = self.stats.get(hook)
        if st is None:
            st = self.stats[hook] = RunningStats(width)
        return st


_ACTIVAULT_DATA = {
    "data_key",
    "n_batches",
    "seq_length",
    "batch_size",
    "seed",
    "skip_cache",
    "start_batch",
    "clean_added_tokens",
    "clean_default_system_prompt",
}


def config_fingerprint(cfg) -> dict:
    """The parts of a config that decide what is collected (resume must match them).

    Data fields beyond Activault's count only when set (runs made before they
    existed keep their fingerprint); inference settings only in generation mode.
    """
    dump = cfg.model_dump(mode="json")
    defaults = _data_defaults(cfg)
    data = {
        k: v for k, v in dump["data"].items() if k != "bucket_name" and (k in _ACTIVAULT_DATA or v != defaults.get(k))
    }
    out = {
        "model": {k: dump["model"].get(k) for k in ("name", "dtype")},
        "data": data,
        "hooks": dump["upload"]["hooks"],
        "batches_per_upload": dump["upload"]["batches_per_upload"],
        "num_runs": dump["num_runs"],
        "storage": {k: dump["storage"].get(k) for k in ("format", "dtype")},
    }
    inference = getattr(cfg, "inference", None)
    if inference is not None and inference.max_new_tokens > 0:
        out["inference"] = {
            k: v for k, v in dump["inference"].items() if k not in ("auto_find_batch_size", "batch_size")
        }
    return out


def _data_defaults(cfg) -> dict:
    """Default values of the data section's optional fields."""
    fields = type(cfg.data).model_fields
    out = {}
    for k, f in fields.items():
        if f.default_factory is not None:
            out[k] = f.default_factory()
        elif not f.is_required():
            out[k] = f.default
    return out


def _check_same_config(existing: dict, mine: dict, run_uri: str) -> None:
    old = existing.get("fingerprint")
    if old is None or old == mine:
        return
    diffs = []
    for section in sorted(set(old) | set(mine)):
        a, b = old.get(section), mine.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b:
            diffs.append(f"{section}: {a!r} -> {b!r}")
    raise ConfigError(
        f"{run_uri} was collected with a different config ({'; '.join(diffs)}); "
        "use a new run_name, or --force to continue anyway"
    )


class Worker:
    """Worker `worker` of a run: the loop's states are methods, the run state is fields.

    `run()` is its whole life: start (config checked, resume point found), load
    (model, hooks, data), then per batch capture -> flush a full megabatch ->
    commit what is uploaded, and finalize (leftovers, statistics, `done`).
    """

    t_start: float  # when run() began (`elapsed` counts from here)

    # -- set by _start: what is collected, and where -----------------------
    facts: Any  # the model's config facts (collector.config.read_model_facts)
    specs: list  # hook specs; [] in generation-only mode; _load expands module globs
    hooks: list[str]  # hook names, as directories
    store: Store
    layout: Run  # the run's keys and records in the store
    fingerprint: dict  # what decides what is collected (config_fingerprint)
    existing_cfg: dict | None  # the run's cfg.json, if it has one
    resumed: CommitRecord | None  # this worker's last commit, resumed after
    next_index: int  # the megabatch being filled (or next to fill)
    committed: int  # megabatches committed, resumed ones included
    batches_done: int  # batches of this worker in committed or pending megabatches
    tokens_total: int

    # -- set by _load: the model and the data ------------------------------
    model: Any
    tokenizer: Any
    device: Any
    storage_dtype: Any  # torch dtype of stored states
    capture: ActivationCapture | None  # None in generation-only mode
    stats: dict[str, RunningStats | None]  # per hook, cumulative over committed megabatches (None: width unknown yet)
    stream: Any  # this worker's batches (collector.reuse.open_batch_stream)
    runner: ChunkRunner  # forward/generate in chunks, halved on out-of-memory
    uploader: Uploader
    copier: DeviceCopier
    t_loop: float  # when the loop started (tokens/s counts from here)
    tokens_at_loop: int
    last_merge: float  # when statistics.json was last refreshed (staggered across workers)

    def __init__(
        self,
        cfg,
        worker: int = 0,
        sink: EventSink | None = None,
        stop: StopFlag | None = None,
        force: bool = False,
        store: Store | None = None,
    ):
        self.sink = sink or EventSink(worker)
        self.stop = stop if stop is not None else StopFlag()
        if not 0 <= worker < cfg.num_runs:
            raise ConfigError(f"--machine: {worker} is out of range for num_runs {cfg.num_runs} (0-{cfg.num_runs - 1})")
        self.cfg = cfg
        self.worker = worker
        self.force = force
        self._store_given = store
        self.B, self.T, self.bpu = cfg.data.batch_size, cfg.data.seq_length, cfg.upload.batches_per_upload
        self.fmt: str = cfg.storage.format
        self.inference: Any = getattr(cfg, "inference", None)
        self.max_new: int = self.inference.max_new_tokens if self.inference is not None else 0
        self.total_batches = worker_batches(cfg, worker)
        self.label_vocabs = {"category": list(cfg.data.categories)} if cfg.data.categories else {}
        # The loop's state.
        self.status = "complete"
        self.pending: _Pending | None = None  # the megabatch being filled
        self.inflight: list[_Pending] = []  # flushed, waiting for their uploads, committed in order
        self.chunk: list[CommitRecord] = []  # this worker's records since the last multiple of COMMIT_CHUNK
        self.metadata_written = False  # each hook's metadata.json, after the first batch
        self.stop_announced = False
        self.last_progress = self.last_memory = 0.0

    def run(self) -> dict:
        """Collect this worker's share of the run; returns the `done` event's fields."""
        import torch

        self.t_start = time.monotonic()
        if not self._start():
            return self._already_complete()
        self._load()
        try:
            with self.capture if self.capture is not None else contextlib.nullcontext(), torch.inference_mode():
                for batch in self.stream:
                    self.uploader.check()  # an upload that failed for good ends the run here
                    if self.pending is None:
                        if self._stop_requested():  # between megabatches
                            break
                        self.pending = self._new_megabatch(batch)
                    mb = self.pending
                    if self.max_new:
                        batch = self._generate(mb, batch)
                    self._capture(mb, batch)  # forward; each hook -> its statistics and host buffer
                    self._append(mb, batch)  # input ids, mask, labels, provenance; counters
                    self._announce_stop(mb)
                    if mb.filled == self.bpu:
                        self._flush(mb)  # queue every file of the megabatch; the next batch starts another
                        if self._stop_requested():
                            break
                    self._commit_ready(block=False)
                    self._report()  # progress, upload and memory events, now and then
                self._flush_last()  # a short last megabatch (dropped in format pt)
            self._commit_ready(block=True)
            self._close_uploads()
        except BaseException as exc:
            self._fail(exc)  # `error` and `done` events; the exception goes on
            raise
        return self._finalize()  # leftovers, statistics.json, `done`

    # -- start and load ----------------------------------------------------
    def _start(self) -> bool:
        """Check the config against the model's and the run's, say `start`, find where to resume.

        False when this worker's share is already committed.
        """
        from collector.config import read_model_facts, validate_against_model

        cfg = self.cfg
        # Validate against the model's config before loading any weights.
        self.facts = read_model_facts(cfg.model)
        specs = validate_against_model(cfg, self.facts)
        save_acts = self.inference.save_activations if self.inference is not None else True
        self.specs = specs if save_acts else []  # generation only: the text is stored, no activations
        self.hooks = [s.name for s in self.specs]
        self.store = self._store_given if self._store_given is not None else open_store(cfg.storage.uri)
        self.layout = Run(self.store, cfg.run_name)
        run_uri = self.store.child_uri(cfg.run_name)
        self.fingerprint = config_fingerprint(cfg)
        self.existing_cfg = self.layout.read_cfg() if self.store.exists(self.layout.cfg_key) else None
        if self.existing_cfg is not None and not self.force:
            _check_same_config(self.existing_cfg, self.fingerprint, run_uri)

        self.sink.emit(
            "start",
            run=cfg.run_name,
            model=cfg.model.name,
            hooks=self.hooks,
            store=run_uri,
            n_batches=self.total_batches,
            batches_per_upload=self.bpu,
            pid=os.getpid(),
            format=self.fmt,
        )
        for message in cfg.warnings:  # e.g. a dataset_config tokenizer that is not the model's
            self.sink.emit("warning", message=message)

        # Resume after the last committed megabatch of this worker.
        commits = self.layout.iter_commits(worker=self.worker)
        self.resumed = commits[-1] if commits else None
        self.next_index = commits[-1].index + 1 if commits else 0
        self.committed = len(commits)
        self.batches_done = sum(len(range(c.batch_start, c.batch_end, cfg.num_runs)) for c in commits)
        self.tokens_total = sum(c.tokens for c in commits)
        if commits:
            self.sink.emit("resume", from_megabatch=self.next_index, from_batch=self.batches_done)
        return self.batches_done < self.total_batches

    def _already_complete(self) -> dict:
        self._clean_leftovers()
        return self._done("complete", 0.0, already_complete=True)

    def _load(self) -> None:
        """The model, each hook's place in it, resumed statistics, the data stream, cfg.json, the uploader."""
        import torch

        from collector.capture import ActivationCapture, expand_module_globs
        from collector.generation import ChunkRunner
        from collector.model import load_model_and_tokenizer, loaded_summary
        from collector.reuse import open_batch_stream

        cfg, T = self.cfg, self.T
        self.sink.emit("loading", what="model", detail=cfg.model.name)
        self.model, self.tokenizer, self.device = load_model_and_tokenizer(cfg.model)
        self.storage_dtype = _storage_dtype(cfg, self.model)
        self.capture = None
        if (
            self.specs
        ):  # where each hook is in this model; a site the family lacks is a config error, before anything is stored
            self.specs = expand_module_globs(self.model, self.specs)
            self.hooks = [s.name for s in self.specs]
            self.capture = ActivationCapture(self.model, self.specs).resolve()
            for probe in self.capture.probes:
                if probe.spec.site == "attn.hook_pattern":
                    per_token = (probe.heads or 1) * T * torch.empty((), dtype=self.storage_dtype).element_size()
                    self.sink.emit(
                        "warning",
                        message=(
                            f"{probe.spec.name}: attention patterns are {probe.heads} heads x {T} key positions per token, "
                            f"{per_token:,} bytes per token ({per_token * T:,} per sequence)"
                        ),
                    )
        self.stats = {h: self._resumed_stats(h) for h in self.hooks}
        self.sink.emit(
            "loading",
            what="data",
            detail=cfg.data.data_key or cfg.data.path or cfg.data.mix or "datasets",
            **loaded_summary(self.model, self.device),
        )
        # Resume exactly after the last committed batch: commit records hold global batch indices.
        data_spec = cfg.data.model_copy(update={"start_batch": self.resumed.batch_end}) if self.resumed else cfg.data
        self.stream = open_batch_stream(cfg, data_spec, self.tokenizer, self.worker, self.max_new)
        self.runner = ChunkRunner(self.B, bool(self.inference and self.inference.auto_find_batch_size), self._on_halve)
        if self.existing_cfg is None or self.force:
            self.layout.write_cfg(self._cfg_json())
        self.uploader = Uploader(
            threads=cfg.upload.upload_workers,
            max_pending=cfg.upload.max_queued_megabatches * (len(self.hooks) + 1),
            on_retry=self._on_retry,
        )
        self.copier = DeviceCopier(self.device)
        self.t_loop = time.monotonic()
        self.tokens_at_loop = self.tokens_total
        # Statistics merged while the run grows: about one merge every MERGE_EVERY_S across all workers.
        self.last_merge = time.monotonic() - MERGE_EVERY_S * self.worker

    def _resumed_stats(self, hook: str) -> RunningStats | None:
        """`hook`'s statistics of the megabatches resumed after (None: created with the hook's width at the first flush)."""
        if self.resumed is None:
            return None
        index = self.resumed.index
        stats = self.layout.read_partial_stats(self.worker, hook, index)
        if stats is None:
            key = self.layout.partial_stats_key(self.worker, hook, index)
            raise UserError(
                f"{self.store.child_uri(key)} is missing: statistics of committed megabatch {index} cannot be resumed"
            )
        return stats

    def _cfg_json(self) -> dict:
        cfg, facts, tokenizer = self.cfg, self.facts, self.tokenizer
        return {
            "format_version": FORMAT_VERSION,
            "run_name": cfg.run_name,
            "num_runs": cfg.num_runs,
            "model_name": cfg.model.name,
            "config": cfg.model_dump(mode="json"),
            "fingerprint": self.fingerprint,
            "model": {
                "d_model": facts.d_model,
                "n_layers": facts.n_layers,
                "max_context": facts.max_context,
                "model_type": facts.model_type,
                "vocab_size": facts.vocab_size,
            },
            "tokenizer": {
                "source": cfg.model.name,
                "class": type(tokenizer).__name__,
                "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id,
            },
            "hooks": {s.name: {"site": s.site, "layer": s.layer} for s in self.specs},
            "storage_dtype": str(self.storage_dtype).replace("torch.", ""),
            "created": datetime.now(timezone.utc).isoformat(),
        }

    def _on_halve(self, old: int, new: int) -> None:
        self.sink.emit("warning", message=f"out of memory with a forward batch of {old}: continuing with {new}")

    def _on_retry(self, label: str, attempt: int, exc: BaseException) -> None:
        self.sink.emit("warning", message=f"retrying upload of {label} (attempt {attempt}): {exc}")

    # -- batch and capture -------------------------------------------------
    def _stop_requested(self) -> bool:
        """Whether a stop was requested (asked between megabatches); if so the run ends `stopped`."""
        stopping = bool(self.stop)
        if stopping:
            self.status = "stopped"
        return stopping

    def _new_megabatch(self, batch: Batch) -> _Pending:
        """A megabatch to fill from `batch` on; each hook's buffer is allocated by its first batch (hooks differ in width)."""
        import torch

        rows = self.B * self.bpu
        return _Pending(
            index=self.next_index,
            batch_start=batch.index,
            states={},
            rows=rows,
            seq_len=self.T,
            input_ids=torch.zeros((rows, self.T), dtype=torch.int64),
            mask=torch.zeros((rows, self.T), dtype=torch.bool),
            stats={},
            source=provenance.empty_source(rows),
        )

    def _generate(self, mb: _Pending, batch: Batch) -> Batch:
        """Generation mode: extend `batch` with the model's continuation; the texts go into `mb`."""
        from collector.generation import generate_batch

        capture, inference, stream = self.capture, self.inference, self.stream
        if capture is not None:
            capture.detach()  # generate() runs the whole model: no capture, no early stop
        batch, records = generate_batch(
            self.model,
            self.tokenizer,
            batch,
            max_new_tokens=self.max_new,
            seq_length=self.T,
            pad_id=stream.pad_id,
            eos_id=stream.eos_id,
            special_ids=stream.encoder.special_ids,
            clean_added_tokens=self.cfg.data.clean_added_tokens,
            runner=self.runner,
            device=self.device,
            seed=self.cfg.data.seed,
            do_sample=inference.do_sample,
            temperature=inference.temperature,
            top_p=inference.top_p,
        )
        mb.generations.extend(records)
        if capture is not None:
            capture.attach()
        return batch

    def _capture(self, mb: _Pending, batch: Batch) -> None:
        """Forward `batch`; each hook's output goes into `mb`'s statistics and (off the device) its buffer."""
        from collector.generation import forward_chunks  # looked up per call: benchmarks/gpu_probe.py wraps it

        capture = self.capture
        if capture is None:
            return
        row, nb = mb.filled * self.B, batch.input_ids.shape[0]
        outputs = forward_chunks(capture, self.runner, batch.input_ids, batch.attention_mask, self.device)
        if not self.metadata_written:  # the self-check, then each hook's metadata with its width
            self.metadata_written = True
            self._write_hook_metadata(capture, outputs, _self_check(capture, batch, self.device))
        mask_dev = batch.mask.to(self.device)
        for h in self.hooks:
            out = outputs[h]
            mb.stats_for(h, out.shape[-1]).update(out.reshape(-1, out.shape[-1]), mask_dev.reshape(-1))
            self.copier.copy(mb.buffer_for(h, out.shape[-1], self.storage_dtype, self.device)[row : row + nb], out)

    def _write_hook_metadata(self, capture: ActivationCapture, outputs: dict, check: dict | None) -> None:
        """Each hook's metadata.json, once its width is known from the first batch."""
        from collector.capture import hook_description

        for probe in capture.probes:
            name = probe.spec.name
            if self.store.exists(self.layout.metadata_key(name)):
                continue
            width = int(outputs[name].shape[-1])
            meta = metadata_for(
                batch_size=self.B,
                sequence_length=self.T,
                dtype=self.model.dtype,
                d_in=width,
                batches_per_file=self.bpu,
                hook=name,
                site=probe.spec.site,
                layer=probe.spec.layer,
                format=self.fmt,
                storage_dtype=self.storage_dtype,
                model=self.cfg.model.name,
            )
            meta.update(hook_description(probe, width))
            meta.update(provenance.hook_metadata(self.stream, self.tokenizer))
            if check is not None and probe.spec.is_transformerlens:
                meta["self_check"] = check
            self.layout.write_metadata(name, meta)

    def _append(self, mb: _Pending, batch: Batch) -> None:
        """`batch`'s input ids, mask, labels and provenance into `mb`; the counters."""
        row, nb = mb.filled * self.B, batch.input_ids.shape[0]
        for name, vals in batch.labels.items():
            mb.labels.setdefault(name, [None] * row).extend(vals)
        mb.input_ids[row : row + nb] = batch.input_ids
        mb.mask[row : row + nb] = batch.mask
        provenance.record_batch(mb.source, mb.segments, row, batch)
        mb.filled += 1
        mb.tokens += int(batch.n_tokens)
        mb.batch_end = batch.index + 1
        self.batches_done += 1
        self.tokens_total += int(batch.n_tokens)

    def _announce_stop(self, mb: _Pending) -> None:
        """`stopping`, once: said from the loop, never from the signal handler (the sink locks)."""
        if self.stop and not self.stop_announced:
            self.stop_announced = True
            self.sink.emit("stopping", megabatch=self.next_index, filled=mb.filled, batches_per_upload=self.bpu)

    # -- write -------------------------------------------------------------
    def _flush(self, mb: _Pending) -> None:
        """Queue the upload of every hook file of `mb`, plus the stats snapshot; the next batch starts a new megabatch."""
        self.copier.sync()
        n = mb.filled * self.B
        ids, msk = mb.input_ids[:n], mb.mask[:n]
        src, seg = mb.source[:n], provenance.segments_tensor(mb.segments, n)
        labels, vocabs = label_tensors(
            {k: (v + [None] * (n - len(v)))[:n] for k, v in mb.labels.items()}, self.label_vocabs
        )
        if mb.generations:
            gkey = self.layout.generations_key(self.worker, mb.index)
            blob = generations_jsonl(mb.generations)
            mb.futures.append(
                self.uploader.submit(gkey, len(blob), functools.partial(self.store.put_bytes, gkey, blob))
            )
        for h in self.hooks:
            stats = self.stats[h]
            if stats is None:
                stats = self.stats[h] = RunningStats(mb.stats[h].d)
            stats.merge_(mb.stats[h])
            snapshot = stats.to_bytes()
            key = self.layout.megabatch_key(h, self.worker, mb.index, self.fmt)
            states = mb.states[h][:n]
            meta = mbf.file_metadata(
                self.cfg.run_name, h, self.cfg.model.name, self.worker, mb.index, mb.batch_start, mb.batch_end
            )
            if vocabs:
                meta["label_values"] = json.dumps(vocabs, ensure_ascii=False)
            nbytes = states.numel() * states.element_size()
            mb.futures.append(
                self.uploader.submit(
                    key,
                    nbytes,
                    functools.partial(self._write_file, h, key, states, ids, msk, meta, mb.index, labels, (src, seg)),
                )
            )
            pkey = self.layout.partial_stats_key(self.worker, h, mb.index)
            mb.futures.append(
                self.uploader.submit(pkey, len(snapshot), functools.partial(self.store.put_bytes, pkey, snapshot))
            )
        self.inflight.append(mb)
        self.next_index += 1
        self.pending = None

    def _write_file(
        self,
        hook: str,
        key: str,
        states: Any,
        ids: Any,
        mask: Any,
        meta: dict,
        index: int,
        labels: dict | None,
        source: tuple,
    ) -> FileRecord:
        """One hook's megabatch file (an upload job, run on the uploader's threads); its record, with its sha256."""
        hasher = _HashingStore(self.store)
        size = mbf.write_megabatch(
            hasher,
            key,
            states,
            ids,
            mask,
            labels=labels or None,
            metadata=meta,
            fmt=self.fmt,
            source=source[0],
            source_segments=source[1],
        )
        return FileRecord(
            hook=hook,
            key=key,
            size=size,
            sha256=hasher.digest,
            n_sequences=int(states.shape[0]),
            n_tokens=int(mask.sum()),
            worker=self.worker,
            index=index,
        )

    def _flush_last(self) -> None:
        """After the last batch: flush a partly filled megabatch (format pt drops it: Activault needs full files)."""
        mb = self.pending
        if mb is not None and mb.filled:
            if self.fmt == "pt" and mb.filled < self.bpu:
                self.sink.emit(
                    "warning",
                    message=(
                        f"format pt: dropping the last {mb.filled} batch(es) ({mb.batch_start}-{mb.batch_end - 1}); "
                        "Activault readers need every file to hold batches_per_upload batches"
                    ),
                )
                self.batches_done -= mb.filled
                self.tokens_total -= mb.tokens
            else:
                self._flush(mb)
            self.pending = None

    def _report(self) -> None:
        """`progress` and `upload` every _PROGRESS_EVERY_S, `memory` every _MEMORY_EVERY_S."""
        now = time.monotonic()
        if now - self.last_progress >= _PROGRESS_EVERY_S:
            self.last_progress = now
            elapsed = now - self.t_loop
            self.sink.emit(
                "progress",
                batches=self.batches_done,
                total_batches=self.total_batches,
                tokens=self.tokens_total,
                tokens_per_s=(self.tokens_total - self.tokens_at_loop) / elapsed if elapsed > 0 else 0.0,
                megabatch=self.next_index,
            )
            self._report_uploads()
        if now - self.last_memory >= _MEMORY_EVERY_S:
            self.last_memory = now
            self.sink.emit("memory", **memory_snapshot(self.device))

    def _report_uploads(self) -> None:
        self.sink.emit("upload", **self.uploader.stats.event_fields())

    def _close_uploads(self) -> None:
        self.uploader.close(wait=True)
        self._report_uploads()

    # -- commit ------------------------------------------------------------
    def _commit_ready(self, block: bool) -> None:
        """Commit flushed megabatches, in order, whose files are all stored (with `block`, wait for them all)."""
        while self.inflight and (block or all(f.done() for f in self.inflight[0].futures)):
            self._commit(self.inflight.pop(0))

    def _commit(self, mb: _Pending) -> None:
        results = [f.result() for f in mb.futures]  # raises the upload's error
        files = {r.hook: r for r in results if isinstance(r, FileRecord)}
        record = CommitRecord(
            worker=self.worker,
            index=mb.index,
            batch_start=mb.batch_start,
            batch_end=mb.batch_end,
            files=files,
            created=datetime.now(timezone.utc).isoformat(),
            tokens=mb.tokens,
        )
        self.layout.commit(record)
        chunk_commits(self.layout, record, self.chunk, self.sink)
        self.committed += 1
        self._delete_old_partials(mb.index)
        self._maybe_merge_statistics()
        self.sink.emit(
            "committed",
            megabatch=mb.index,
            batch_start=mb.batch_start,
            batch_end=mb.batch_end,
            tokens=mb.tokens,
            bytes=sum(f.size for f in files.values()),
        )

    def _delete_old_partials(self, index: int) -> None:
        """Keep only the stats snapshot of the last committed megabatch."""
        if index == 0:
            return
        for h in self.hooks:
            self.store.delete(self.layout.partial_stats_key(self.worker, h, index - 1))

    def _maybe_merge_statistics(self) -> None:
        """Refresh {hook}/statistics.json now and then, so a growing run is usable (finalize makes it exact)."""
        now = time.monotonic()
        if now - self.last_merge < MERGE_EVERY_S * self.cfg.num_runs:
            return
        self.last_merge = now
        self._write_statistics()

    # -- finalize ----------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        """The loop raised: stop the uploads, say `error` and `done` (a second Ctrl-C is `stopped`)."""
        self.status = "failed"
        self.uploader.close(wait=False)
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, KeyboardInterrupt):
            self.status, message = "stopped", "interrupted: uncommitted megabatches were not committed"
        self.sink.emit("error", message=message)
        self._done(self.status, time.monotonic() - self.t_start)

    def _finalize(self) -> dict:
        if self.status == "complete":
            self._clean_leftovers()
        self._write_statistics()
        return self._done(self.status, time.monotonic() - self.t_start)

    def _done(self, status: str, elapsed: float, **more: Any) -> dict:
        """Say `done` with this worker's totals; returns the event's fields (what `run` returns)."""
        result = dict(
            status=status,
            batches=self.batches_done,
            tokens=self.tokens_total,
            megabatches=self.committed,
            elapsed=elapsed,
            **more,
        )
        self.sink.emit("done", **result)
        return result

    def _clean_leftovers(self) -> None:
        """After a complete run: delete this worker's files no commit names (from a crash or a changed config).

        Only keys of this worker past its last commit (and statistics snapshots
        older than it) go: Activault's reader loads every file under a hook directory.
        """
        from vaultsh.run import parse_megabatch_name

        run, worker = self.layout, self.worker
        done = run.committed_indices(worker)
        last = done[-1] if done else -1
        for h in self.hooks:
            for o in run.store.iter_objects(run.worker_files_prefix(h, worker)):
                parsed = parse_megabatch_name(o.name)
                if parsed and parsed[0] == worker and parsed[1] > last:
                    run.store.delete(o.key)
        for w, _h, i, key in run.list_partial_stats(worker=worker):
            if w == worker and i != last:
                run.store.delete(key)

    def _write_statistics(self) -> None:
        """Merge every worker's latest committed stats snapshot into {hook}/statistics.json."""
        for h in self.hooks:
            merged = self.layout.merge_partial_stats(h, cumulative=True)
            if merged is not None:
                self.layout.write_statistics(h, merged)


def run_worker(
    cfg, worker: int = 0, sink: EventSink | None = None, stop: StopFlag | None = None, force: bool = False, store=None
) -> dict:
    """Collect worker `worker`'s share of the run; returns the `done` event's fields."""
    return Worker(cfg, worker, sink=sink, stop=stop, force=force, store=store).run()


# -- helpers -----------------------------------------------------------------


def worker_batches(cfg, worker: int) -> int:
    """How many global batches in [start_batch, n_batches) belong to this worker."""
    k, start, end = cfg.num_runs, cfg.data.start_batch, cfg.data.n_batches
    return len(range(start + (worker - start) % k, end, k)) if end > start else 0


def _storage_dtype(cfg, model):
    import torch

    name = cfg.storage.dtype or cfg.model.dtype
    if name == "auto":
        return model.dtype
    return getattr(torch, name)


def _self_check(capture, batch, device) -> dict | None:
    """The residual identity on the first batch's first sequence (hooks detached meanwhile: one capture at a time)."""
    from collector.capture import self_check

    rows = slice(0, 1)
    inputs = {"input_ids": batch.input_ids[rows].to(device), "attention_mask": batch.attention_mask[rows].to(device)}
    capture.detach()
    try:
        return self_check(capture.model, capture.specs, inputs)
    finally:
        capture.attach()


class DeviceCopier:
    """Copies activations off the GPU on a side stream into pinned buffers without stalling."""

    def __init__(self, device: str):
        import torch

        self.cuda = str(device).startswith("cuda")
        self.stream = torch.cuda.Stream() if self.cuda else None
        self._events: list = []

    def copy(self, dest, src) -> None:
        import torch

        stream = self.stream  # None off CUDA
        if stream is None:
            dest.copy_(src)
            return
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            dest.copy_(src, non_blocking=True)
            src.record_stream(stream)
            ev = torch.cuda.Event()
            ev.record(stream)
            self._events.append(ev)

    def sync(self) -> None:
        for ev in self._events:
            ev.synchronize()
        self._events.clear()


class _HashingStore:
    """Wraps a store so put_stream also computes the sha256 of what is written."""

    def __init__(self, store):
        self._store = store
        self.digest: str | None = None

    def put_stream(self, key: str, writer) -> None:
        h = hashlib.sha256()

        class _Tee:
            def __init__(self, f):
                self.f = f

            def write(self, b):
                h.update(b)
                return self.f.write(b)

            def __getattr__(self, name):
                return getattr(self.f, name)

        self._store.put_stream(key, lambda f: writer(_Tee(f)))
        self.digest = h.hexdigest()

    def __getattr__(self, name):
        return getattr(self._store, name)


def memory_snapshot(device: str) -> dict:
    """RSS of this process and its children, GPU memory, system memory (bytes)."""
    import psutil

    proc = psutil.Process()
    children = 0
    for child in proc.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.Error:
            pass
    vm = psutil.virtual_memory()
    snap = {
        "rss": proc.memory_info().rss,
        "children_rss": children,
        "system_used": vm.total - vm.available,
        "system_total": vm.total,
        "gpu_allocated": None,
        "gpu_reserved": None,
    }
    if str(device).startswith("cuda"):
        import torch

        snap["gpu_allocated"] = torch.cuda.memory_allocated()
        snap["gpu_reserved"] = torch.cuda.memory_reserved()
    return snap


def chunk_commits(run: Run, record: CommitRecord, chunk: list[CommitRecord], sink) -> None:
    """Collect consecutive records; at each COMMIT_CHUNK-th, store them as one chunk (readers then need
    one GET for 100 records). A worker that resumed mid-chunk skips that chunk; a failed write only
    costs readers the shortcut, so it is a warning."""
    if record.index % COMMIT_CHUNK == 0 or (chunk and chunk[-1].index + 1 != record.index):
        chunk.clear()
    if record.index % COMMIT_CHUNK == 0 or chunk:
        chunk.append(record)
    if len(chunk) == COMMIT_CHUNK:
        try:
            run.write_commit_chunk(list(chunk))
        except UserError as exc:
            sink.emit("warning", message=f"could not store commit chunk {record.index}: {exc}")
        chunk.clear()


def install_signal_handlers(stop: StopFlag, on_first: Callable[[], None] | None = None) -> None:
    """First SIGINT/SIGTERM: finish the megabatch in flight, commit, exit. Second: exit at once."""

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.set()
        if on_first:
            on_first()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
