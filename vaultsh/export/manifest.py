"""The export's plan and its manifest: what goes in which shard, and which shards are done.

The manifest (`vaultsh-export.json` in OUT) is written before the first shard
and rewritten (atomically) after each finished one. It holds the whole plan:
the source files (fixed when the export started, so a run that keeps growing
does not change an export half-way), the options, and every shard's name and
rows. Resuming reads the plan back instead of listing the run again; a shard
not in `finished` is (re)written under its deterministic name, replacing any
half-finished upload, so rows are never duplicated.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from vaultsh.errors import FormatError, UserError
from vaultsh.store import Store

MANIFEST = "vaultsh-export.json"
MANIFEST_FORMAT = "vaultsh-export"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20
SPLIT = "train"


@dataclass(frozen=True)
class ExportOptions:
    """What the user asked for (everything that decides the rows and their order)."""

    mode: str = "sequences"  # "sequences" | "tokens"
    dtype: str = "auto"
    label_columns: tuple[str, ...] | None = None  # None: every label present in all files
    batches_per_shard: int = 50
    shuffle: bool = False
    seed: int = 0
    compression: str = "none"  # codec of the states column (other columns: zstd)

    def identity(self) -> dict[str, Any]:
        """The options that make two exports the same export (max-shards and workers do not)."""
        return {
            "mode": self.mode,
            "dtype": self.dtype,
            "label_columns": None if self.label_columns is None else list(self.label_columns),
            "batches_per_shard": self.batches_per_shard,
            "shuffle": self.shuffle,
            "seed": self.seed if self.shuffle else None,
            "compression": self.compression,
        }

    def flags(self) -> str:
        """The options as command-line flags, for messages and the dataset card."""
        parts = [f"--{self.mode}", f"--dtype {self.dtype}", f"--batches-per-shard {self.batches_per_shard}"]
        if self.label_columns is not None:
            parts.append("--label-columns " + " ".join(self.label_columns) if self.label_columns else "--label-columns")
        if self.shuffle:
            parts.append(f"--shuffle --seed {self.seed}")
        if self.compression != "none":
            parts.append(f"--compression {self.compression}")
        return " ".join(parts)


@dataclass
class Plan:
    """Everything decided before the first row is written."""

    source: dict[str, Any]  # uri, run, hook, model, metadata facts
    options: dict[str, Any]  # ExportOptions.identity()
    dtype: str  # resolved states dtype of the export
    labels: list[str]  # label columns exported
    label_types: dict[str, list]  # name -> [stored dtype, trailing shape]
    shape: dict[str, Any]  # seq_len, d_model, stored_dtype, ids_dtype
    files: list[
        dict[str, Any]
    ]  # name, size, sequences, tokens (unmasked; None until written when not known up front), rows
    shards: list[dict[str, Any]]  # name, files [start, stop], rows

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `plan`: every field under its own name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Plan:
        try:
            plan = cls(**{f.name: d[f.name] for f in fields(cls)})
            for s in plan.shards:
                _shard_name_ok(s["name"], where)
                int(s["rows"]), int(s["files"][0]), int(s["files"][1])
            for f in plan.files:
                str(f["name"]), int(f["size"]), int(f["rows"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise FormatError(f"{where}: not a valid export manifest (plan: {exc!r})") from None
        return plan

    @property
    def total_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)


def _shard_name_ok(name: Any, where: str) -> None:
    if (
        not isinstance(name, str)
        or "/" in name
        or "\\" in name
        or not name.endswith(".parquet")
        or name.startswith(".")
    ):
        raise FormatError(f"{where}: bad shard name {name!r}")


def shard_name(i: int, n: int) -> str:
    """`train-00003-of-00012.parquet` (the split name Hugging Face infers from the file name)."""
    return f"{SPLIT}-{i:05d}-of-{n:05d}.parquet"


def plan_shards(rows_per_file: list[int], batches_per_shard: int) -> list[dict[str, Any]]:
    """Consecutive groups of `batches_per_shard` megabatches; a shuffled export keeps the same row counts."""
    n = max(1, math.ceil(len(rows_per_file) / batches_per_shard))
    out = []
    for i in range(n):
        a, b = i * batches_per_shard, min(len(rows_per_file), (i + 1) * batches_per_shard)
        out.append({"name": shard_name(i, n), "files": [a, b], "rows": int(sum(rows_per_file[a:b]))})
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    plan: Plan
    finished: dict[str, dict[str, int]] = field(default_factory=dict)  # shard name -> rows, bytes
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    command: str = ""

    @property
    def fingerprint(self) -> str:
        ident = {"source": self.plan.source.get("uri"), "options": self.plan.options}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "format": MANIFEST_FORMAT,
                    "version": MANIFEST_VERSION,
                    "fingerprint": self.fingerprint,
                    "created": self.created,
                    "updated": self.updated,
                    "command": self.command,
                    "finished": self.finished,
                    "plan": self.plan.to_dict(),
                },
                indent=1,
            )
            + "\n"
        )

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            d = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{where}: not a valid export manifest (not JSON: {exc})") from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise FormatError(f"{where}: not a vaultsh export manifest")
        if not isinstance(d.get("version"), int) or d["version"] > MANIFEST_VERSION:
            raise FormatError(f"{where}: export manifest version {d.get('version')!r} is newer than this vaultsh reads")
        plan = Plan.from_dict(d.get("plan"), where)
        finished = d.get("finished")
        if not isinstance(finished, dict):
            raise FormatError(f"{where}: not a valid export manifest (finished)")
        names = {s["name"] for s in plan.shards}
        for k, v in finished.items():
            if k not in names or not isinstance(v, dict):
                raise FormatError(f"{where}: finished shard {k!r} is not in the plan")
        return cls(plan, finished, str(d.get("created", "")), str(d.get("updated", "")), str(d.get("command", "")))

    def save(self, store: Store) -> None:
        self.updated = _now()
        store.put_bytes(MANIFEST, self.to_json().encode("utf-8"))


def load_manifest(store: Store) -> Manifest | None:
    """The manifest in OUT, or None when there is none."""
    if not store.exists(MANIFEST):
        return None
    where = store.child_uri(MANIFEST)
    if store.head(MANIFEST).size > MAX_MANIFEST_BYTES:
        raise FormatError(f"{where}: larger than {MAX_MANIFEST_BYTES} bytes: not an export manifest")
    return Manifest.from_json(store.get_bytes(MANIFEST), where)


def check_same_export(existing: Manifest, source_uri: str, options: ExportOptions, out_uri: str) -> None:
    """Refuse to resume into OUT when its manifest describes a different export."""
    have_src = existing.plan.source.get("uri")
    want = options.identity()
    diffs = []
    if have_src != source_uri:
        diffs.append(f"source {have_src} (not {source_uri})")
    for k, v in want.items():
        if existing.plan.options.get(k) != v:
            diffs.append(f"{k}={existing.plan.options.get(k)!r} (not {v!r})")
    if diffs:
        raise UserError(
            f"{out_uri} already holds a different export ({'; '.join(diffs)}): "
            "use another OUT, or delete it to start over"
        )


def stray_parquet(names: list[str], plan: Plan | None) -> list[str]:
    """Parquet files in OUT that the plan does not name (another tool's data would mix in)."""
    mine = {s["name"] for s in plan.shards} if plan else set()
    return sorted(n for n in names if n.endswith(".parquet") and n not in mine)


def check_label_columns(requested: tuple[str, ...] | None, available: dict[str, Any]) -> list[str]:
    """The label columns to export; an unknown name is a one-line error listing the known ones."""
    if requested is None:
        return sorted(available)
    unknown = [n for n in requested if n not in available]
    if unknown:
        have = ", ".join(sorted(available)) or "none: these megabatches carry no labels"
        raise UserError(f"unknown label column {unknown[0]!r} (labels in every megabatch: {have})")
    return list(dict.fromkeys(requested))
