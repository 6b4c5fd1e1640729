"""`export()`: one hook directory of a run -> sharded Parquet + dataset card, resumable."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from vaultsh.dtypes import raw_numpy
from vaultsh.errors import FormatError, UserError
from vaultsh.export import card, shuffle
from vaultsh.export.manifest import (
    MANIFEST,
    ExportOptions,
    Manifest,
    Plan,
    check_label_columns,
    check_same_export,
    load_manifest,
    plan_shards,
    stray_parquet,
)
from vaultsh.export.parquet import Stopped, rows_per_group, write_shard, writer_kwargs
from vaultsh.export.rows import make_block, nrows, resolve_dtype, row_nbytes, schema_for
from vaultsh.export.source import (
    Decoded,
    Fetcher,
    FileInfo,
    Source,
    describe_labels,
    load,
    open_source,
    probe_all,
    probe_file,
)
from vaultsh.store import Store, open_store

CARD = "README.md"
MODES = ("sequences", "tokens")


class Progress:
    """What `export` reports while it works (the CLI draws a rich bar from it). Thread-safe callers."""

    def phase(self, name: str, total_bytes: int, total_rows: int) -> None: ...
    def advance(self, src_bytes: int, rows: int) -> None: ...
    def note(self, message: str) -> None: ...


@dataclass
class ExportResult:
    out_uri: str
    source_uri: str
    shards_total: int
    shards_done: int  # finished shards in OUT after this call
    shards_written: int  # written by this call
    rows_written: int
    bytes_written: int
    resumed: bool
    complete: bool
    notes: list[str] = field(default_factory=list)


def prefetched(
    fn: Callable[[Any], Any], items: Iterable[Any], pool: ThreadPoolExecutor, depth: int = 2
) -> Iterator[Any]:
    """fn(item) for each item, in order, computed up to `depth` items ahead on `pool`."""
    items = list(items)
    futs: list[Future] = []
    nxt = 0
    try:
        for i in range(len(items)):
            while nxt < len(items) and nxt < i + depth:
                futs.append(pool.submit(fn, items[nxt]))
                nxt += 1
            yield futs[i].result()
            futs[i] = None  # type: ignore[call-overload]  # drop the reference: memory is one megabatch
    finally:
        for f in futs:
            if f is not None:
                f.cancel()


def _source_facts(src: Source) -> dict[str, Any]:
    md = src.metadata or {}
    cfg = src.cfg or {}
    model = md.get("model") or cfg.get("model_name") or (cfg.get("transformer_config") or {}).get("model_name")
    tok = cfg.get("tokenizer") or cfg.get("tokenizer_source")
    out = {
        "uri": src.uri,
        "run": src.run.name,
        "hook": src.hook,
        "model": model if isinstance(model, str) else None,
        "site": md.get("site"),
        "layer": md.get("layer"),
        "tokenizer": tok if isinstance(tok, str) else None,
    }
    return {k: v for k, v in out.items() if v is not None or k in ("uri", "run", "hook", "model")}


def _probe(src: Source, options: ExportOptions) -> tuple[list[FileInfo], bool]:
    """What the plan needs of every committed file, with as few requests as the data allows.

    Returns (infos, counted): `counted` when every file's unmasked-token count
    is known. The collector's commit records give each file's size, sequences
    and unmasked tokens; when the first file's header and mask agree with its
    record, the records are taken for all files (2 requests instead of 2 per
    file: for 100k megabatches on S3 that is minutes before the first row) and
    every file is checked against them when it is fetched (`_check_decoded`).
    Otherwise (an Activault run, records of another writer) every file's
    header is read, and its mask too in tokens mode (whose rows are the
    unmasked tokens); sequences mode then counts tokens while writing.
    """
    recs = src.files
    if all(f.n_sequences > 0 and f.size > 0 for f in recs):
        first = probe_file(src.store, recs[0], count_tokens=True)
        if first.sequences == recs[0].n_sequences and first.real_tokens == recs[0].n_tokens:
            return [first] + [
                replace(first, name=f.name, size=f.size, sequences=f.n_sequences, real_tokens=f.n_tokens)
                for f in recs[1:]
            ], True
    counted = options.mode == "tokens"
    return probe_all(src.store, recs, count_tokens=counted), counted


def make_plan(src: Source, options: ExportOptions) -> Plan:
    """Probe the committed files (see `_probe`) and cut the shards.

    When `_probe` could not count them, a file's unmasked `tokens` are None
    until it is written (`_count_tokens`); the manifest saved after each
    shard keeps them.
    """
    infos, counted = _probe(src, options)
    first = infos[0]
    for fi in infos[1:]:
        if (
            (fi.seq_len, fi.d_model) != (first.seq_len, first.d_model)
            or fi.dtype != first.dtype
            or fi.ids_dtype != first.ids_dtype
        ):
            raise FormatError(
                f"{src.uri}/{fi.name}: states {fi.dtype} [.., {fi.seq_len}, {fi.d_model}] (input_ids {fi.ids_dtype}) "
                f"differ from {first.name}'s {first.dtype} [.., {first.seq_len}, {first.d_model}] (input_ids {first.ids_dtype}): "
                "one export needs one shape"
            )
    available = describe_labels(infos)
    labels = check_label_columns(options.label_columns, available)
    rows = [fi.sequences if options.mode == "sequences" else fi.real_tokens for fi in infos]
    if sum(rows) == 0:
        raise UserError(f"{src.uri}: nothing to export: every token of the committed megabatches is masked")
    files = [
        {
            "name": fi.name,
            "size": fi.size,
            "sequences": fi.sequences,
            "tokens": fi.real_tokens if counted else None,
            "rows": r,
        }
        for fi, r in zip(infos, rows)
    ]
    return Plan(
        source=_source_facts(src),
        options=options.identity(),
        dtype=resolve_dtype(options.dtype, first.dtype),
        labels=labels,
        label_types={n: [available[n][0], list(available[n][1])] for n in labels},
        shape={
            "seq_len": first.seq_len,
            "d_model": first.d_model,
            "stored_dtype": first.dtype,
            "ids_dtype": first.ids_dtype,
        },
        files=files,
        shards=plan_shards(rows, options.batches_per_shard),
    )


def _count_tokens(plan: Plan, m: int, dec: Decoded) -> None:
    """Record file m's unmasked tokens in the plan once it has been decoded."""
    if plan.files[m].get("tokens") is None:
        plan.files[m]["tokens"] = int(np.count_nonzero(dec.mask))


def _empty_decoded(plan: Plan) -> Decoded:
    t, d = plan.shape["seq_len"], plan.shape["d_model"]
    labels: dict[str, tuple[np.ndarray, str]] = {
        n: (np.zeros([0] + list(rest), dtype=raw_numpy(dt)), dt) for n, (dt, rest) in plan.label_types.items()
    }
    return Decoded(
        np.zeros((0, t, d), dtype=raw_numpy(plan.shape["stored_dtype"])),
        plan.shape["stored_dtype"],
        np.zeros((0, t), dtype=raw_numpy(plan.shape["ids_dtype"])),
        np.zeros((0, t), dtype=bool),
        labels,
        0,
    )


def _schema(plan: Plan, fingerprint: str):
    import json

    block = make_block(_empty_decoded(plan), 0, plan.options["mode"], plan.dtype, plan.labels)
    meta = {
        "vaultsh.export": json.dumps(
            {"source": plan.source, "options": plan.options, "dtype": plan.dtype, "fingerprint": fingerprint}
        )
    }
    return schema_for(block, plan.dtype, meta), row_nbytes(block)


def _check_decoded(dec: Decoded, plan: Plan, m: int, src: Source) -> None:
    """A fetched file must have the plan's shape, dtypes, labels and sequence count (one-line FormatError)."""
    f = plan.files[m]
    n, t, d = dec.states.shape
    want = plan.shape
    ids = dec.input_ids.dtype
    if (
        (t, d) != (want["seq_len"], want["d_model"])
        or dec.states_dtype != want["stored_dtype"]
        or ids != raw_numpy(want["ids_dtype"])
        or dec.input_ids.shape != (n, t)
    ):
        raise FormatError(
            f"{src.uri}/{f['name']}: states {dec.states_dtype} [{n}, {t}, {d}] (input_ids {ids}) differ from "
            f"the export's {want['stored_dtype']} [.., {want['seq_len']}, {want['d_model']}] "
            f"(input_ids {want['ids_dtype']}, from {plan.files[0]['name']}): one export needs one shape"
        )
    if n != f["sequences"]:
        raise FormatError(
            f"{src.uri}/{f['name']}: {n} sequences, its commit record says {f['sequences']} "
            "(was the file replaced since it was committed?)"
        )
    if f.get("tokens") is not None:
        real = int(np.count_nonzero(dec.mask))
        if real != f["tokens"]:
            raise FormatError(
                f"{src.uri}/{f['name']}: {real} unmasked tokens, the export plan (its commit record) "
                f"says {f['tokens']} (was the file replaced since it was committed?)"
            )
    missing = [lab for lab in plan.labels if lab not in dec.labels]
    if missing:
        raise FormatError(
            f"{src.uri}/{f['name']}: label {missing[0]!r} is missing (the export takes the labels of "
            f"{plan.files[0]['name']}; choose others with --label-columns)"
        )


def export(
    source_uri: str,
    out_uri: str,
    options: ExportOptions = ExportOptions(),
    *,
    max_shards: int | None = None,
    workers: int | None = None,
    tmp_dir: str | None = None,
    progress: Progress | None = None,
    command: str = "",
    fsync: bool = False,
    shuffle_memory: int | None = None,
) -> ExportResult:
    """Export the committed megabatches of `source_uri` (RUN/HOOK) to Parquet shards in `out_uri`.

    Resumes when OUT holds a manifest of the same export; refuses one of a
    different export. `max_shards` caps how many shards exist when this call
    returns (the first N of the plan); `workers` shards are written at once.
    `fsync` makes each local shard durable before it counts as finished;
    without it a shard is still atomic (whole or absent after a crash of this
    process) and a resume rewrites any finished shard that a power loss cut short.
    `shuffle_memory`: bytes --shuffle may hold in memory between its passes
    (default: half the available RAM); a larger shuffle spills to `tmp_dir`.
    """
    if options.mode not in MODES:
        raise UserError(f"mode {options.mode!r} is not allowed; use sequences or tokens")
    if options.batches_per_shard < 1:
        raise UserError(f"--batches-per-shard {options.batches_per_shard} is not allowed: use a whole number >= 1")
    if max_shards is not None and max_shards < 1:
        raise UserError(f"--max-shards {max_shards} is not allowed: use a whole number >= 1")
    resolve_dtype(options.dtype, "F32")  # validates the name
    progress = progress or Progress()
    workers = max(1, int(workers or min(2, os.cpu_count() or 1)))

    src = open_source(source_uri)
    out = open_store(out_uri)
    writer_kwargs_check(options)
    notes: list[str] = []
    existing = load_manifest(out)
    listing = {o.name: o.size for o in out.list_dir("").objects}
    if existing is not None:
        check_same_export(existing, src.uri, options, out.uri)
        manifest = existing
        planned = {f["name"] for f in manifest.plan.files}
        newer = [f for f in src.files if f.name not in planned]
        if newer:
            notes.append(
                f"{len(newer)} megabatch(es) committed since this export started are not part of it "
                "(export to a new OUT to include them)"
            )
    else:
        stray = stray_parquet(sorted(listing), None)
        if stray:
            raise UserError(
                f"{out.uri} holds Parquet files that no vaultsh export manifest describes ({stray[0]}, ...): "
                "use an empty OUT"
            )
        manifest = Manifest(make_plan(src, options), command=command)
    plan = manifest.plan
    stray = stray_parquet(sorted(listing), plan)
    if stray:
        raise UserError(f"{out.uri} holds {stray[0]}, which this export did not write: remove it or use another OUT")
    if src.uncommitted:
        notes.append(
            f"the run is still being written: {src.uncommitted} uncommitted file(s) in {src.hook} are ignored; "
            f"exporting the {len(plan.files)} committed megabatch(es)"
        )
    # a finished shard deleted or cut short since is written again
    broken = [n for n, done in manifest.finished.items() if not shard_intact(out, n, done.get("bytes"), listing.get(n))]
    for name in broken:
        del manifest.finished[name]
        if name in listing:
            notes.append(
                f"{out.child_uri(name)} is not the complete shard this export wrote "
                "(cut short by a crash or power loss?): writing it again"
            )
    resumed = existing is not None and bool(manifest.finished)
    if command:
        manifest.command = command
    manifest.save(out)
    for n in notes:
        progress.note(n)

    limit = len(plan.shards) if max_shards is None else min(max_shards, len(plan.shards))
    todo = [i for i in range(limit) if plan.shards[i]["name"] not in manifest.finished]
    schema, row_bytes = _schema(plan, manifest.fingerprint)
    stop = threading.Event()
    written = {"shards": 0, "rows": 0, "bytes": 0}
    lock = threading.Lock()

    def finished(i: int, rows: int, nbytes: int) -> None:
        with lock:
            manifest.finished[plan.shards[i]["name"]] = {"rows": rows, "bytes": nbytes}
            written["shards"] += 1
            written["rows"] += rows
            written["bytes"] += nbytes
            manifest.save(out)

    shards = _Shards(out, plan, schema, options, workers, progress, stop, finished, fsync)
    try:
        if todo and options.shuffle:
            _write_shuffled(shards, src, todo, row_bytes, tmp_dir, shuffle_memory)
        elif todo:
            _write_in_order(shards, src, todo)
    except BaseException:
        stop.set()
        if written["shards"]:
            try:  # best effort: the card describes the shards that did finish
                _write_card(out, manifest)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        raise
    if written["shards"] or not out.exists(CARD):
        _write_card(out, manifest)
    return ExportResult(
        out_uri=out.uri,
        source_uri=src.uri,
        shards_total=len(plan.shards),
        shards_done=len(manifest.finished),
        shards_written=written["shards"],
        rows_written=written["rows"],
        bytes_written=written["bytes"],
        resumed=resumed,
        complete=len(manifest.finished) == len(plan.shards),
        notes=notes,
    )


def shard_intact(out: Store, name: str, nbytes: int | None, listed_size: int | None) -> bool:
    """True when OUT holds `name` with the size the manifest recorded and a Parquet footer at its end.

    Catches what a power loss can leave of a shard written without --fsync
    (missing, empty or short); one small ranged read per shard.
    """
    if listed_size is None or not isinstance(nbytes, int) or listed_size != nbytes or nbytes < 12:
        return False
    try:
        tail = out.get_range(name, nbytes - 8, 8)
    except Exception:  # noqa: BLE001 - unreadable counts as not intact: it is rewritten
        return False
    footer = int.from_bytes(tail[:4], "little") if len(tail) == 8 else -1
    return tail[4:] == b"PAR1" and 0 < footer <= nbytes - 12


def _write_card(out: Store, manifest: Manifest) -> None:
    from vaultsh import __version__

    out.put_bytes(CARD, card.render_card(manifest, __version__).encode("utf-8"))


def writer_kwargs_check(options: ExportOptions) -> None:
    import pyarrow as pa

    writer_kwargs(pa.schema([pa.field("states", pa.float32())]), options.compression)


@dataclass
class _Shards:
    """How one export call writes its shards: the writer's arguments, the threads, the stop flag, the manifest."""

    out: Store
    plan: Plan
    schema: Any
    options: ExportOptions
    workers: int
    progress: Progress
    stop: threading.Event
    finished: Callable[[int, int, int], None]  # (shard, rows, bytes): recorded in the manifest
    fsync: bool

    def write(self, i: int, blocks: Iterable) -> tuple[int, int]:
        """Shard i of the plan from `(block, source_bytes)` pairs: (rows, bytes of the file)."""
        shard = self.plan.shards[i]
        return write_shard(
            self.out,
            shard["name"],
            self.schema,
            blocks,
            self.options.compression,
            shard["rows"],
            on_block=lambda rows, nb: self.progress.advance(nb, rows),
            stop=self.stop,
            durable=self.fsync,
        )

    def write_all(self, todo: list[int], blocks: Callable[[int], Iterable]) -> None:
        """Write every shard of `todo` from `blocks(shard)` on `workers` threads."""
        _run_shards(todo, lambda i: self.write(i, blocks(i)), self.workers, self.stop, self.finished)


def _run_shards(
    todo: list[int],
    work: Callable[[int], tuple[int, int]],
    workers: int,
    stop: threading.Event,
    finished: Callable[[int, int, int], None],
) -> None:
    """Run `work(shard)` for every shard on `workers` threads; the first error stops the rest."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vaultsh-export")
    pending: dict[Future, int] = {}
    queue = list(todo)
    error: BaseException | None = None
    try:
        while queue or pending:
            while queue and len(pending) < workers and error is None:
                i = queue.pop(0)
                pending[pool.submit(work, i)] = i
            if not pending:
                break
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                exc = fut.exception()
                if exc is None:
                    finished(i, *fut.result())
                elif error is None or isinstance(error, Stopped):
                    error = exc
                    stop.set()
                    queue.clear()
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if error is not None:
        raise error


def _checked_loader(fetcher: Fetcher, src: Source, plan: Plan) -> Callable[[int], tuple[int, Decoded]]:
    """fetch(m) -> (m, file m of the plan fetched, decoded and checked against the plan)."""

    def fetch(m: int) -> tuple[int, Decoded]:
        f = plan.files[m]
        dec = load(fetcher, src.store, src.key_of(f["name"]), f["size"])
        _check_decoded(dec, plan, m, src)
        return m, dec

    return fetch


def _write_in_order(shards: _Shards, src, todo: list[int]) -> None:
    plan, stop = shards.plan, shards.stop
    mode, labels = plan.options["mode"], plan.labels
    files = plan.files
    total_bytes = sum(f["size"] for i in todo for f in files[slice(*plan.shards[i]["files"])])
    shards.progress.phase("exporting", total_bytes, sum(plan.shards[i]["rows"] for i in todo))
    io_pool = ThreadPoolExecutor(max_workers=2 * shards.workers, thread_name_prefix="vaultsh-export-io")
    fetcher = Fetcher()
    fetch = _checked_loader(fetcher, src, plan)

    def blocks(i: int):
        for m, dec in prefetched(fetch, range(*plan.shards[i]["files"]), io_pool, depth=3):
            if stop.is_set():
                raise Stopped("export interrupted")
            _count_tokens(plan, m, dec)
            yield make_block(dec, m, mode, plan.dtype, labels), dec.nbytes
            # the writer asks for the next block only once this one is in the file
            fetcher.recycle(dec)

    try:
        shards.write_all(todo, blocks)
    finally:
        io_pool.shutdown(wait=True, cancel_futures=True)
        fetcher.close()


def _write_shuffled(
    shards: _Shards, src, todo: list[int], row_bytes: int, tmp_dir: str | None, shuffle_memory: int | None
) -> None:
    plan, options, progress, stop = shards.plan, shards.options, shards.progress, shards.stop
    mode, labels = plan.options["mode"], plan.labels
    files = plan.files
    todo_set = set(todo)
    shuffle.scratch_base(tmp_dir)  # a wrong --tmp-dir is an error even when the shuffle fits in memory
    needed = sum(plan.shards[i]["rows"] for i in todo) * row_bytes
    budget = shuffle.memory_budget() if shuffle_memory is None else shuffle_memory
    in_memory = needed <= budget
    spill = shuffle.Spill(None if in_memory else shuffle.spill_dir(tmp_dir))
    try:
        if spill.directory is not None:  # not in memory
            shuffle.check_space(spill.directory, needed)
        progress.phase("shuffling", sum(f["size"] for f in files), sum(f["rows"] for f in files))
        rng = shuffle.deal_rng(options.seed)
        remaining = np.array([s["rows"] for s in plan.shards], dtype=np.int64)
        io_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vaultsh-export-io")
        fetcher = Fetcher()
        fetch = _checked_loader(fetcher, src, plan)

        try:
            for m, dec in prefetched(fetch, range(len(files)), io_pool):
                if stop.is_set():
                    raise Stopped("export interrupted")
                _count_tokens(plan, m, dec)
                block = make_block(dec, m, mode, plan.dtype, labels)
                r = nrows(block)
                if r != files[m]["rows"]:
                    raise FormatError(
                        f"{src.uri}/{files[m]['name']}: {r} rows, the export plan says {files[m]['rows']} "
                        "(did the run's committed files change since the export started?)"
                    )
                counts, order = shuffle.deal(rng, remaining, r)
                remaining -= counts
                cum = np.concatenate([[0], np.cumsum(counts)])
                parts = [(s, order[cum[s] : cum[s + 1]]) for s in sorted(todo_set) if counts[s]]
                if parts:
                    spill.add(m, block, parts)  # copies the rows out: the buffer is free again
                del block
                fetcher.recycle(dec)
                progress.advance(dec.nbytes, r)
        finally:
            io_pool.shutdown(wait=True, cancel_futures=True)
            fetcher.close()

        progress.phase("writing", spill.bytes, sum(plan.shards[i]["rows"] for i in todo))
        group = rows_per_group(row_bytes)
        shards.write_all(todo, lambda i: spill.shard_blocks(i, shuffle.shard_rng(options.seed, i), group))
    finally:
        spill.cleanup()


__all__ = ["export", "ExportOptions", "ExportResult", "Progress", "make_plan", "MANIFEST", "CARD"]
