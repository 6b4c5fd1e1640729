"""Finalize a run: merge every worker's statistics exactly and record totals in cfg.json.

Each worker keeps, per hook, a cumulative statistics snapshot of its committed
megabatches under `{run}/_vaultsh/stats/wNNNN/{hook}/` (see vaultsh/run.py).
`finalize` takes, for every worker, the snapshot of its last committed
megabatch, checks that its token count equals the tokens the commit records
hold for that worker, merges the workers in index order (Chan's parallel
update in float64) and writes `{hook}/statistics.json`. A worker whose
snapshot is missing or disagrees with its commit records is recomputed from
its stored megabatch files (safetensors keep the mask, so that is exact).

Finalize is idempotent: a second call on an unchanged run writes nothing.
Nothing here deletes data; uncommitted files are only counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from vaultsh.errors import FormatError, NotFoundError, UserError
from vaultsh.run import CommitRecord, Run, pretty_json
from vaultsh.stats import RunningStats, merge_all
from vaultsh.store.base import Store

__all__ = ["HookResult", "FinalizeReport", "finalize", "open_run", "worker_stats_from_files"]


@dataclass
class HookResult:
    """What finalize found and wrote for one hook."""

    hook: str
    files: int = 0
    bytes: int = 0
    tokens: int = 0  # tokens the commit records hold (mask true)
    count: int = 0  # tokens in the merged statistics
    mean_norm: float = 0.0
    workers: list[int] = field(default_factory=list)
    recomputed: list[int] = field(default_factory=list)  # workers recomputed from their files
    uncommitted: int = 0
    written: bool = False  # statistics.json changed


@dataclass
class FinalizeReport:
    run: str
    uri: str
    num_runs: int | None
    hooks: dict[str, HookResult]
    megabatches: int
    files: int
    bytes: int
    tokens: int
    sequences: int
    batches: int
    planned_batches: int | None
    workers: list[int]
    missing_workers: list[int]  # indices < num_runs with no commit at all
    cfg_written: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.cfg_written or any(h.written for h in self.hooks.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["changed"] = self.changed
        return d


def open_run(uri: str) -> Run:
    """The run at `uri` (`s3://bucket/[prefix/]run` or a local directory), writable."""
    from pathlib import Path

    from vaultsh.store import is_s3_uri, open_store, split_uri

    uri = str(uri).rstrip("/")
    if is_s3_uri(uri):
        root, key = split_uri(uri)
        if not key.strip("/"):
            raise UserError(f"{uri}: give a run, e.g. s3://BUCKET/RUN_NAME")
        store = open_store(root)
        name = key
    else:
        path = Path(uri).expanduser().resolve()
        if not path.is_dir():
            raise NotFoundError(f"{uri}: no such directory")
        store = open_store(str(path.parent), create=False)
        name = path.name
    run = Run(store, name)
    if not store.exists(run.cfg_key) and not run.has_commit_records():
        raise NotFoundError(f"{run.uri}: not a run (no cfg.json and no commit records)")
    return run


def worker_stats_from_files(store: Store, commits: list[CommitRecord], hook: str, d: int | None) -> RunningStats | None:
    """Statistics of `hook` recomputed from the stored files the commit records name (in order)."""
    from vaultsh.megabatch import read_megabatch

    out = RunningStats(d) if d else None
    for c in commits:
        f = c.files.get(hook)
        if f is None:
            continue
        mb = read_megabatch(store, f.key, names=["states", "mask"])
        assert mb.header is not None and mb.states is not None  # read_megabatch sets the header; states asked for
        if mb.header.format != "safetensors":
            raise FormatError(
                f"{store.child_uri(f.key)}: statistics can only be recomputed from safetensors files (they keep the mask)"
            )
        s = RunningStats(int(mb.states.shape[-1])).update(mb.states, mb.mask)
        out = s if out is None else out.merge_(s)
    return out


def _d_model(cfg: dict | None, run: Run, hook: str) -> int | None:
    md = None
    try:
        md = run.read_metadata(hook)
    except FormatError:
        pass
    for v in ((md or {}).get("d_in"), ((cfg or {}).get("model") or {}).get("d_model")):
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _planned_batches(cfg: dict | None) -> int | None:
    data = ((cfg or {}).get("config") or {}).get("data") or {}
    n, start = data.get("n_batches"), data.get("start_batch", 0) or 0
    if isinstance(n, int) and isinstance(start, int):
        return max(0, n - start)
    return None


def _merge_hook(
    run: Run,
    hook: str,
    by_worker: dict[int, list[CommitRecord]],
    d: int | None,
    recompute: bool,
    res: HookResult,
    warnings: list[str],
) -> RunningStats | None:
    parts: list[RunningStats] = []
    for w in sorted(by_worker):
        mine = [c for c in by_worker[w] if hook in c.files]
        if not mine:
            continue
        want = sum(c.files[hook].n_tokens for c in mine)
        snap = None if recompute else run.read_partial_stats(w, hook, mine[-1].index)
        if not recompute and snap is None:
            warnings.append(
                f"{hook}: worker {w} has no statistics snapshot for megabatch {mine[-1].index}: "
                "recomputing from its files"
            )
        elif snap is not None and snap.count != want:
            warnings.append(
                f"{hook}: worker {w}'s statistics snapshot counts {snap.count} tokens, "
                f"its commit records {want}: recomputing from its files"
            )
            snap = None
        if snap is None:
            snap = worker_stats_from_files(run.store, mine, hook, d)
            res.recomputed.append(w)
        if snap is not None:
            parts.append(snap)
    if not parts:
        return None
    return merge_all(parts)


def finalize(run: Run, *, recompute: bool = False, dry_run: bool = False) -> FinalizeReport:
    """Merge every worker's statistics into `{hook}/statistics.json` and write cfg.json totals.

    `recompute` ignores the snapshots and recomputes every worker from its
    files. `dry_run` computes everything and writes nothing.
    """
    cfg = run.read_cfg()
    commits = run.iter_commits()
    if not commits:
        raise UserError(f"{run.uri}: no committed megabatches (nothing to finalize)")
    num_runs = cfg.get("num_runs") if isinstance(cfg, dict) else None
    num_runs = num_runs if isinstance(num_runs, int) and not isinstance(num_runs, bool) else None
    by_worker: dict[int, list[CommitRecord]] = {}
    for c in commits:
        by_worker.setdefault(c.worker, []).append(c)
    hook_names = list(dict.fromkeys([h for h in run.hooks()] + [h for c in commits for h in c.files]))
    warnings: list[str] = []
    results: dict[str, HookResult] = {}
    for hook in hook_names:
        files = run.committed_files(hook, commits)
        res = HookResult(
            hook=hook,
            files=len(files),
            bytes=sum(f.size for f in files),
            tokens=sum(f.n_tokens for f in files),
            workers=sorted({f.worker for f in files if f.worker is not None}),
            uncommitted=len(run.uncommitted_files(hook, commits)),
        )
        results[hook] = res
        merged = _merge_hook(run, hook, by_worker, _d_model(cfg, run, hook), recompute, res, warnings)
        if merged is None:
            continue
        res.count, res.mean_norm = merged.count, merged.mean_norm
        if merged.count != res.tokens:
            warnings.append(f"{hook}: merged statistics count {merged.count} tokens, commit records {res.tokens}")
        new = (pretty_json(merged.to_activault_json()) + "\n").encode("utf-8")
        try:
            old = run.store.get_bytes(run.statistics_key(hook))
        except NotFoundError:
            old = None
        if old != new:
            res.written = True
            if not dry_run:
                run.store.put_bytes(run.statistics_key(hook), new)

    workers = sorted(by_worker)
    missing = [w for w in range(num_runs) if w not in by_worker] if num_runs else []
    totals: dict[str, Any] = {
        "megabatches": len(commits),
        "files": sum(r.files for r in results.values()),
        "bytes": sum(r.bytes for r in results.values()),
        "tokens": sum(c.tokens for c in commits),
        "sequences": max((sum(f.n_sequences for f in run.committed_files(h, commits)) for h in results), default=0),
        "batches": sum(c.batch_end - c.batch_start for c in commits)
        if not num_runs
        else sum(len(range(c.batch_start, c.batch_end, num_runs)) for c in commits),
        "workers": workers,
        "hooks": {h: {"files": r.files, "bytes": r.bytes, "tokens": r.tokens} for h, r in results.items()},
    }
    cfg_written = False
    if isinstance(cfg, dict):
        old_totals = {k: v for k, v in (cfg.get("totals") or {}).items() if k != "finalized"}
        if old_totals != totals:
            cfg_written = True
            if not dry_run:
                cfg["totals"] = {**totals, "finalized": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                run.write_cfg(cfg)
    else:
        warnings.append("no cfg.json: totals not recorded")
    return FinalizeReport(
        run=run.name,
        uri=run.uri,
        num_runs=num_runs,
        hooks=results,
        megabatches=totals["megabatches"],
        files=totals["files"],
        bytes=totals["bytes"],
        tokens=totals["tokens"],
        sequences=totals["sequences"],
        batches=totals["batches"],
        planned_batches=_planned_batches(cfg),
        workers=workers,
        missing_workers=missing,
        cfg_written=cfg_written,
        warnings=warnings,
    )


def summary_lines(report: FinalizeReport, dry_run: bool = False) -> list[str]:
    """A one-screen plain-text summary of a finalize report."""
    import humanize

    out = [f"run {report.uri}"]
    planned = f" of {report.planned_batches:,} planned" if report.planned_batches is not None else ""
    out.append(
        f"  {report.megabatches:,} megabatches, {report.batches:,} batches{planned}, {report.tokens:,} tokens, "
        f"{humanize.naturalsize(report.bytes, binary=True)} in {report.files:,} files"
    )
    wk = f"  workers with commits: {_ranges(report.workers)}"
    if report.num_runs:
        wk += f" (num_runs {report.num_runs})"
    if report.missing_workers:
        wk += f"; no commits yet: {_ranges(report.missing_workers)}"
    out.append(wk)
    width = max([4] + [len(h) for h in report.hooks])
    out.append(f"  {'hook':<{width}}  {'files':>6}  {'tokens':>13}  {'mean norm':>10}  statistics.json")
    verb = "would write" if dry_run else "written"
    for h in report.hooks.values():
        state = verb if h.written else "unchanged"
        if h.recomputed:
            state += f" (recomputed workers {_ranges(h.recomputed)})"
        if h.uncommitted:
            state += f"; {h.uncommitted} uncommitted file(s) ignored"
        out.append(f"  {h.hook:<{width}}  {h.files:>6}  {h.count:>13,}  {h.mean_norm:>10.4g}  {state}")
    out.append(f"  cfg.json totals: {(verb if report.cfg_written else 'unchanged')}")
    for w in report.warnings:
        out.append(f"  warning: {w}")
    return out


def _ranges(items: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    if not items:
        return "none"
    out, start, prev = [], items[0], items[0]
    for v in list(items[1:]) + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
