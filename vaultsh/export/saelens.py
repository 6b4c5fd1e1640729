"""`vaultsh export RUN OUT --format saelens --hooks H1,H2`: SAELens's cached-activations layout.

OUT gets two Hugging Face `datasets` directories in the layout
`Dataset.save_to_disk` writes (`data-XXXXX-of-NNNNN.arrow`, `state.json`,
`dataset_info.json`), so `datasets.load_from_disk` and SAELens read them:

- `OUT/activations`: one row per stored sequence, one column per hook named by
  the hook (`Array2D((seq_len, d_in), dtype)`) and `token_ids`
  (`List(int32, length=seq_len)`), nothing else: what SAELens's
  `CacheActivationsRunner` writes and its `ActivationsStore` reads;
- `OUT/tokens`: the same sequences' `input_ids` (`List(int32, length=seq_len)`),
  the pretokenized dataset SAELens's runner wants beside the cache (pass it as
  `override_dataset=datasets.load_from_disk("OUT/tokens")`).

Arrow shards are written straight from the megabatches' bytes (one record
batch per megabatch, no Python rows) and atomically (temp name + rename); the
manifest `OUT/vaultsh-saelens.json` records the plan and the finished shards,
so a rerun resumes. `state.json` is written last: until the export is
complete `load_from_disk` refuses the directories.

Masked positions: SAELens has no mask column. Every stored sequence is kept
whole (a masked BOS at position 0 would otherwise drop every sequence); the
token ids that occur only at masked positions are listed in the manifest
(`exclude_token_ids`) for SAELens's `exclude_special_tokens=[...]`, which then
skips exactly the masked positions unless a masked id also occurs unmasked
(counted and reported).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import posixpath
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vaultsh.errors import FormatError, UserError
from vaultsh.export.rows import convert_states
from vaultsh.export.rows import resolve_dtype as resolve_out_dtype
from vaultsh.export.source import Decoded, Fetcher, Source, load, open_source

ACTIVATIONS = "activations"
TOKENS = "tokens"
MANIFEST = "vaultsh-saelens.json"
MANIFEST_FORMAT = "vaultsh-saelens"
DTYPES = ("auto", "float32", "float16", "float64")
IPC_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # an Arrow IPC stream's end-of-stream marker
MAX_LIST_VALUES = (1 << 31) - 1  # Array2D's inner lists have int32 offsets


@dataclass
class SaelensResult:
    out: str
    shards_total: int
    shards_written: int
    sequences_written: int
    bytes_written: int
    complete: bool
    resumed: bool
    exclude_token_ids: list[int] = field(default_factory=list)
    masked_kept: int = 0  # masked positions whose id also occurs unmasked: SAELens trains on them
    masked_total: int = 0
    notes: list[str] = field(default_factory=list)


class _Quiet:
    def phase(self, name: str, total_bytes: int, total_rows: int) -> None: ...
    def advance(self, src_bytes: int, rows: int) -> None: ...
    def note(self, message: str) -> None: ...


def saelens_scaling_factor(run_uri: str, hook: str) -> float:
    """sqrt(d_in) / mean token norm from the hook's statistics.json: SAELens's `activation_scaler.scaling_factor`."""
    from vaultsh.run import Run

    run = Run.at(run_uri)
    store = run.store
    try:
        stats = run.read_statistics(hook)
    except ValueError as exc:
        raise UserError(f"{run_uri}: {exc}") from None
    where = f"{store.child_uri(run.statistics_key(hook))}"
    if stats is None:
        raise UserError(f"{where}: no statistics for hook {hook!r} (run `vaultsh finalize {run_uri}` first)")
    norm = float(stats.mean_norm)
    if stats.count <= 0 or not math.isfinite(norm) or norm <= 0:
        raise UserError(f"{where}: mean norm {norm} over {stats.count} tokens: no scaling factor can be derived")
    return math.sqrt(stats.d) / norm


# --------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------


def _align(sources: list[Source]) -> list[dict[str, Any]]:
    """One entry per megabatch index: each hook's file (same worker and index), or a one-line error."""

    def ident(f, pos):
        return (f.worker, f.index) if f.worker is not None and f.index is not None else ("file", pos)

    first = sources[0]
    keyed = [{ident(f, i): f for i, f in enumerate(s.files)} for s in sources]
    order = [ident(f, i) for i, f in enumerate(first.files)]
    for s, files in zip(sources[1:], keyed[1:]):
        missing = [k for k in order if k not in files]
        extra = [k for k in files if k not in keyed[0]]
        if missing or extra:
            k = (missing or extra)[0]
            has, lacks = (first, s) if missing else (s, first)
            name = (keyed[0] if missing else files)[k].name
            raise FormatError(
                f"{has.uri}/{name} has no committed counterpart in {lacks.uri} "
                f"(worker {k[0]}, megabatch {k[1]}): the hooks are not aligned; export them separately"
            )
    plan = []
    for k in order:
        recs = [files[k] for files in keyed]
        plan.append(
            {
                "files": {s.hook: {"name": r.name, "size": r.size} for s, r in zip(sources, recs)},
                "sequences": recs[0].n_sequences,
            }
        )
    return plan


def _shape_of(src: Source) -> tuple[int, int, str]:
    """(seq_len, d_in, stored dtype) of a hook, from its first committed file's header."""
    from vaultsh.export.source import probe_file

    fi = probe_file(src.store, src.files[0], count_tokens=False)
    return fi.seq_len, fi.d_model, fi.dtype


def resolve_dtype(requested: str, stored: str) -> str:
    """Array2D dtype: `auto` keeps float32/16/64 and widens bf16/fp8 to float32 (Arrow has no bfloat16)."""
    return resolve_out_dtype(requested, stored, DTYPES, "saelens")


def make_plan(run_uri: str, hooks: list[str], dtype: str, batches_per_shard: int) -> tuple[dict, list[Source]]:
    """Open every hook, align their megabatches and cut the shards."""
    if not hooks:
        raise UserError("--format saelens needs --hooks H1[,H2...]")
    if len(set(hooks)) != len(hooks):
        raise UserError(f"--hooks {','.join(hooks)}: a hook is named twice")
    if "token_ids" in hooks:
        raise UserError("--hooks: a hook named 'token_ids' would clash with SAELens's token_ids column")
    run_uri = str(run_uri).rstrip("/")
    sources = [open_source(f"{run_uri}/{h}") for h in hooks]
    files = _align(sources)
    shapes: dict[str, dict[str, Any]] = {}
    for s in sources:
        t, d, stored = _shape_of(s)
        shapes[s.hook] = {"seq_len": t, "d_in": d, "stored_dtype": stored, "dtype": resolve_dtype(dtype, stored)}
    lens = {v["seq_len"] for v in shapes.values()}
    if len(lens) > 1:
        raise FormatError(f"{run_uri}: hooks {', '.join(hooks)} have different sequence lengths {sorted(lens)}")
    n = len(files)
    shard_ranges = [(a, min(n, a + batches_per_shard)) for a in range(0, n, batches_per_shard)]
    width = max(5, len(str(len(shard_ranges))))
    shards = [
        {
            "name": f"data-{i:0{width}d}-of-{len(shard_ranges):0{width}d}.arrow",
            "files": list(r),
            "rows": sum(files[m]["sequences"] for m in range(*r)),
        }
        for i, r in enumerate(shard_ranges)
    ]
    plan = {
        "source": run_uri,
        "hooks": list(hooks),
        "dtype": dtype,
        "batches_per_shard": batches_per_shard,
        "seq_len": lens.pop(),
        "shapes": shapes,
        "files": files,
        "shards": shards,
    }
    return plan, sources


def _identity(plan: dict) -> dict:
    return {k: plan[k] for k in ("source", "hooks", "dtype", "batches_per_shard")}


def _fingerprint(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------
# Arrow
# --------------------------------------------------------------------------


def features_for(plan: dict):
    """The `datasets.Features` of OUT/activations and OUT/tokens."""
    from datasets import Array2D, Features, List, Value

    t = plan["seq_len"]
    acts = {h: Array2D(shape=(t, plan["shapes"][h]["d_in"]), dtype=plan["shapes"][h]["dtype"]) for h in plan["hooks"]}
    acts["token_ids"] = List(Value("int32"), length=t)
    return Features(acts), Features({"input_ids": List(Value("int32"), length=t)})


def _array2d(states: np.ndarray, typ):
    """[n, T, D] numpy -> Array2D extension array (lists over the same buffer: no copy of the values)."""
    import pyarrow as pa

    n, t, d = states.shape
    values = pa.array(np.ascontiguousarray(states).reshape(-1))
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * t * d + 1, d, dtype=np.int32)), values)
    outer = pa.ListArray.from_arrays(pa.array(np.arange(0, n * t + 1, t, dtype=np.int32)), inner)
    return pa.ExtensionArray.from_storage(typ, outer)


def _ids(ids: np.ndarray):
    import pyarrow as pa

    n, t = ids.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(ids, dtype=np.int32).reshape(-1)), t)


def _row_chunks(n: int, t: int, d: int) -> list[tuple[int, int]]:
    step = max(1, MAX_LIST_VALUES // max(1, t * d))
    return [(a, min(n, a + step)) for a in range(0, n, step)] or [(0, 0)]


class _ShardWriter:
    """Two Arrow IPC streams (activations, tokens) under temp names, renamed into place by `commit`."""

    def __init__(self, out: Path, name: str, act_schema, tok_schema, fsync: bool):
        import pyarrow as pa

        self.final = [out / ACTIVATIONS / name, out / TOKENS / name]
        self.tmp = [p.with_name(f".{p.name}.tmp") for p in self.final]
        self.fsync = fsync
        self.sinks = [pa.OSFile(str(p), "wb") for p in self.tmp]
        self.writers = [pa.ipc.new_stream(s, sc) for s, sc in zip(self.sinks, (act_schema, tok_schema))]
        self.schemas = (act_schema, tok_schema)

    def write(self, columns: list, ids) -> None:
        import pyarrow as pa

        self.writers[0].write_batch(pa.record_batch(columns, schema=self.schemas[0]))
        self.writers[1].write_batch(pa.record_batch([ids], schema=self.schemas[1]))

    def commit(self) -> int:
        for w, s in zip(self.writers, self.sinks):
            w.close()
            s.close()
        for tmp, final in zip(self.tmp, self.final):
            if self.fsync:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, final)
        return sum(p.stat().st_size for p in self.final)

    def abort(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception:  # noqa: BLE001 - cleaning up after the error that matters
                pass
        for p in self.tmp:
            p.unlink(missing_ok=True)


def _intact(path: Path, nbytes: Any) -> bool:
    """The file has the size the manifest recorded and ends with the IPC end-of-stream marker."""
    try:
        if not isinstance(nbytes, int) or path.stat().st_size != nbytes or nbytes < 8:
            return False
        with open(path, "rb") as f:
            f.seek(nbytes - 8)
            return f.read(8) == IPC_END
    except OSError:
        return False


# --------------------------------------------------------------------------
# masked positions
# --------------------------------------------------------------------------


def _mask_summary(ids: np.ndarray, mask: np.ndarray) -> tuple[dict[int, int], np.ndarray]:
    """({masked id: count}, bool array: ids seen unmasked) of one megabatch."""
    masked = ids[~mask]
    counts = {}
    if masked.size:
        u, c = np.unique(masked, return_counts=True)
        counts = {int(a): int(b) for a, b in zip(u, c)}
    real = ids[mask]
    seen = np.zeros(int(real.max()) + 1 if real.size else 0, dtype=bool)
    seen[real] = True
    return counts, seen


def _or(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) < len(b):
        a, b = b, a
    out = a.copy()
    out[: len(b)] |= b
    return out


def _pack(seen: np.ndarray) -> dict:
    return {"n": int(len(seen)), "bits": base64.b64encode(zlib.compress(np.packbits(seen).tobytes())).decode()}


def _unpack(d: dict) -> np.ndarray:
    raw = np.frombuffer(zlib.decompress(base64.b64decode(d["bits"])), dtype=np.uint8)
    return np.unpackbits(raw)[: d["n"]].astype(bool)


def mask_report(finished: dict) -> tuple[list[int], int, int]:
    """(ids only ever masked, masked positions whose id also occurs unmasked, all masked positions)."""
    masked: dict[int, int] = {}
    seen = np.zeros(0, dtype=bool)
    for done in finished.values():
        for k, c in done["masked"].items():
            masked[int(k)] = masked.get(int(k), 0) + c
        seen = _or(seen, _unpack(done["unmasked_ids"]))
    also = {k for k in masked if k < len(seen) and seen[k]}
    return sorted(set(masked) - also), sum(masked[k] for k in also), sum(masked.values())


# --------------------------------------------------------------------------
# the export
# --------------------------------------------------------------------------


def _load_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: unreadable export manifest ({exc}): remove OUT or use another") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("plan"), dict):
        raise FormatError(f"{path}: not a vaultsh SAELens export manifest: use another OUT")
    return m


def _save_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _check_decoded(decs: dict[str, Decoded], plan: dict, m: int, src_uris: dict[str, str]) -> None:
    """Shapes as planned and the same input_ids in every hook's file (else: which file, where)."""
    entry = plan["files"][m]
    first = plan["hooks"][0]
    for h, dec in decs.items():
        n, t, d = dec.states.shape
        sh = plan["shapes"][h]
        where = f"{src_uris[h]}/{entry['files'][h]['name']}"
        if (t, d) != (sh["seq_len"], sh["d_in"]) or dec.states_dtype != sh["stored_dtype"]:
            raise FormatError(
                f"{where}: states {dec.states_dtype} [{n}, {t}, {d}] differ from the export's "
                f"{sh['stored_dtype']} [.., {sh['seq_len']}, {sh['d_in']}]: one export needs one shape"
            )
        if n != entry["sequences"] and entry["sequences"] > 0:
            raise FormatError(
                f"{where}: {n} sequences, its commit record says {entry['sequences']} "
                "(was the file replaced since it was committed?)"
            )
        ref = decs[first].input_ids
        if h != first and (dec.input_ids.shape != ref.shape or not np.array_equal(dec.input_ids, ref)):
            if dec.input_ids.shape != ref.shape:
                detail = f"input_ids {list(dec.input_ids.shape)} vs {list(ref.shape)}"
            else:
                s, p = (int(x[0]) for x in np.nonzero(dec.input_ids != ref))
                detail = f"sequence {s}, position {p}: token {int(dec.input_ids[s, p])} vs {int(ref[s, p])}"
            raise FormatError(
                f"{where} and {src_uris[first]}/{entry['files'][first]['name']} do not hold the same "
                f"tokens ({detail}): the hooks are not aligned"
            )


def export_saelens(
    run_uri: str,
    out_dir: str,
    hooks: list[str],
    *,
    dtype: str = "auto",
    batches_per_shard: int = 50,
    max_shards: int | None = None,
    fsync: bool = False,
    progress=None,
    command: str = "",
) -> SaelensResult:
    """Export the committed megabatches of `hooks` of the run at `run_uri` to OUT in SAELens's layout.

    Resumes when OUT holds the manifest of the same export; refuses a
    different one or a non-empty OUT it did not write.
    """
    if batches_per_shard < 1:
        raise UserError(f"--batches-per-shard {batches_per_shard} is not allowed: use a whole number >= 1")
    if max_shards is not None and max_shards < 1:
        raise UserError(f"--max-shards {max_shards} is not allowed: use a whole number >= 1")
    if "://" in str(out_dir):
        raise UserError(
            f"{out_dir}: --format saelens writes a local directory (SAELens reads its cache from a "
            "local path): give a path"
        )
    resolve_dtype(dtype, "F32")
    progress = progress or _Quiet()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    manifest = _load_manifest(out / MANIFEST)
    plan, sources = make_plan(run_uri, list(hooks), dtype, batches_per_shard)
    notes: list[str] = []
    if manifest is None:
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out}: not empty and holds no vaultsh SAELens export ({MANIFEST}): use an empty OUT")
        (out / ACTIVATIONS).mkdir(parents=True, exist_ok=True)
        (out / TOKENS).mkdir(parents=True, exist_ok=True)
        manifest = {"format": MANIFEST_FORMAT, "version": 1, "plan": plan, "finished": {}, "complete": False}
    else:
        if _identity(manifest["plan"]) != _identity(plan):
            raise UserError(
                f"{out} holds another SAELens export ({json.dumps(_identity(manifest['plan']))}): "
                "use another OUT or the same source, --hooks, --dtype and --batches-per-shard"
            )
        planned = {json.dumps(f, sort_keys=True) for f in manifest["plan"]["files"]}
        newer = sum(1 for f in plan["files"] if json.dumps(f, sort_keys=True) not in planned)
        if newer:
            notes.append(
                f"{newer} megabatch(es) committed since this export started are not part of it "
                "(export to a new OUT to include them)"
            )
        plan = manifest["plan"]
        for p in (out / ACTIVATIONS, out / TOKENS):
            p.mkdir(parents=True, exist_ok=True)
    resumed = bool(manifest["finished"])
    for name, done in list(manifest["finished"].items()):
        if not (
            _intact(out / ACTIVATIONS / name, done.get("bytes_activations"))
            and _intact(out / TOKENS / name, done.get("bytes_tokens"))
        ):
            del manifest["finished"][name]
            manifest["complete"] = False
            notes.append(f"{out / ACTIVATIONS / name} is not the complete shard this export wrote: writing it again")
    if command:
        manifest["command"] = command
    _save_json(out / MANIFEST, manifest)
    for n in notes:
        progress.note(n)

    act_features, tok_features = features_for(plan)
    act_schema, tok_schema = act_features.arrow_schema, tok_features.arrow_schema
    types = {h: act_schema.field(h).type for h in plan["hooks"]}
    shards = plan["shards"]
    limit = len(shards) if max_shards is None else min(max_shards, len(shards))
    todo = [i for i in range(limit) if shards[i]["name"] not in manifest["finished"]]
    src_by_hook = {s.hook: s for s in sources}
    uris = {h: s.uri for h, s in src_by_hook.items()}
    total_bytes = sum(
        sum(f["size"] for f in plan["files"][m]["files"].values()) for i in todo for m in range(*shards[i]["files"])
    )
    progress.phase("exporting", total_bytes, sum(shards[i]["rows"] for i in todo))
    written = {"shards": 0, "rows": 0, "bytes": 0}
    fetcher = Fetcher()
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="vaultsh-saelens-io")

    def fetch(m: int) -> dict[str, Decoded]:
        entry = plan["files"][m]
        futs = {
            h: pool.submit(load, fetcher, src_by_hook[h].store, src_by_hook[h].key_of(f["name"]), f["size"])
            for h, f in entry["files"].items()
        }
        decs = {h: f.result() for h, f in futs.items()}
        _check_decoded(decs, plan, m, uris)
        return decs

    from vaultsh.export.core import prefetched

    ahead = ThreadPoolExecutor(max_workers=3, thread_name_prefix="vaultsh-saelens-ahead")
    try:
        for i in todo:
            shard = shards[i]
            writer = _ShardWriter(out, shard["name"], act_schema, tok_schema, fsync)
            masked: dict[int, int] = {}
            seen = np.zeros(0, dtype=bool)
            rows = 0
            try:
                for decs in prefetched(fetch, range(*shard["files"]), ahead, depth=3):
                    first = decs[plan["hooks"][0]]
                    states = {
                        h: convert_states(d.states, d.states_dtype, plan["shapes"][h]["dtype"]) for h, d in decs.items()
                    }
                    n = first.input_ids.shape[0]
                    t = plan["seq_len"]
                    d_max = max(plan["shapes"][h]["d_in"] for h in plan["hooks"])
                    for a, b in _row_chunks(n, t, d_max):
                        cols = [_array2d(states[h][a:b], types[h]) for h in plan["hooks"]]
                        ids = _ids(first.input_ids[a:b])
                        writer.write(cols + [ids], ids)
                    counts, s = _mask_summary(first.input_ids, first.mask)
                    for k, c in counts.items():
                        masked[k] = masked.get(k, 0) + c
                    seen = _or(seen, s)
                    rows += n
                    del states, first
                    nbytes = sum(d.nbytes for d in decs.values())
                    for d in decs.values():
                        fetcher.recycle(d)
                    progress.advance(nbytes, n)
                if rows != shard["rows"]:
                    raise FormatError(
                        f"{out / ACTIVATIONS / shard['name']}: {rows} sequences, the plan says "
                        f"{shard['rows']} (did the run's committed files change?)"
                    )
                nb = writer.commit()
            except BaseException:
                writer.abort()
                raise
            manifest["finished"][shard["name"]] = {
                "rows": rows,
                "bytes_activations": (out / ACTIVATIONS / shard["name"]).stat().st_size,
                "bytes_tokens": (out / TOKENS / shard["name"]).stat().st_size,
                "masked": {str(k): c for k, c in sorted(masked.items())},
                "unmasked_ids": _pack(seen),
            }
            _save_json(out / MANIFEST, manifest)
            written["shards"] += 1
            written["rows"] += rows
            written["bytes"] += nb
    finally:
        ahead.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
        fetcher.close()

    complete = len(manifest["finished"]) == len(shards)
    exclude, kept, total_masked = mask_report(manifest["finished"])
    if complete:
        _finish(out, plan, manifest, act_features, tok_features)
        manifest["complete"] = True
        manifest["exclude_token_ids"] = exclude
        manifest["masked_positions"] = {"total": total_masked, "kept_unexcludable": kept}
        _save_json(out / MANIFEST, manifest)
        if total_masked:
            msg = (
                f"{total_masked:,} masked position(s) (padding, BOS, special tokens, a default system prompt) are "
                f"kept: SAELens has no mask column; pass exclude_special_tokens={_short(exclude)} "
                f"(`exclude_token_ids` in {out / MANIFEST}) to skip them"
            )
            if kept:
                msg += (
                    f"; {kept:,} of them have token ids that also occur unmasked, so SAELens will train on those "
                    "(no id list can skip them)"
                )
            notes.append(msg)
            progress.note(msg)
    return SaelensResult(
        str(out),
        len(shards),
        written["shards"],
        written["rows"],
        written["bytes"],
        complete,
        resumed,
        exclude,
        kept,
        total_masked,
        notes,
    )


def _short(ids: list[int], n: int = 12) -> str:
    return str(ids) if len(ids) <= n else f"[{', '.join(map(str, ids[:n]))}, ... ({len(ids)} ids)]"


def _finish(out: Path, plan: dict, manifest: dict, act_features, tok_features) -> None:
    """state.json and dataset_info.json of both datasets, as `save_to_disk` writes them (state.json last)."""
    files = [{"filename": s["name"]} for s in plan["shards"]]
    fp = _fingerprint(plan)
    src = plan["source"]
    for sub, feats, what in (
        (ACTIVATIONS, act_features, f"activations of {', '.join(plan['hooks'])}"),
        (TOKENS, tok_features, "input_ids of the same sequences"),
    ):
        info = {
            "citation": "",
            "description": f"vaultsh export of {src}: {what} (SAELens cached-activations layout)",
            "features": feats.to_dict(),
            "homepage": "",
            "license": "",
        }
        _save_json(out / sub / "dataset_info.json", info)
        state: dict[str, Any] = {
            "_data_files": files,
            "_fingerprint": f"{fp}{sub[:1]}",
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        _save_json(out / sub / "state.json", state)


def split_hook_uri(source: str) -> tuple[str, str]:
    """RUN/HOOK -> (RUN, HOOK): what `--format saelens` without --hooks reads."""
    text = str(source).rstrip("/")
    run, hook = posixpath.split(text)
    if not run or not hook:
        raise UserError(f"{source}: give the run and --hooks H1[,H2...] (or RUN/HOOK for one hook)")
    return run, hook


__all__ = [
    "export_saelens",
    "saelens_scaling_factor",
    "SaelensResult",
    "features_for",
    "mask_report",
    "ACTIVATIONS",
    "TOKENS",
    "MANIFEST",
]
