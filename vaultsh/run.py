"""The run layout over any Store (Activault-compatible).

```
{run}/cfg.json                     resolved config and model facts
{run}/{hook}/metadata.json         Activault fields + what the hook means
{run}/{hook}/statistics.json       merged statistics (Activault fields + count)
{run}/{hook}/w0003--0000012.safetensors   megabatch files (deterministic names)
{run}/_vaultsh/commits/w0003/0000012.json one commit record per (worker, index)
{run}/_vaultsh/stats/w0003/{hook}/0000012.safetensors  per-worker partial stats
{run}/_vaultsh/generations/w0003/0000012.jsonl  generated texts (generation mode)
```

Activault's RCache loads every key under `{hook}/` except metadata.json and
statistics.json as a megabatch, so everything private (commit records, partial
statistics, logs) lives under `{run}/_vaultsh/`, never in a hook directory.

A megabatch index is committed when its commit record exists; the record
names every hook's file. Readers ignore files no record names. A run without
commit records (an Activault run, `{uuid}--{n}_{job}.saved.pt`) is read as if
every file under a hook directory were committed.

Every key here is relative to the store root. Nothing read from the store is
trusted: JSON is size-limited and validated, records never `eval`ed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from vaultsh.dtypes import activault_dtype_name
from vaultsh.errors import FormatError, NotFoundError, StoreError, UserError
from vaultsh.megabatch import EXTENSIONS
from vaultsh.stats import RunningStats, merge_all
from vaultsh.store.base import ObjectInfo, Store, normalize_key

__all__ = [
    "CFG",
    "METADATA",
    "STATISTICS",
    "OUTLIERS",
    "LEGACY_OUTLIERS",
    "INTERNAL",
    "MAX_JSON_BYTES",
    "megabatch_name",
    "parse_megabatch_name",
    "FileRecord",
    "CommitRecord",
    "HookSummary",
    "RunSummary",
    "Run",
    "metadata_for",
]

CFG = "cfg.json"
METADATA = "metadata.json"
STATISTICS = "statistics.json"
# `vaultsh norms` writes RUN/_vaultsh/outliers/HOOK.json: outside the hook directory, where Activault's own
# RCache (which loads every key there but metadata.json and statistics.json) would take it for a megabatch.
OUTLIERS = "outliers"
LEGACY_OUTLIERS = "_outliers.json"  # HOOK/_outliers.json, where earlier versions wrote it: still read, never listed
INTERNAL = "_vaultsh"
COMMITS = "commits"
COMMIT_CHUNKS = "commit-chunks"
COMMIT_CHUNK = 100  # commit records per chunk: one GET instead of 100 when a run is read
PARTIAL_STATS = "stats"
GENERATIONS = "generations"  # generation mode: each megabatch's texts, one JSON object a line

MAX_JSON_BYTES = 16 * 1024 * 1024
COMMIT_FORMAT = "vaultsh-commit"
COMMIT_VERSION = 1

_SUFFIX_TO_FORMAT = {v: k for k, v in EXTENSIONS.items()}  # megabatch.EXTENSIONS: format name -> file suffix

_NAME_RE = re.compile(r"^w(\d{4,})--(\d{7,})(" + "|".join(map(re.escape, EXTENSIONS.values())) + r")$")
_COMMIT_RE = re.compile(r"^w(\d{4,})/(\d{7,})\.json$")
_PARTIAL_RE = re.compile(r"^w(\d{4,})/(.+)/(\d{7,})\.safetensors$")
_PARALLEL_READS = 16


# -- megabatch names ---------------------------------------------------------
def _check_nonneg(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    return v


def megabatch_name(worker: int, index: int, fmt: str = "safetensors") -> str:
    """Deterministic file name of worker `worker`'s megabatch `index`.

    >>> megabatch_name(3, 12)
    'w0003--0000012.safetensors'
    >>> megabatch_name(3, 12, "pt")
    'w0003--0000012.saved.pt'
    """
    _check_nonneg("worker", worker)
    _check_nonneg("index", index)
    if fmt not in EXTENSIONS:
        raise ValueError(f"unknown megabatch format {fmt!r}; allowed: {', '.join(EXTENSIONS)}")
    return f"w{worker:04d}--{index:07d}{EXTENSIONS[fmt]}"


def parse_megabatch_name(name: str) -> tuple[int, int] | None:
    """(worker, index) of a name `megabatch_name` produced (a key's basename is used); else None."""
    base = name.rsplit("/", 1)[-1]
    m = _NAME_RE.match(base)
    if not m:
        return None
    worker, index, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
    # Only the canonical spelling counts (w0001, not w00001).
    if megabatch_name(worker, index, _SUFFIX_TO_FORMAT[suffix]) != base:
        return None
    return worker, index


def megabatch_format(name: str) -> str | None:
    """'safetensors' or 'pt' from a file name's suffix (Activault's `.saved.pt`/`.pt` -> 'pt')."""
    if name.endswith(EXTENSIONS["safetensors"]):
        return "safetensors"
    if name.endswith(".pt"):  # EXTENSIONS["pt"], and Activault's other spellings
        return "pt"
    return None


# -- records -----------------------------------------------------------------
def _need(d: dict, name: str, types: tuple, where: str, optional: bool = False):
    if name not in d:
        if optional:
            return None
        raise FormatError(f"{where}: missing field {name!r}")
    v = d[name]
    if v is None and optional:
        return None
    if isinstance(v, bool) and bool not in types:
        raise FormatError(f"{where}: field {name!r} has the wrong type (got {v!r})")
    if not isinstance(v, types):
        raise FormatError(f"{where}: field {name!r} has the wrong type (got {type(v).__name__})")
    return v


def _need_nonneg(d: dict, name: str, where: str) -> int:
    v = _need(d, name, (int,), where)
    if v < 0:
        raise FormatError(f"{where}: field {name!r} must be >= 0, got {v}")
    return v


def _opt_nonneg(d: dict, name: str, where: str) -> int | None:
    """Like _need_nonneg, but the field may be absent or null (None then)."""
    return None if d.get(name) is None else _need_nonneg(d, name, where)


@dataclass
class FileRecord:
    """One hook's file of one megabatch."""

    hook: str
    key: str  # relative to the store root
    size: int
    sha256: str | None = None
    n_sequences: int = 0
    n_tokens: int = 0
    worker: int | None = None
    index: int | None = None

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "file record") -> FileRecord:
        if not isinstance(d, dict):
            raise FormatError(f"{where}: expected an object, got {type(d).__name__}")
        hook = _need(d, "hook", (str,), where)
        key = _need(d, "key", (str,), where)
        try:
            key = normalize_key(key)
        except StoreError as e:
            raise FormatError(f"{where}: bad key: {e}") from None
        if not key or key.endswith("/"):
            raise FormatError(f"{where}: bad key {d['key']!r}")
        sha = _need(d, "sha256", (str,), where, optional=True)
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise FormatError(f"{where}: field 'sha256' is not a hex SHA-256 digest")
        return cls(
            hook=hook,
            key=key,
            size=_need_nonneg(d, "size", where),
            sha256=sha,
            n_sequences=_opt_nonneg(d, "n_sequences", where) or 0,
            n_tokens=_opt_nonneg(d, "n_tokens", where) or 0,
            worker=_opt_nonneg(d, "worker", where),
            index=_opt_nonneg(d, "index", where),
        )


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class CommitRecord:
    """Megabatch `index` of `worker` is complete: every hook's file is stored."""

    worker: int
    index: int
    batch_start: int
    batch_end: int  # exclusive
    files: dict[str, FileRecord] = field(default_factory=dict)
    created: str = field(default_factory=_now_iso)
    tokens: int = 0

    def to_dict(self) -> dict:
        return {
            "format": COMMIT_FORMAT,
            "version": COMMIT_VERSION,
            "worker": self.worker,
            "index": self.index,
            "batch_start": self.batch_start,
            "batch_end": self.batch_end,
            "tokens": self.tokens,
            "created": self.created,
            "files": {h: f.to_dict() for h, f in self.files.items()},
        }

    def to_json(self) -> str:
        return pretty_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, where: str = "commit record") -> CommitRecord:
        if not isinstance(d, dict):
            raise FormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
        fmt = d.get("format", COMMIT_FORMAT)
        if fmt != COMMIT_FORMAT:
            raise FormatError(f"{where}: not a commit record (format {fmt!r})")
        version = _need(d, "version", (int,), where, optional=True)
        if version is not None and version > COMMIT_VERSION:
            raise FormatError(
                f"{where}: commit record version {version} is newer than this vaultsh understands ({COMMIT_VERSION})"
            )
        files_raw = _need(d, "files", (dict,), where)
        files: dict[str, FileRecord] = {}
        for hook, raw in files_raw.items():
            fr = FileRecord.from_dict(raw, f"{where}: files[{hook!r}]")
            if fr.hook != hook:
                raise FormatError(f"{where}: files[{hook!r}] names hook {fr.hook!r}")
            files[hook] = fr
        rec = cls(
            worker=_need_nonneg(d, "worker", where),
            index=_need_nonneg(d, "index", where),
            batch_start=_need_nonneg(d, "batch_start", where),
            batch_end=_need_nonneg(d, "batch_end", where),
            files=files,
            created=_need(d, "created", (str,), where),
            tokens=_opt_nonneg(d, "tokens", where) or 0,
        )
        if rec.batch_end < rec.batch_start:
            raise FormatError(f"{where}: batch_end {rec.batch_end} < batch_start {rec.batch_start}")
        return rec

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "commit record") -> CommitRecord:
        return cls.from_dict(_loads(text, where), where)


# -- JSON --------------------------------------------------------------------
def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def pretty_json(obj: Any, level: int = 0) -> str:
    """Pretty JSON: objects indented, lists of scalars kept on one line."""
    pad = "  " * (level + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(str(k))}: {pretty_json(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if isinstance(obj, (list, tuple)):
        if all(_is_scalar(v) for v in obj):
            return json.dumps(list(obj))
        items = [pad + pretty_json(v, level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + "  " * level + "]"
    return json.dumps(obj)


def _loads(data: str | bytes, where: str) -> Any:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > MAX_JSON_BYTES:
            raise FormatError(f"{where}: {len(data)} bytes is larger than the {MAX_JSON_BYTES}-byte limit for JSON")
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{where}: not UTF-8 text (expected JSON)") from None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise FormatError(f"{where}: not valid JSON ({e})") from None


def metadata_for(
    *,
    batch_size: int,
    sequence_length: int,
    d_in: int,
    batches_per_file: int = 1,
    dtype: Any = "float32",
    hook: str,
    site: str | None = None,
    layer: int | None = None,
    format: str = "safetensors",
    storage_dtype: Any = None,
    model: str | None = None,
    bytes_per_file: int | None = None,
    **extra: Any,
) -> dict:
    """A hook's metadata.json: Activault's fields plus what the hook means.

    `dtype` (Activault's field, which RCache uses to allocate its buffers) is
    the dtype the files hold: `storage_dtype` when given, else the model's
    `dtype` (float32 unless given); `model_dtype` keeps the model's. `shape` is
    one megabatch's `[batch_size * batches_per_file, sequence_length, d_in]`
    (one batch per file unless given). `bytes_per_file` is left out when
    unknown (as Activault does before its first upload).
    """
    model_dtype = activault_dtype_name(dtype)
    stored = activault_dtype_name(storage_dtype) if storage_dtype is not None else model_dtype
    if format not in EXTENSIONS:
        raise ValueError(f"unknown megabatch format {format!r}; allowed: {', '.join(EXTENSIONS)}")
    n = batch_size * batches_per_file
    md: dict[str, Any] = {
        "batch_size": batch_size,
        "sequence_length": sequence_length,
        "dtype": stored,
        "d_in": d_in,
        "batches_per_file": batches_per_file,
        "shape": [n, sequence_length, d_in],
        "input_ids_shape": [n, sequence_length],
    }
    if bytes_per_file is not None:
        md["bytes_per_file"] = int(bytes_per_file)
    md.update(
        {
            "hook": hook,
            "site": site,
            "layer": layer,
            "format": format,
            "storage_dtype": stored,
            "model_dtype": model_dtype,
            "model": model,
        }
    )
    md.update(extra)
    return md


# -- summaries ---------------------------------------------------------------
@dataclass
class HookSummary:
    hook: str
    megabatches: int = 0  # committed files
    bytes: int = 0
    tokens: int = 0
    sequences: int = 0
    uncommitted: int = 0  # files on the store that no commit record names


@dataclass
class RunSummary:
    run: str
    hooks: dict[str, HookSummary]
    megabatches: int  # committed megabatch indices (commit records; Activault: most files of any hook)
    files: int
    bytes: int
    tokens: int  # tokens of the run (each hook sees the same tokens)
    workers: list[int]
    has_commit_records: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """Plain-text table: committed megabatches per hook."""
        width = max([4] + [len(h) for h in self.hooks])
        out = [f"{'hook':<{width}}  {'megabatches':>11}  {'bytes':>15}  {'tokens':>15}"]
        for h in self.hooks.values():
            extra = f"  ({h.uncommitted} uncommitted)" if h.uncommitted else ""
            out.append(f"{h.hook:<{width}}  {h.megabatches:>11}  {h.bytes:>15}  {h.tokens:>15}{extra}")
        out.append(f"{'total':<{width}}  {self.files:>11}  {self.bytes:>15}  {self.tokens:>15}")
        return out


def _natural_key(s: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


# -- the run -----------------------------------------------------------------
class Run:
    """One run `{name}/` on a store: keys, JSON files, commit records, summaries."""

    def __init__(self, store: Store, name: str):
        try:
            norm = normalize_key(str(name)).strip("/")
        except StoreError as e:
            raise StoreError(f"invalid run name {name!r}: {e}") from None
        if not norm:
            raise StoreError(f"invalid run name {name!r}: empty")
        self.store = store
        self.name = norm

    def __repr__(self) -> str:
        return f"Run({self.uri!r})"

    @classmethod
    def at(cls, uri: str) -> Run:
        """The run at `uri` (STORE/RUN_NAME: a local path or an s3:// URI); one line naming it for the store root."""
        from vaultsh.store import open_location

        store, key = open_location(str(uri).rstrip("/") or "/")  # ("/" alone is the root, not "" = the cwd)
        if key.strip("/") in ("", "."):  # "." : a local path's root
            raise UserError(f"{uri}: give the run's URI (store/run_name), not the store root")
        return cls(store, key)

    @property
    def uri(self) -> str:
        return self.store.child_uri(self.name)

    # -- keys --------------------------------------------------------------
    def _check_hook(self, hook: str) -> str:
        if (
            not isinstance(hook, str)
            or not hook
            or "/" in hook
            or "\\" in hook
            or "\x00" in hook
            or hook in (".", "..", INTERNAL)
        ):
            raise ValueError(f"invalid hook directory name {hook!r}")
        return hook

    @property
    def prefix(self) -> str:
        return self.name + "/"

    @property
    def internal_prefix(self) -> str:
        return f"{self.name}/{INTERNAL}/"

    @property
    def cfg_key(self) -> str:
        return f"{self.name}/{CFG}"

    def hook_prefix(self, hook: str) -> str:
        return f"{self.name}/{self._check_hook(hook)}/"

    def metadata_key(self, hook: str) -> str:
        return self.hook_prefix(hook) + METADATA

    def statistics_key(self, hook: str) -> str:
        return self.hook_prefix(hook) + STATISTICS

    def megabatch_key(self, hook: str, worker: int, index: int, fmt: str = "safetensors") -> str:
        return self.hook_prefix(hook) + megabatch_name(worker, index, fmt)

    def worker_files_prefix(self, hook: str, worker: int) -> str:
        """The key prefix of every megabatch file of `worker` under `hook` (see `megabatch_name`)."""
        return f"{self.hook_prefix(hook)}w{_check_nonneg('worker', worker):04d}--"

    def outliers_key(self, hook: str) -> str:
        """Where `vaultsh norms` writes the hook's `median_norm` and outlier tokens (`legacy_outliers_key`: before)."""
        return f"{self.internal_prefix}{OUTLIERS}/{self._check_hook(hook)}.json"

    def legacy_outliers_key(self, hook: str) -> str:
        return self.hook_prefix(hook) + LEGACY_OUTLIERS

    def generations_key(self, worker: int, index: int) -> str:
        """Generation mode: where `worker` stores the texts of its megabatch `index`."""
        return (
            f"{self.internal_prefix}{GENERATIONS}/w{_check_nonneg('worker', worker):04d}/"
            f"{_check_nonneg('index', index):07d}.jsonl"
        )

    def commits_prefix(self, worker: int | None = None) -> str:
        base = f"{self.internal_prefix}{COMMITS}/"
        return base if worker is None else f"{base}w{_check_nonneg('worker', worker):04d}/"

    def commit_key(self, worker: int, index: int) -> str:
        return f"{self.commits_prefix(worker)}{_check_nonneg('index', index):07d}.json"

    def commit_chunks_prefix(self, worker: int | None = None) -> str:
        base = f"{self.internal_prefix}{COMMIT_CHUNKS}/"
        return base if worker is None else f"{base}w{_check_nonneg('worker', worker):04d}/"

    def commit_chunk_key(self, worker: int, last_index: int) -> str:
        return f"{self.commit_chunks_prefix(worker)}{_check_nonneg('index', last_index):07d}.json"

    def partial_stats_prefix(self, worker: int | None = None) -> str:
        base = f"{self.internal_prefix}{PARTIAL_STATS}/"
        return base if worker is None else f"{base}w{_check_nonneg('worker', worker):04d}/"

    def partial_stats_key(self, worker: int, hook: str, index: int) -> str:
        return f"{self.partial_stats_prefix(worker)}{self._check_hook(hook)}/{_check_nonneg('index', index):07d}.safetensors"

    # -- JSON files --------------------------------------------------------
    def _write_json(self, key: str, obj: Any) -> None:
        self.store.put_bytes(key, (pretty_json(obj) + "\n").encode("utf-8"))

    def _read_json(self, key: str) -> Any | None:
        """The parsed JSON at `key`, or None when there is none (one request, size-capped)."""
        limit = MAX_JSON_BYTES
        try:
            data = self.store.get_range(key, 0, limit + 1)
        except NotFoundError:
            return None
        if len(data) > limit:
            raise FormatError(f"{self.store.child_uri(key)}: larger than the {limit}-byte limit for JSON files")
        return _loads(data, self.store.child_uri(key))

    def _read_json_object(self, key: str) -> dict | None:
        obj = self._read_json(key)
        if obj is not None and not isinstance(obj, dict):
            raise FormatError(f"{self.store.child_uri(key)}: expected a JSON object, got {type(obj).__name__}")
        return obj

    def write_cfg(self, cfg: dict) -> None:
        self._write_json(self.cfg_key, cfg)

    def read_cfg(self) -> dict | None:
        """cfg.json, or None when the run has none."""
        return self._read_json_object(self.cfg_key)

    def write_metadata(self, hook: str, metadata: dict) -> None:
        self._write_json(self.metadata_key(hook), metadata)

    def read_metadata(self, hook: str) -> dict | None:
        """The hook's metadata.json, or None when it has none."""
        return self._read_json_object(self.metadata_key(hook))

    def write_statistics(self, hook: str, stats: RunningStats) -> None:
        self._write_json(self.statistics_key(hook), stats.to_activault_json())

    def read_statistics(self, hook: str, count: int | None = None) -> RunningStats | None:
        """The hook's statistics.json as RunningStats, or None when it has none.

        `count` supplies the token count for an Activault file that lacks one.
        """
        key = self.statistics_key(hook)
        obj = self._read_json_object(key)
        if obj is None:
            return None
        return RunningStats.from_activault_json(obj, count=count, where=self.store.child_uri(key))

    # -- partial statistics ------------------------------------------------
    def write_partial_stats(self, worker: int, hook: str, index: int, stats: RunningStats) -> None:
        self.store.put_bytes(self.partial_stats_key(worker, hook, index), stats.to_bytes())

    def read_partial_stats(self, worker: int, hook: str, index: int) -> RunningStats | None:
        key = self.partial_stats_key(worker, hook, index)
        try:
            data = self.store.get_bytes(key)
        except NotFoundError:
            return None
        return RunningStats.from_bytes(data, where=self.store.child_uri(key))

    def list_partial_stats(self, hook: str | None = None, worker: int | None = None) -> list[tuple[int, str, int, str]]:
        """(worker, hook, index, key) of every partial statistics object, sorted."""
        base = self.partial_stats_prefix()
        out = []
        for info in self.store.iter_objects(self.partial_stats_prefix(worker)):
            m = _PARTIAL_RE.match(info.key[len(base) :])
            if not m:
                continue
            w, h, i = int(m.group(1)), m.group(2), int(m.group(3))
            if "/" in h or (hook is not None and h != hook):
                continue
            out.append((w, h, i, info.key))
        out.sort(key=lambda t: (t[0], t[2], t[1]))
        return out

    def merge_partial_stats(
        self, hook: str, cumulative: bool = False, committed_only: bool = True, d: int | None = None
    ) -> RunningStats | None:
        """Merge the hook's per-worker partial statistics.

        `cumulative=False`: each partial covers one megabatch; all are merged.
        `cumulative=True`: each covers a worker's megabatches 0..index; the
        latest per worker is taken. With `committed_only`, partials whose
        megabatch has no commit record are ignored (when the run has any).
        Returns None when there is nothing to merge (and no `d`).
        """
        if cumulative and committed_only:
            return self._merge_latest_committed(hook, d)
        items = self.list_partial_stats(hook)
        if committed_only:
            done = {(w, i) for w, i, _ in self.list_commit_keys()}
            if done:
                items = [t for t in items if (t[0], t[2]) in done]
        if cumulative:
            latest: dict[int, tuple] = {}
            for t in items:
                if t[0] not in latest or t[2] > latest[t[0]][2]:
                    latest[t[0]] = t
            items = sorted(latest.values())

        def load(t: tuple) -> RunningStats:
            return RunningStats.from_bytes(self.store.get_bytes(t[3]), where=self.store.child_uri(t[3]))

        stats = self._parallel(load, items)
        if not stats:
            return RunningStats(d) if d is not None else None
        return merge_all(stats)

    def _merge_latest_committed(self, hook: str, d: int | None) -> RunningStats | None:
        """Each worker's newest cumulative snapshot that has a commit record, merged in worker order.

        Costs one listing of the (small) partial-statistics prefix plus a HEAD
        per candidate, never a listing of every commit record of the run, so a
        worker can afford it while the run grows. A snapshot deleted under us
        (its worker committed a newer one meanwhile) makes that worker be
        looked at again.
        """
        any_commits: bool | None = None
        by_worker: dict[int, list[tuple]] = {}
        for t in self.list_partial_stats(hook):
            by_worker.setdefault(t[0], []).append(t)

        def pick(w: int, candidates: list[tuple]) -> RunningStats | None:
            nonlocal any_commits
            for _attempt in range(3):
                for t in sorted(candidates, key=lambda t: -t[2]):
                    if not self.store.exists(self.commit_key(w, t[2])):
                        continue
                    try:
                        data = self.store.get_bytes(t[3])
                    except NotFoundError:
                        break  # replaced by a newer snapshot: list this worker again
                    return RunningStats.from_bytes(data, where=self.store.child_uri(t[3]))
                else:
                    if any_commits is None:
                        any_commits = self.has_commit_records()
                    if any_commits or not candidates:
                        return None
                    t = max(candidates, key=lambda t: t[2])  # a run without commit records: take the newest
                    return RunningStats.from_bytes(self.store.get_bytes(t[3]), where=self.store.child_uri(t[3]))
                candidates = [t for t in self.list_partial_stats(hook, worker=w)]
            return None

        picked = self._parallel(lambda w: pick(w, by_worker[w]), sorted(by_worker))
        stats = [s for s in picked if s is not None]
        if not stats:
            return RunningStats(d) if d is not None else None
        return merge_all(stats)

    # -- commit records ----------------------------------------------------
    def commit(self, record: CommitRecord) -> str:
        """Store `record` as its own object (so workers never share a file); returns its key."""
        if not isinstance(record, CommitRecord):
            raise TypeError(f"expected a CommitRecord, got {type(record).__name__}")
        # Validate through the same strict parser readers use.
        CommitRecord.from_dict(json.loads(record.to_json()), "commit record")
        for hook, f in record.files.items():
            if f.key != self.hook_prefix(hook) + f.name:
                raise ValueError(f"file {f.key!r} of hook {hook!r} is not in {self.hook_prefix(hook)!r}")
        key = self.commit_key(record.worker, record.index)
        self.store.put_bytes(key, self.record_bytes(record))
        return key

    @staticmethod
    def record_bytes(record: CommitRecord) -> bytes:
        """A commit record exactly as `commit` stores it."""
        return (record.to_json() + "\n").encode("utf-8")

    def write_commit_chunk(self, records: list[CommitRecord]) -> str:
        """Store copies of consecutive commit records of one worker in one object, for fast reading.

        The records stay the source of truth: a reader takes a chunk's copy of a
        record only while the record itself is listed with the copy's size and
        no newer than the chunk, and reads it directly otherwise.
        """
        if not records:
            raise ValueError("an empty commit chunk")
        w = records[0].worker
        if any(r.worker != w for r in records) or [r.index for r in records] != list(
            range(records[0].index, records[0].index + len(records))
        ):
            raise ValueError("a commit chunk holds consecutive records of one worker")
        entries = [
            {"key": self.commit_key(r.worker, r.index), "size": len(self.record_bytes(r)), "record": r.to_dict()}
            for r in records
        ]
        key = self.commit_chunk_key(w, records[-1].index)
        self.store.put_bytes(
            key,
            json.dumps(
                {"format": "vaultsh-commit-chunk", "version": 1, "records": entries}, separators=(",", ":")
            ).encode("utf-8"),
        )
        return key

    def list_commit_keys(self, worker: int | None = None) -> list[tuple[int, int, str]]:
        """(worker, index, key) of every commit record (of one worker when given), sorted; one listing, no reads."""
        return [(w, i, info.key) for w, i, info in self._commit_objects(worker)]

    def _commit_objects(self, worker: int | None = None) -> list[tuple[int, int, ObjectInfo]]:
        """(worker, index, listing entry) of every commit record, sorted; names only, no reads."""
        base = self.commits_prefix()
        out = []
        for info in self.store.iter_objects(self.commits_prefix(worker)):
            m = _COMMIT_RE.match(info.key[len(base) :])
            if m:
                out.append((int(m.group(1)), int(m.group(2)), info))
        out.sort(key=lambda t: (t[0], t[1]))
        return out

    def _parallel(self, fn, items: list) -> list:
        if len(items) <= 2:
            return [fn(t) for t in items]
        with ThreadPoolExecutor(max_workers=min(_PARALLEL_READS, len(items))) as ex:
            return list(ex.map(fn, items))

    def read_commit(self, t: tuple[int, int, str]) -> CommitRecord | None:
        """The commit record at (worker, index, key), as `list_commit_keys` gives it; None when it is gone."""
        worker, index, key = t
        obj = self._read_json(key)
        if obj is None:  # deleted between listing and reading
            return None
        return self.parse_commit(obj, worker, index, self.store.child_uri(key))

    def parse_commit(self, obj: Any, worker: int, index: int, where: str) -> CommitRecord:
        """A commit record's JSON object, checked against the worker and index its key names, its file keys
        re-rooted on this run; FormatError (naming `where`) when it is not a valid record."""
        rec = CommitRecord.from_dict(obj, where)
        if (rec.worker, rec.index) != (worker, index):
            raise FormatError(
                f"{where}: record names worker {rec.worker} index {rec.index}, but its key says worker {worker} index {index}"
            )
        # Files live directly in their hook directory; re-root each key on this
        # run, so a run read through another store root (or copied under a new
        # name) still finds its files.
        for hook, f in rec.files.items():
            try:
                f.key = self.hook_prefix(hook) + f.name
            except ValueError:
                raise FormatError(f"{where}: invalid hook name {hook!r}") from None
            if f.name in ("", METADATA, STATISTICS):
                raise FormatError(f"{where}: files[{hook!r}] does not name a megabatch file")
        return rec

    def iter_commits(self, worker: int | None = None, known: dict | None = None) -> list[CommitRecord]:
        """Every commit record (of one worker, or all), sorted by (worker, index).

        `known` (a dict the caller keeps between calls) makes repeated calls
        incremental: a record listed with the same size and mtime as last time
        is taken from it, only new or changed ones are read, and records gone
        from the store leave it. For a shell or viewer polling a big run.
        Records that a commit chunk holds a current copy of come from the chunk
        (one GET per 100 records; see `write_commit_chunk`).
        """
        objects = self._commit_objects(worker)
        stamp = {o.key: (o.size, o.mtime) for _, _, o in objects}
        if known is None:
            known = {}
        for key in [k for k, (st, _) in known.items() if stamp.get(k) != st]:
            del known[key]
        if len(known) < len(objects):
            for key, rec in self._chunked_records(
                worker, {o.key: o for _, _, o in objects if o.key not in known}
            ).items():
                known[key] = (stamp[key], rec)
        todo = [(w, i, o.key) for w, i, o in objects if o.key not in known]
        for (_, _, key), rec in zip(todo, self._parallel(self.read_commit, todo)):
            if rec is not None:
                known[key] = (stamp[key], rec)
        return [known[o.key][1] for _, _, o in objects if o.key in known]

    def read_commit_chunk(self, key: str) -> list:
        """The raw entries of the commit chunk at `key` (FormatError when it is not one)."""
        doc = self._read_json(key)
        entries = doc.get("records") if isinstance(doc, dict) and doc.get("format") == "vaultsh-commit-chunk" else None
        if not isinstance(entries, list):
            raise FormatError(f"{self.store.child_uri(key)}: not a vaultsh commit chunk")
        return entries

    def chunk_entry_key(self, entry: Any) -> tuple[str, int, int] | None:
        """(record key, worker, index) a chunk entry copies; None for an entry that names no commit record."""
        prefix = self.commits_prefix()
        key = entry.get("key") if isinstance(entry, dict) else None
        if not isinstance(key, str) or not key.startswith(prefix):
            return None
        m = _COMMIT_RE.match(key[len(prefix) :])
        return None if m is None else (key, int(m.group(1)), int(m.group(2)))

    def _chunked_records(self, worker: int | None, wanted: dict[str, ObjectInfo]) -> dict[str, CommitRecord]:
        """Records of `wanted` (key -> listing) that commit chunks hold a current copy of.

        A chunk entry counts when its record is listed with the entry's size and
        is no newer than the chunk; a chunk that cannot be read or parsed is
        skipped (its records are then read one by one).
        """
        if not wanted:
            return {}
        chunks = [o for o in self.store.iter_objects(self.commit_chunks_prefix(worker)) if o.key.endswith(".json")]

        def read(chunk: ObjectInfo) -> dict[str, CommitRecord]:
            out: dict[str, CommitRecord] = {}
            try:
                for entry in self.read_commit_chunk(chunk.key):
                    parsed = self.chunk_entry_key(entry)
                    if parsed is None:
                        continue
                    key, w, i = parsed
                    listed = wanted.get(key)
                    if listed is None or listed.size != entry.get("size"):
                        continue
                    if listed.mtime is not None and chunk.mtime is not None and listed.mtime > chunk.mtime:
                        continue  # the record was rewritten after the chunk
                    out[key] = self.parse_commit(entry.get("record"), w, i, self.store.child_uri(key))
            except (UserError, ValueError, TypeError, AttributeError):
                return {}  # an unreadable chunk is only a lost shortcut
            return out

        found: dict[str, CommitRecord] = {}
        for part in self._parallel(read, chunks):
            found.update(part)
        return found

    def committed_indices(self, worker: int) -> list[int]:
        """Sorted megabatch indices of `worker` that have a commit record (names only, no reads)."""
        return [i for _, i, _ in self.list_commit_keys(worker)]

    def last_committed_index(self, worker: int) -> int | None:
        idx = self.committed_indices(worker)
        return idx[-1] if idx else None

    def has_commit_records(self) -> bool:
        for _ in self.store.iter_objects(self.commits_prefix()):
            return True
        return False

    # -- hooks and files ---------------------------------------------------
    def hooks(self) -> list[str]:
        """Hook directories of the run (they hold metadata.json or megabatch files), naturally sorted."""
        out = []
        for p in self.store.list_dir(self.prefix).prefixes:
            hook = p[len(self.prefix) :].strip("/")
            if not hook or hook == INTERNAL or "/" in hook:
                continue
            if self.store.exists(f"{self.prefix}{hook}/{METADATA}"):
                out.append(hook)
                continue
            listing = self.store.list_dir(p)
            if any(megabatch_format(o.name) for o in listing.objects):
                out.append(hook)
        return sorted(out, key=_natural_key)

    def _hook_objects(self, hook: str) -> list[ObjectInfo]:
        """Every object under the hook directory except metadata.json/statistics.json/_outliers.json (legacy)."""
        prefix = self.hook_prefix(hook)
        skip = {prefix + METADATA, prefix + STATISTICS, prefix + LEGACY_OUTLIERS}
        return [o for o in self.store.iter_objects(prefix) if o.key not in skip]

    @staticmethod
    def _committed_from(commits: Iterable[CommitRecord], hook: str) -> list[FileRecord]:
        out = []
        for c in commits:
            f = c.files.get(hook)
            if f is not None:
                out.append(f)
        return out

    def _tokens_per_file(self, hook: str) -> tuple[int, int]:
        try:
            md = self.read_metadata(hook)
        except FormatError:
            md = None
        shape = md.get("shape") if md else None
        if (
            isinstance(shape, list)
            and len(shape) >= 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape[:2])
        ):
            return shape[0], shape[0] * shape[1]
        return 0, 0

    def _all_as_committed(self, hook: str) -> list[FileRecord]:
        seqs, toks = self._tokens_per_file(hook)
        out = []
        for o in self._hook_objects(hook):
            parsed = parse_megabatch_name(o.name)
            out.append(
                FileRecord(
                    hook=hook,
                    key=o.key,
                    size=o.size,
                    sha256=None,
                    n_sequences=seqs,
                    n_tokens=toks,
                    worker=parsed[0] if parsed else None,
                    index=parsed[1] if parsed else None,
                )
            )
        return out

    def committed_files(self, hook: str, commits: list[CommitRecord] | None = None) -> list[FileRecord]:
        """The hook's committed files, in (worker, index) order.

        From the commit records when the run has any (files no record names are
        ignored); otherwise (an Activault run) every object under the hook
        directory except metadata.json/statistics.json, in key order.
        """
        self._check_hook(hook)
        if commits is None:
            commits = self.iter_commits()
        if commits:
            return self._committed_from(commits, hook)
        return self._all_as_committed(hook)

    def uncommitted_files(self, hook: str, commits: list[CommitRecord] | None = None) -> list[ObjectInfo]:
        """Objects under the hook directory that no commit record names (none when the run has no records)."""
        self._check_hook(hook)
        if commits is None:
            commits = self.iter_commits()
        if not commits:
            return []
        named = {f.key for f in self._committed_from(commits, hook)}
        return [o for o in self._hook_objects(hook) if o.key not in named]

    def summary(self) -> RunSummary:
        """Committed megabatches, bytes and tokens per hook, totals and workers seen."""
        commits = self.iter_commits()
        hook_names = set(self.hooks())
        for c in commits:
            hook_names.update(c.files)
        hooks: dict[str, HookSummary] = {}
        workers_seen: set[int] = set()
        for hook in sorted(hook_names, key=_natural_key):
            files = self.committed_files(hook, commits)
            workers_seen.update(f.worker for f in files if f.worker is not None)
            hs = HookSummary(
                hook=hook,
                megabatches=len(files),
                bytes=sum(f.size for f in files),
                tokens=sum(f.n_tokens for f in files),
                sequences=sum(f.n_sequences for f in files),
                uncommitted=len(self.uncommitted_files(hook, commits)) if commits else 0,
            )
            hooks[hook] = hs
        if commits:
            megabatches = len(commits)
            tokens = sum(c.tokens for c in commits)
            if tokens == 0:
                tokens = max((h.tokens for h in hooks.values()), default=0)
            workers = sorted({c.worker for c in commits})
        else:
            megabatches = max((h.megabatches for h in hooks.values()), default=0)
            tokens = max((h.tokens for h in hooks.values()), default=0)
            workers = sorted(workers_seen)
        return RunSummary(
            run=self.name,
            hooks=hooks,
            megabatches=megabatches,
            files=sum(h.megabatches for h in hooks.values()),
            bytes=sum(h.bytes for h in hooks.values()),
            tokens=tokens,
            workers=workers,
            has_commit_records=bool(commits),
        )
