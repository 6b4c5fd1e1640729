"""`vaultsh verify OUT` for an export: are the finished shards whole, and what the manifest says?

Read-only. For every shard the manifest calls finished: the object exists
with the recorded size, ends in a Parquet footer, and that footer (read with
ranged reads only, never the whole shard) holds the recorded row count and
this export's fingerprint. Parquet files the plan does not name are
reported too. Shards not written yet are counted, not problems: the same
`vaultsh export` command finishes them (and rewrites any shard found broken).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from vaultsh.errors import FormatError, UserError
from vaultsh.export.core import shard_intact
from vaultsh.export.manifest import MANIFEST, load_manifest, stray_parquet
from vaultsh.store import Store
from vaultsh.verify import SCREEN_PROBLEMS, ProblemReport, problem_lines


@dataclass
class ExportCheck(ProblemReport):
    """The outcome of checking one export directory."""

    shards_total: int = 0
    shards_finished: int = 0
    rows: int = 0
    bytes: int = 0

    def to_json(self) -> dict:
        return {
            "uri": self.uri,
            "kind": "export",
            "ok": self.ok,
            **self.counts_json(),
            "problems": self.problems_json(),
        }

    def lines(self, limit: int = SCREEN_PROBLEMS) -> list[tuple[str, str]]:
        out = problem_lines(self.problems, limit)
        left = self.shards_total - self.shards_finished
        summary = (
            f"export {self.uri}: {self.shards_finished} of {self.shards_total} shards finished, "
            f"{self.rows:,} rows, {self.bytes:,} bytes"
        )
        if left:
            summary += f"; {left} not written yet (run the same vaultsh export command to finish)"
        if self.problems:
            out.append(
                (
                    "red",
                    f"{summary}; {len(self.problems)} problem(s): run the same vaultsh export command "
                    "to rewrite broken shards",
                )
            )
        else:
            out.append(("green", "✅ " + summary))
        return out


class _RangeFile(io.RawIOBase):
    """A seekable read-only file over one stored object, read by ranged requests (for pyarrow).

    `tell`, `read` and `readall` are io.RawIOBase's, built on `seek` and `readinto`.
    """

    def __init__(self, store: Store, key: str, size: int):
        self.store, self.key, self.size, self.pos = store, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), max(0, self.size - self.pos))
        if n == 0:
            return 0
        data = self.store.get_range(self.key, self.pos, n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _footer(store: Store, name: str, size: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_metadata(pa.PythonFile(_RangeFile(store, name, size), mode="r"))


def check_export(out: Store) -> ExportCheck:
    """Check the export in `out` (a store rooted at OUT); a UserError when OUT holds no export."""
    manifest = load_manifest(out)
    if manifest is None:
        raise UserError(f"{out.uri}: no {MANIFEST} here: not a vaultsh export")
    plan = manifest.plan
    report = ExportCheck(out.uri, shards_total=len(plan.shards))
    listing = {o.name: o.size for o in out.list_dir("").objects}
    for name in stray_parquet(sorted(listing), plan):
        report.problem(out.child_uri(name), "stray", "a Parquet file this export's plan does not name")
    for shard in plan.shards:
        name = shard["name"]
        done = manifest.finished.get(name)
        if done is None:
            continue
        report.shards_finished += 1
        where = out.child_uri(name)
        nbytes, listed = done.get("bytes"), listing.get(name)
        if listed is None:
            report.problem(where, "missing", "the manifest calls it finished, but it is not there")
            continue
        if not shard_intact(out, name, nbytes, listed):
            recorded = f"{nbytes:,}" if isinstance(nbytes, int) else "no size"
            report.problem(
                where,
                "cut",
                f"{listed:,} bytes, the manifest recorded {recorded} and a Parquet "
                "footer at the end (cut short by a crash or power loss?)",
            )
            continue
        try:
            meta = _footer(out, name, listed)
        except Exception as exc:  # noqa: BLE001 - any unreadable footer is this shard's problem
            report.problem(where, "footer", f"unreadable Parquet footer: {str(exc).splitlines()[0][:160]}")
            continue
        if meta.num_rows != done.get("rows") or meta.num_rows != shard["rows"]:
            report.problem(
                where, "rows", f"{meta.num_rows:,} rows, the manifest says {done.get('rows')} (plan: {shard['rows']:,})"
            )
            continue
        raw = (meta.metadata or {}).get(b"vaultsh.export")
        try:
            fingerprint = json.loads(raw.decode()).get("fingerprint") if raw else None
        except (ValueError, UnicodeDecodeError, AttributeError):
            fingerprint = None
        if fingerprint != manifest.fingerprint:
            report.problem(
                where, "foreign", "its footer does not name this export (written by another export or another tool)"
            )
            continue
        report.rows += meta.num_rows
        report.bytes += listed
    return report


def holds_export(store: Store, key: str) -> bool:
    """True when `key` (a directory of `store`) holds an export manifest."""
    try:
        return store.exists(f"{key.strip('/')}/{MANIFEST}" if key.strip("/") else MANIFEST)
    except (UserError, FormatError):
        return False
