"""The collection loop: batches -> forward -> hooks -> megabatches -> upload -> commit.

One worker is one process (or one call of `run_worker`) that handles machine
index `worker` of `num_runs`. It is restartable: it resumes after its last
committed megabatch, and names are deterministic, so a retried or resumed
upload overwrites the same key instead of duplicating data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from vaultsh.events import EventSink
from collector import provenance
from collector.generation import generations_jsonl, label_tensors
from collector.uploader import Uploader
from vaultsh import megabatch as mbf
from vaultsh.errors import ConfigError, UserError
from vaultsh.run import COMMIT_CHUNK, CommitRecord, FileRecord, Run, metadata_for
from vaultsh.stats import RunningStats
from vaultsh.store import open_store

FORMAT_VERSION = 1
_MEMORY_EVERY_S = 2.0
_PROGRESS_EVERY_S = 0.25
_MERGE_EVERY_S = 300.0  # per run: each of K workers merges every K * this


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


_ACTIVAULT_DATA = {"data_key", "n_batches", "seq_length", "batch_size", "seed", "skip_cache", "start_batch",
                   "clean_added_tokens", "clean_default_system_prompt"}


def config_fingerprint(cfg) -> dict:
    """The parts of a config that decide what is collected (resume must match them).

    Data fields beyond Activault's count only when set (runs made before they
    existed keep their fingerprint); inference settings only in generation mode.
    """
    dump = cfg.model_dump(mode="json")
    defaults = _data_defaults(cfg)
    data = {k: v for k, v in dump["data"].items()
            if k != "bucket_name" and (k in _ACTIVAULT_DATA or v != defaults.get(k))}
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
        out["inference"] = {k: v for k, v in dump["inference"].items() if k not in ("auto_find_batch_size", "batch_size")}
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


def run_worker(
    cfg,
    worker: int = 0,
    sink: EventSink | None = None,
    stop: StopFlag | None = None,
    force: bool = False,
    store=None,
) -> dict:
    """Collect worker `worker`'s share of the run; returns the `done` event's fields."""
    import torch

    from collector.config import read_model_facts, validate_against_model
    from collector.reuse import open_batch_stream
    from collector.capture import ActivationCapture, expand_module_globs, hook_description
    from collector.generation import ChunkRunner, forward_chunks, generate_batch
    from collector.model import load_model_and_tokenizer, loaded_summary

    sink = sink or EventSink(worker)
    stop = stop if stop is not None else StopFlag()
    if not 0 <= worker < cfg.num_runs:
        raise ConfigError(f"--machine: {worker} is out of range for num_runs {cfg.num_runs} (0-{cfg.num_runs - 1})")
    t_start = time.monotonic()

    # Validate against the model's config before loading any weights.
    facts = read_model_facts(cfg.model)
    specs = validate_against_model(cfg, facts)
    inference = getattr(cfg, "inference", None)
    max_new = inference.max_new_tokens if inference is not None else 0
    save_acts = inference.save_activations if inference is not None else True
    if not save_acts:
        specs = []  # generation only: the text is stored, no activations
    hooks = [s.name for s in specs]
    store = store if store is not None else open_store(cfg.storage.uri)
    run = Run(store, cfg.run_name)
    run_uri = store.child_uri(cfg.run_name)
    fmt = cfg.storage.format
    fingerprint = config_fingerprint(cfg)

    existing = run.read_cfg() if store.exists(run.cfg_key) else None
    if existing is not None and not force:
        _check_same_config(existing, fingerprint, run_uri)

    B, T, bpu = cfg.data.batch_size, cfg.data.seq_length, cfg.upload.batches_per_upload
    total_batches = _worker_batches(cfg, worker)
    sink.emit(
        "start", run=cfg.run_name, model=cfg.model.name, hooks=hooks, store=run_uri,
        n_batches=total_batches, batches_per_upload=bpu, pid=_pid(), format=fmt,
    )
    for message in cfg.warnings:  # e.g. a dataset_config tokenizer that is not the model's
        sink.emit("warning", message=message)

    # Resume after the last committed megabatch of this worker.
    commits = run.iter_commits(worker=worker)
    next_index = commits[-1].index + 1 if commits else 0
    done_local = sum(len(range(c.batch_start, c.batch_end, cfg.num_runs)) for c in commits)
    tokens_total = sum(c.tokens for c in commits)
    if commits:
        sink.emit("resume", from_megabatch=next_index, from_batch=done_local)
    if done_local >= total_batches:
        _clean_leftovers(run, worker, hooks)
        sink.emit("done", status="complete", batches=done_local, tokens=tokens_total, megabatches=len(commits), elapsed=0.0, already_complete=True)
        return {"status": "complete", "batches": done_local, "megabatches": len(commits), "tokens": tokens_total, "elapsed": 0.0, "already_complete": True}

    sink.emit("loading", what="model", detail=cfg.model.name)
    model, tokenizer, device = load_model_and_tokenizer(cfg.model)
    storage_dtype = _storage_dtype(cfg, model)
    capture = None
    if specs:  # where each hook is in this model; a site the family lacks is a config error, before anything is stored
        specs = expand_module_globs(model, specs)
        hooks = [s.name for s in specs]
        capture = ActivationCapture(model, specs).resolve()
        for probe in capture.probes:
            if probe.spec.site == "attn.hook_pattern":
                per_token = (probe.heads or 1) * T * torch.empty((), dtype=storage_dtype).element_size()
                sink.emit("warning", message=(
                    f"{probe.spec.name}: attention patterns are {probe.heads} heads x {T} key positions per token, "
                    f"{per_token:,} bytes per token ({per_token * T:,} per sequence)"))
    stats = {h: _load_partial_stats(run, worker, h, commits[-1].index if commits else None) for h in hooks}
    sink.emit("loading", what="data", detail=cfg.data.data_key or cfg.data.path or cfg.data.mix or "datasets",
              **loaded_summary(model, device))
    # Resume exactly after the last committed batch: commit records hold global batch indices.
    data_spec = cfg.data.model_copy(update={"start_batch": commits[-1].batch_end}) if commits else cfg.data
    stream = open_batch_stream(cfg, data_spec, tokenizer, worker, max_new)
    label_vocabs = {"category": list(cfg.data.categories)} if cfg.data.categories else {}

    def on_halve(old: int, new: int) -> None:
        sink.emit("warning", message=f"out of memory with a forward batch of {old}: continuing with {new}")

    runner = ChunkRunner(B, bool(inference and inference.auto_find_batch_size), on_halve)

    if existing is None or force:
        run.write_cfg(_cfg_json(cfg, facts, specs, fingerprint, tokenizer, storage_dtype))

    def write_hook_metadata(outputs: dict, check: dict | None) -> None:
        """Each hook's metadata.json, once its width is known from the first batch."""
        for probe in capture.probes:
            name = probe.spec.name
            if store.exists(run.metadata_key(name)):
                continue
            meta = metadata_for(
                batch_size=B, sequence_length=T, dtype=model.dtype, d_in=int(outputs[name].shape[-1]),
                batches_per_file=bpu, hook=name, site=probe.spec.site, layer=probe.spec.layer, format=fmt,
                storage_dtype=storage_dtype, model=cfg.model.name,
            )
            meta.update(hook_description(probe, int(outputs[name].shape[-1])))
            meta.update(provenance.hook_metadata(stream, tokenizer))
            if check is not None and probe.spec.is_transformerlens:
                meta["self_check"] = check
            run.write_metadata(name, meta)

    def on_retry(label, attempt, exc):
        sink.emit("warning", message=f"retrying upload of {label} (attempt {attempt}): {exc}")

    uploader = Uploader(threads=cfg.upload.upload_workers, max_pending=cfg.upload.max_queued_megabatches * (len(hooks) + 1),
                        on_retry=on_retry)
    copier = _DeviceCopier(device)
    pending: _Pending | None = None
    inflight: list[_Pending] = []
    committed = len(commits)
    batches_done = done_local
    tokens_at_loop = tokens_total
    last_progress = last_memory = 0.0
    status = "complete"

    # Statistics merged while the run grows: about one merge every _MERGE_EVERY_S across all workers.
    merge_clock = [time.monotonic() - _MERGE_EVERY_S * worker]

    chunk: list[CommitRecord] = []  # this worker's records since the last multiple of COMMIT_CHUNK

    def commit_ready(block: bool) -> None:
        nonlocal committed
        while inflight and (block or all(f.done() for f in inflight[0].futures)):
            mb = inflight.pop(0)
            results = [f.result() for f in mb.futures]  # raises the upload's error
            files = {r.hook: r for r in results if isinstance(r, FileRecord)}
            record = CommitRecord(
                worker=worker, index=mb.index, batch_start=mb.batch_start, batch_end=mb.batch_end,
                files=files, created=datetime.now(timezone.utc).isoformat(), tokens=mb.tokens,
            )
            run.commit(record)
            _chunk_commits(run, record, chunk, sink)
            committed += 1
            _delete_old_partials(run, worker, hooks, mb.index)
            _maybe_merge_statistics(run, hooks, worker, cfg.num_runs, merge_clock)
            sink.emit("committed", megabatch=mb.index, batch_start=mb.batch_start, batch_end=mb.batch_end,
                      tokens=mb.tokens, bytes=sum(f.size for f in files.values()))

    def flush(mb: _Pending) -> None:
        """Queue the upload of every hook file of `mb`, plus the stats snapshot."""
        copier.sync()
        n = mb.filled * B
        ids, msk = mb.input_ids[:n], mb.mask[:n]
        src, seg = mb.source[:n], provenance.segments_tensor(mb.segments, n)
        labels, vocabs = label_tensors({k: (v + [None] * (n - len(v)))[:n] for k, v in mb.labels.items()}, label_vocabs)
        if mb.generations:
            gkey = f"{run.internal_prefix}generations/w{worker:04d}/{mb.index:07d}.jsonl"
            blob = generations_jsonl(mb.generations)
            mb.futures.append(uploader.submit(gkey, len(blob), lambda k=gkey, b=blob: store.put_bytes(k, b)))
        for h in hooks:
            if stats[h] is None:
                stats[h] = RunningStats(mb.stats[h].d)
            stats[h].merge_(mb.stats[h])
            snapshot = stats[h].to_bytes()
            key = run.megabatch_key(h, worker, mb.index, fmt)
            states = mb.states[h][:n]
            meta = mbf.file_metadata(cfg.run_name, h, cfg.model.name, worker, mb.index, mb.batch_start, mb.batch_end)
            if vocabs:
                meta["label_values"] = json.dumps(vocabs, ensure_ascii=False)
            nbytes = states.numel() * states.element_size()
            mb.futures.append(uploader.submit(key, nbytes, _upload_job(store, run, h, key, states, ids, msk, meta, fmt,
                                                                        worker, mb, labels, (src, seg))))
            pkey = run.partial_stats_key(worker, h, mb.index)
            mb.futures.append(uploader.submit(pkey, len(snapshot), lambda k=pkey, b=snapshot: store.put_bytes(k, b)))
        inflight.append(mb)

    t_loop = time.monotonic()
    stop_announced = False
    try:
        first = True
        with capture if capture is not None else contextlib.nullcontext(), torch.inference_mode():
            for batch in stream:
                uploader.check()
                if pending is None:
                    if stop:
                        status = "stopped"
                        break
                    pending = _new_pending(next_index, batch.index, B, T, bpu)
                if max_new:
                    if capture is not None:
                        capture.detach()  # generate() runs the whole model: no capture, no early stop
                    batch, records = generate_batch(
                        model, tokenizer, batch, max_new_tokens=max_new, seq_length=T, pad_id=stream.pad_id,
                        eos_id=stream.eos_id, special_ids=stream.encoder.special_ids,
                        clean_added_tokens=cfg.data.clean_added_tokens, runner=runner, device=device,
                        seed=cfg.data.seed, do_sample=inference.do_sample, temperature=inference.temperature,
                        top_p=inference.top_p)
                    pending.generations.extend(records)
                    if capture is not None:
                        capture.attach()
                row = pending.filled * B
                nb = batch.input_ids.shape[0]
                if capture is not None:
                    outputs = forward_chunks(capture, runner, batch.input_ids, batch.attention_mask, device)
                    if first:  # the self-check, then each hook's metadata with its width
                        first = False
                        write_hook_metadata(outputs, _self_check(capture, batch, device))
                    mask_dev = batch.mask.to(device)
                    for h in hooks:
                        out = outputs[h]
                        pending.stats_for(h, out.shape[-1]).update(out.reshape(-1, out.shape[-1]), mask_dev.reshape(-1))
                        copier.copy(pending.buffer_for(h, out.shape[-1], storage_dtype, device)[row:row + nb], out)
                for name, vals in batch.labels.items():
                    pending.labels.setdefault(name, [None] * row).extend(vals)
                pending.input_ids[row:row + nb] = batch.input_ids
                pending.mask[row:row + nb] = batch.mask
                provenance.record_batch(pending.source, pending.segments, row, batch)
                pending.filled += 1
                pending.tokens += int(batch.n_tokens)
                pending.batch_end = batch.index + 1
                batches_done += 1
                tokens_total += int(batch.n_tokens)
                if stop and not stop_announced:  # said from here, never from the signal handler (the sink locks)
                    stop_announced = True
                    sink.emit("stopping", megabatch=next_index, filled=pending.filled, batches_per_upload=bpu)
                if pending.filled == bpu:
                    flush(pending)
                    next_index += 1
                    pending = None
                    if stop:
                        status = "stopped"
                        break
                commit_ready(block=False)
                now = time.monotonic()
                if now - last_progress >= _PROGRESS_EVERY_S:
                    last_progress = now
                    elapsed = now - t_loop
                    sink.emit("progress", batches=batches_done, total_batches=total_batches, tokens=tokens_total,
                              tokens_per_s=(tokens_total - tokens_at_loop) / elapsed if elapsed > 0 else 0.0,
                              megabatch=next_index)
                    s = uploader.stats
                    sink.emit("upload", queued=s.queued, in_flight_bytes=s.in_flight_bytes, done_bytes=s.done_bytes,
                              mb_per_s=s.mb_per_s, retries=s.retries, failed=s.failed)
                if now - last_memory >= _MEMORY_EVERY_S:
                    last_memory = now
                    sink.emit("memory", **memory_snapshot(device))
            if pending is not None and pending.filled:
                if fmt == "pt" and pending.filled < bpu:
                    sink.emit("warning", message=(
                        f"format pt: dropping the last {pending.filled} batch(es) ({pending.batch_start}-{pending.batch_end - 1}); "
                        "Activault readers need every file to hold batches_per_upload batches"))
                    batches_done -= pending.filled
                    tokens_total -= pending.tokens
                else:
                    flush(pending)
                pending = None
        commit_ready(block=True)
        uploader.close(wait=True)
        s = uploader.stats
        sink.emit("upload", queued=s.queued, in_flight_bytes=s.in_flight_bytes, done_bytes=s.done_bytes,
                  mb_per_s=s.mb_per_s, retries=s.retries, failed=s.failed)
    except BaseException as exc:
        status = "failed"
        uploader.close(wait=False)
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, KeyboardInterrupt):
            status, message = "stopped", "interrupted: uncommitted megabatches were not committed"
        sink.emit("error", message=message)
        sink.emit("done", status=status, batches=batches_done, tokens=tokens_total, megabatches=committed,
                  elapsed=time.monotonic() - t_start)
        raise
    if status == "complete":
        _clean_leftovers(run, worker, hooks)
    _write_statistics(run, hooks)
    result = {"status": status, "batches": batches_done, "tokens": tokens_total, "megabatches": committed,
              "elapsed": time.monotonic() - t_start}
    sink.emit("done", **result)
    return result


# -- helpers -----------------------------------------------------------------

def _pid() -> int:
    import os

    return os.getpid()


def _worker_batches(cfg, worker: int) -> int:
    """How many global batches in [start_batch, n_batches) belong to this worker."""
    k, start, end = cfg.num_runs, cfg.data.start_batch, cfg.data.n_batches
    return len(range(start + (worker - start) % k, end, k)) if end > start else 0


def _storage_dtype(cfg, model):
    import torch

    name = cfg.storage.dtype or cfg.model.dtype
    if name == "auto":
        return model.dtype
    return getattr(torch, name)


def _new_pending(index, batch_start, B, T, bpu) -> _Pending:
    """A megabatch to fill; each hook's buffer is allocated by its first batch (hooks differ in width)."""
    import torch

    rows = B * bpu
    return _Pending(
        index=index, batch_start=batch_start, states={}, rows=rows, seq_len=T,
        input_ids=torch.zeros((rows, T), dtype=torch.int64), mask=torch.zeros((rows, T), dtype=torch.bool),
        stats={}, source=provenance.empty_source(rows),
    )


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


class _DeviceCopier:
    """Copies activations off the GPU on a side stream into pinned buffers without stalling."""

    def __init__(self, device: str):
        import torch

        self.cuda = str(device).startswith("cuda")
        self.stream = torch.cuda.Stream() if self.cuda else None
        self._events: list = []

    def copy(self, dest, src) -> None:
        import torch

        if not self.cuda:
            dest.copy_(src)
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            dest.copy_(src, non_blocking=True)
            src.record_stream(self.stream)
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self._events.append(ev)

    def sync(self) -> None:
        for ev in self._events:
            ev.synchronize()
        self._events.clear()


def _upload_job(store, run, hook, key, states, ids, mask, meta, fmt, worker, mb, labels=None,
                source=(None, None)) -> Callable[[], FileRecord]:
    def job() -> FileRecord:
        hasher = _HashingStore(store)
        size = mbf.write_megabatch(hasher, key, states, ids, mask, labels=labels or None, metadata=meta, fmt=fmt,
                                   source=source[0], source_segments=source[1])
        return FileRecord(hook=hook, key=key, size=size, sha256=hasher.digest, n_sequences=int(states.shape[0]),
                          n_tokens=int(mask.sum()), worker=worker, index=mb.index)

    return job


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


def _load_partial_stats(run: Run, worker: int, hook: str, index: int | None) -> RunningStats | None:
    if index is None:
        return None  # created with the hook's width at the first flush
    stats = run.read_partial_stats(worker, hook, index)
    if stats is None:
        key = run.partial_stats_key(worker, hook, index)
        raise UserError(f"{run.store.child_uri(key)} is missing: statistics of committed megabatch {index} cannot be resumed")
    return stats


def _delete_old_partials(run: Run, worker: int, hooks: list[str], index: int) -> None:
    """Keep only the stats snapshot of the last committed megabatch."""
    if index == 0:
        return
    for h in hooks:
        run.store.delete(run.partial_stats_key(worker, h, index - 1))


def _maybe_merge_statistics(run: Run, hooks: list[str], worker: int, num_runs: int, clock: list[float]) -> None:
    """Refresh {hook}/statistics.json now and then, so a growing run is usable (finalize makes it exact)."""
    now = time.monotonic()
    if now - clock[0] < _MERGE_EVERY_S * num_runs:
        return
    clock[0] = now
    _write_statistics(run, hooks)


def _clean_leftovers(run: Run, worker: int, hooks: list[str]) -> None:
    """After a complete run: delete this worker's files no commit names (from a crash or a changed config).

    Only keys of this worker past its last commit (and statistics snapshots
    older than it) go: Activault's reader loads every file under a hook directory.
    """
    from vaultsh.run import parse_megabatch_name

    done = run.committed_indices(worker)
    last = done[-1] if done else -1
    for h in hooks:
        for o in run.store.iter_objects(f"{run.hook_prefix(h)}w{worker:04d}--"):  # this worker's files only
            parsed = parse_megabatch_name(o.name)
            if parsed and parsed[0] == worker and parsed[1] > last:
                run.store.delete(o.key)
    for w, _h, i, key in run.list_partial_stats(worker=worker):
        if w == worker and i != last:
            run.store.delete(key)


def _write_statistics(run: Run, hooks: list[str]) -> None:
    """Merge every worker's latest committed stats snapshot into {hook}/statistics.json."""
    for h in hooks:
        merged = run.merge_partial_stats(h, cumulative=True)
        if merged is not None:
            run.write_statistics(h, merged)


def _cfg_json(cfg, facts, specs, fingerprint, tokenizer, storage_dtype) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "run_name": cfg.run_name,
        "num_runs": cfg.num_runs,
        "model_name": cfg.model.name,
        "config": cfg.model_dump(mode="json"),
        "fingerprint": fingerprint,
        "model": {"d_model": facts.d_model, "n_layers": facts.n_layers, "max_context": facts.max_context,
                  "model_type": facts.model_type, "vocab_size": facts.vocab_size},
        "tokenizer": {"source": cfg.model.name, "class": type(tokenizer).__name__,
                      "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id},
        "hooks": {s.name: {"site": s.site, "layer": s.layer} for s in specs},
        "storage_dtype": str(storage_dtype).replace("torch.", ""),
        "created": datetime.now(timezone.utc).isoformat(),
    }


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
    snap = {"rss": proc.memory_info().rss, "children_rss": children, "system_used": vm.total - vm.available,
            "system_total": vm.total, "gpu_allocated": None, "gpu_reserved": None}
    if str(device).startswith("cuda"):
        import torch

        snap["gpu_allocated"] = torch.cuda.memory_allocated()
        snap["gpu_reserved"] = torch.cuda.memory_reserved()
    return snap


def _chunk_commits(run: Run, record: CommitRecord, chunk: list[CommitRecord], sink) -> None:
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
