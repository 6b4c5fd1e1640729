"""Check a run's committed megabatches against their commit records (headless; no prompt_toolkit).

Used by `vaultsh verify RUN_URI` and by the shell's `verify`. For every run
under a location (a run, one hook directory of a run, or every run below a
prefix), it checks:

- records: every commit record parses; its batch range starts and ends on
  batches of its own worker; no two records of a hook cover the same global
  batch (a duplicated shard: the same sequences of the data stream stored
  twice). Worker `w` of `num_runs` owns the global batches `b` with
  `b % num_runs == w` (collector/data/batches.py BatchStream), so a record
  `[batch_start, batch_end)` covers `range(batch_start, batch_end)` taken
  with stride `num_runs`;
- files: each file a record names exists; its size and sha256 equal the
  record's; its header parses strictly; its states shape matches the hook's
  metadata.json (sequence length and width equal, sequences = batches covered
  x batch_size = the record's count); its dtype is metadata.json's; its header
  names the hook and the record's batch range;
- optionally (`nan=True`) the states hold no NaN or Inf.

A run without commit records (Activault) has every file under a hook directory
checked for header and shape only. Files are checked in parallel; problems are
collected into one `VerifyReport`. Store errors that stop the whole check
(missing bucket, rejected credentials) are raised as `UserError`.
"""

from __future__ import annotations

import hashlib
import posixpath
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields

from vaultsh.dtypes import code_of_name
from vaultsh.errors import NotFoundError, UserError
from vaultsh.run import CFG, INTERNAL, METADATA, CommitRecord, FileRecord, Run, megabatch_format, parse_megabatch_name
from vaultsh.store.base import Store

HASH_CHUNK = 8 << 20
THREADS = 4
SCREEN_PROBLEMS = 15  # problems listed in the text report; --json has them all

CHECKS = {
    "records": "commit records",
    "chunks": "commit chunks",
    "overlap": "overlapping shards",
    "missing": "missing files",
    "size": "size mismatches",
    "sha256": "checksum mismatches",
    "header": "unreadable headers",
    "shape": "shape mismatches",
    "dtype": "dtype mismatches",
    "hook": "wrong hook",
    "metadata": "metadata.json",
    "read": "read errors",
    "nan": "NaN/Inf values",
}


@dataclass
class Problem:
    """One thing wrong: where (a URI), which check, and what was found."""

    uri: str
    check: str
    detail: str


def problem_lines(problems: list[Problem], limit: int = SCREEN_PROBLEMS) -> list[tuple[str, str]]:
    """(style, text) lines for the first `limit` problems, and how many more there are."""
    out = [("red", f"❌ {p.check:<8} {p.uri}: {p.detail}") for p in problems[:limit]]
    if len(problems) > limit:
        out.append(("red", f"   ... and {len(problems) - limit:,} more (--json lists them all)"))
    return out


@dataclass
class ProblemReport:
    """The outcome of checking one location (a run, an export): every problem found, and how to show it."""

    uri: str
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def problem(self, uri: str, check: str, detail: str) -> None:
        self.problems.append(Problem(uri, check, detail))

    def problems_json(self) -> list[dict]:
        return [{"uri": p.uri, "check": p.check, "detail": p.detail} for p in self.problems]

    def counts_json(self) -> dict:
        """The subclass's own fields (its counts), by name, in the order they are declared."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f not in fields(ProblemReport)}

    def to_json(self) -> dict:
        raise NotImplementedError

    def lines(self, limit: int = SCREEN_PROBLEMS) -> list[tuple[str, str]]:
        """The report for a person, one screen: (style, text) lines."""
        raise NotImplementedError


@dataclass
class VerifyReport(ProblemReport):
    """The outcome of one verify: counts and every problem found."""

    runs: int = 0
    hooks: int = 0
    files: int = 0
    records: int = 0
    hashed: int = 0
    bytes_hashed: int = 0
    no_checksum: int = 0
    scanned: int = 0
    uncommitted: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.check] = out.get(p.check, 0) + 1
        return out

    def to_json(self) -> dict:
        return {
            "uri": self.uri,
            "ok": self.ok,
            **self.counts_json(),
            "problem_counts": self.counts(),
            "problems": self.problems_json(),
        }

    def summary_line(self) -> str:
        s = lambda n, w: f"{n:,} {w}{'s' if n != 1 else ''}"  # noqa: E731
        parts = [
            f"{s(self.files, 'committed file')} in {s(self.hooks, 'hook')} of {s(self.runs, 'run')}",
            f"{self.hashed:,} sha256 checked",
        ]
        if self.no_checksum:
            parts.append(f"{self.no_checksum:,} without a recorded checksum")
        if self.scanned:
            parts.append(f"{self.scanned:,} scanned for NaN/Inf")
        if self.uncommitted:
            parts.append(f"{self.uncommitted:,} uncommitted ignored")
        return ", ".join(parts)

    def lines(self, limit: int = SCREEN_PROBLEMS) -> list[tuple[str, str]]:
        """The report for a person, one screen: (style, text) lines, problems first (at most `limit`)."""
        out = problem_lines(self.problems, limit)
        out.append(("", "verify: " + self.summary_line()))
        if self.problems:
            by = ", ".join(f"{n:,} {CHECKS.get(c, c)}" for c, n in sorted(self.counts().items(), key=lambda kv: -kv[1]))
            out.append(
                (
                    "bold red",
                    f"❌ {len(self.problems):,} problem{'s' if len(self.problems) != 1 else ''} in {self.uri}: {by}",
                )
            )
        else:
            out.append(("bold green", f"✅ no problems in {self.uri}"))
        return out


# ---------------------------------------------------------------------------
# what to verify
# ---------------------------------------------------------------------------


def _is_run_dir(store: Store, key: str) -> bool:
    if not key:
        return False
    listing = store.list_dir(key + "/")
    names = {o.key.rsplit("/", 1)[-1] for o in listing.objects}
    return CFG in names or any(p.rstrip("/").rsplit("/", 1)[-1] == INTERNAL for p in listing.prefixes)


def _is_hook_dir(store: Store, key: str) -> bool:
    if "/" not in key:
        return False
    listing = store.list_dir(key + "/")
    names = {o.key.rsplit("/", 1)[-1] for o in listing.objects}
    return METADATA in names or any(megabatch_format(n) for n in names)


def find_targets(store: Store, key: str) -> list[tuple[str, list[str] | None]]:
    """(run, hooks or None for all) to verify at directory `key` of `store`."""
    key = key.strip("/")
    if _is_run_dir(store, key):
        return [(key, None)]
    if _is_hook_dir(store, key) and _is_run_dir(store, posixpath.dirname(key)):
        run, hook = posixpath.split(key)
        return [(run, [hook])]
    base = key + "/" if key else ""
    runs: set[str] = set()
    marker = f"/{INTERNAL}/"
    for info in store.iter_objects(base):
        k = "/" + info.key
        if k.endswith("/" + CFG):
            runs.add(k[1 : -len(CFG) - 1])
        elif marker in k:
            runs.add(k.split(marker, 1)[0].lstrip("/"))
    runs.discard("")
    return [(r, None) for r in sorted(runs)]


# ---------------------------------------------------------------------------
# records: readable, on the right worker's batches, no overlaps
# ---------------------------------------------------------------------------


def _num_runs(cfg: dict | None, commits: list[CommitRecord]) -> int:
    """How many workers share the data stream: cfg.json's num_runs, else the highest worker seen + 1."""
    for v in (
        (cfg or {}).get("num_runs"),
        ((cfg or {}).get("config") or {}).get("num_runs") if isinstance((cfg or {}).get("config"), dict) else None,
    ):
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
    return max((c.worker for c in commits), default=0) + 1


def covered_batches(rec: CommitRecord, num_runs: int) -> range:
    """The global batches a record covers: its range, stepping over the other workers' batches."""
    first = rec.batch_start + (rec.worker - rec.batch_start) % num_runs
    return range(first, max(first, rec.batch_end), num_runs)


def _span(batches: list[int]) -> str:
    """Compact text for sorted batch numbers: '12', '12-14', '3, 7, 9-11'."""
    out: list[str] = []
    i = 0
    while i < len(batches):
        j = i
        while j + 1 < len(batches) and batches[j + 1] == batches[j] + 1:
            j += 1
        out.append(str(batches[i]) if i == j else f"{batches[i]}-{batches[j]}")
        i = j + 1
    text = ", ".join(out[:6])
    return text + (", ..." if len(out) > 6 else "")


def check_records(
    commits: list[CommitRecord],
    num_runs: int,
    uri_of: Callable[[CommitRecord], str],
    hook_uri: Callable[[str], str],
    only: list[str] | None = None,
) -> list[Problem]:
    """Batch ranges on the record's own worker, and no two records of one hook sharing a global batch.

    `uri_of(record)` and `hook_uri(hook)` name where a problem is; `only` limits
    the overlap check to those hooks.
    """
    problems: list[Problem] = []
    for c in commits:
        if c.batch_end > c.batch_start and num_runs > 1:
            if c.batch_start % num_runs != c.worker % num_runs or (c.batch_end - 1) % num_runs != c.worker % num_runs:
                problems.append(
                    Problem(
                        uri_of(c),
                        "records",
                        f"batch range [{c.batch_start}, {c.batch_end}) does not start and end on "
                        f"batches of worker {c.worker} (of {num_runs} workers)",
                    )
                )
    hooks = sorted({h for c in commits for h in c.files})
    for hook in hooks:
        if only is not None and hook not in only:
            continue
        owner: dict[int, CommitRecord] = {}
        clashes: dict[tuple[int, int, int, int], list[int]] = {}
        for c in commits:
            if hook not in c.files:
                continue
            for b in covered_batches(c, num_runs):
                prev = owner.get(b)
                if prev is None:
                    owner[b] = c
                else:
                    clashes.setdefault((prev.worker, prev.index, c.worker, c.index), []).append(b)
        by_key = {(c.worker, c.index): c for c in commits}
        for (w0, i0, w1, i1), batches in sorted(clashes.items()):
            first, second = by_key[(w0, i0)], by_key[(w1, i1)]
            problems.append(
                Problem(
                    hook_uri(hook),
                    "overlap",
                    f"{first.files[hook].name} and {second.files[hook].name} both hold global batch{'es' if len(batches) > 1 else ''} "
                    f"{_span(sorted(batches))} (records w{w0:04d}/{i0:07d} and w{w1:04d}/{i1:07d}): the same sequences stored twice",
                )
            )
    return problems


# ---------------------------------------------------------------------------
# one file
# ---------------------------------------------------------------------------


def expected_dtype(meta: dict | None) -> str | None:
    """metadata.json's `dtype` ("torch.float32") as a safetensors name ("F32")."""
    name = (meta or {}).get("dtype")
    if not isinstance(name, str):
        return None
    return code_of_name(name)


@dataclass
class _Job:
    hook: str
    uri: str
    meta: dict | None
    rec: FileRecord
    record: CommitRecord | None  # None for a run without commit records
    expect_sequences: int | None


def _hash(store: Store, key: str, advance: Callable[[int], None], stop: threading.Event) -> tuple[str, int] | None:
    h = hashlib.sha256()
    total = 0
    f = store.open_read(key)
    try:
        while not stop.is_set():
            chunk = f.read(HASH_CHUNK)
            if not chunk:
                return h.hexdigest(), total
            h.update(chunk)
            total += len(chunk)
            advance(len(chunk))
    finally:
        f.close()
    return None


def _shape_problems(job: _Job, header) -> list[Problem]:
    out: list[Problem] = []
    n, t, d = header.n_sequences, header.seq_len, header.d_model
    shape = (job.meta or {}).get("shape")
    if (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
    ):
        if t != shape[1] or d != shape[2] or n > shape[0] or n == 0:
            out.append(Problem(job.uri, "shape", f"states {[n, t, d]} do not match metadata.json shape {shape}"))
    r = job.record
    if r is not None:
        if job.rec.n_sequences and n != job.rec.n_sequences:
            out.append(Problem(job.uri, "shape", f"{n} sequences, the commit record says {job.rec.n_sequences}"))
        if job.expect_sequences is not None and n != job.expect_sequences:
            out.append(
                Problem(
                    job.uri,
                    "records",
                    f"{n} sequences, but the record's batch range [{r.batch_start}, "
                    f"{r.batch_end}) holds {job.expect_sequences} for worker {r.worker}",
                )
            )
    ids = header.tensors.get("input_ids")
    if ids is not None and tuple(ids.shape) != (n, t):
        out.append(Problem(job.uri, "shape", f"input_ids {list(ids.shape)} do not match states {[n, t]}"))
    want = expected_dtype(job.meta)
    if want is not None and header.dtype != want:
        out.append(
            Problem(job.uri, "dtype", f"states are {header.dtype}, metadata.json says {(job.meta or {}).get('dtype')}")
        )
    if header.hook is not None and header.hook != job.hook:
        out.append(Problem(job.uri, "hook", f"the header names hook {header.hook!r}, the file is in {job.hook!r}"))
    md = header.metadata
    if r is not None and md.get("batch_start", "").isdigit() and md.get("batch_end", "").isdigit():
        hs, he = int(md["batch_start"]), int(md["batch_end"])
        if (hs, he) != (r.batch_start, r.batch_end):
            out.append(
                Problem(
                    job.uri,
                    "records",
                    f"the header holds batches [{hs}, {he}), its commit record says [{r.batch_start}, {r.batch_end})",
                )
            )
    return out


def check_file(
    store: Store, job: _Job, nan: bool, advance: Callable[[int], None], stop: threading.Event
) -> tuple[list[Problem], dict]:
    """Every check of one committed file; returns (problems, counters)."""
    from vaultsh.megabatch import read_header, scan_states

    rec = job.rec
    problems: list[Problem] = []
    info = {"hashed": 0, "bytes_hashed": 0, "no_checksum": 0, "scanned": 0}
    try:
        head = store.head(rec.key)
    except NotFoundError:
        advance(rec.size * (2 if nan else 1))
        return [
            Problem(job.uri, "missing", "named by a commit record but not stored" if job.record else "listed but gone")
        ], info
    if job.record is not None and head.size != rec.size:
        problems.append(Problem(job.uri, "size", f"{head.size:,} bytes stored, the commit record says {rec.size:,}"))
    header = None
    try:
        header = read_header(store, rec.key)
    except UserError as exc:
        problems.append(Problem(job.uri, "header", str(exc).replace(rec.key + ": ", "")))
    if header is not None:
        problems.extend(_shape_problems(job, header))
    if rec.sha256:
        try:
            got = _hash(store, rec.key, advance, stop)
        except UserError as exc:
            problems.append(Problem(job.uri, "read", str(exc)))
        else:
            if got is not None:
                info["hashed"], info["bytes_hashed"] = 1, got[1]
                if got[0] != rec.sha256:
                    problems.append(
                        Problem(
                            job.uri,
                            "sha256",
                            f"sha256 {got[0][:12]}… does not match the commit record's {rec.sha256[:12]}…",
                        )
                    )
    else:
        info["no_checksum"] = 1
        advance(head.size)
    if nan:
        if header is None or stop.is_set():
            advance(head.size)
        else:
            seen = [0]

            def scanned(done: int, _total: int) -> None:
                advance(done - seen[0])
                seen[0] = done

            try:
                scan = scan_states(store, rec.key, header, progress=scanned)
            except UserError as exc:
                problems.append(Problem(job.uri, "read", str(exc).replace(rec.key + ": ", "")))
            else:
                info["scanned"] = 1
                if scan["nan_count"] or scan["inf_count"]:
                    problems.append(
                        Problem(
                            job.uri, "nan", f"{scan['nan_count']:,} NaN and {scan['inf_count']:,} Inf values in states"
                        )
                    )
            advance(max(0, head.size - seen[0]))
    return problems, info


# ---------------------------------------------------------------------------
# a whole location
# ---------------------------------------------------------------------------


def _read_records(run: Run, report: VerifyReport, uri: Callable[[str], str]) -> list[CommitRecord]:
    """Every readable commit record; each unreadable one is a problem (the others are still checked)."""
    out: list[CommitRecord] = []
    for t in run.list_commit_keys():
        try:
            rec = run.read_commit(t)
        except UserError as exc:
            report.problems.append(Problem(uri(t[2]), "records", str(exc).replace(uri(t[2]) + ": ", "")))
            continue
        if rec is not None:
            out.append(rec)
    return out


def check_chunks(run: Run, commits: list[CommitRecord], uri: Callable[[str], str]) -> list[Problem]:
    """Commit chunks must copy their records exactly: readers take a copy whose size matches its record."""
    by_key = {run.commit_key(c.worker, c.index): c for c in commits}
    out: list[Problem] = []
    for o in run.store.iter_objects(run.commit_chunks_prefix()):
        where = uri(o.key)
        try:
            for e in run.read_commit_chunk(o.key):
                parsed = run.chunk_entry_key(e)
                if parsed is None:
                    raise ValueError("an entry names no commit record")
                key, w, i = parsed
                rec = by_key.get(key)
                if rec is None:
                    continue  # its record is gone: readers ignore the copy
                copy = run.parse_commit(e.get("record"), w, i, where)
                if copy != rec and e.get("size") == len(run.record_bytes(rec)):
                    out.append(
                        Problem(
                            where,
                            "chunks",
                            f"its copy of {uri(key)} differs from the record "
                            "(readers would take the copy): delete the chunk",
                        )
                    )
        except (UserError, ValueError, TypeError, KeyError, AttributeError) as exc:
            out.append(Problem(where, "chunks", f"unreadable ({str(exc).splitlines()[0][:120]}): readers skip it"))
    return out


def verify(
    store: Store,
    key: str = "",
    *,
    nan: bool = False,
    threads: int = THREADS,
    progress: Callable[[int, int], object] | None = None,
    uri: Callable[[str], str] | None = None,
) -> VerifyReport:
    """Verify every run at or under `key` of `store` (a run, a hook directory of a run, or a prefix).

    `progress(done_bytes, total_bytes)` is called as files are read; `uri(key)`
    names keys in the report (default: the store's URIs). Raises UserError when
    there is no run at `key` or the store cannot be read.
    """
    uri = uri or store.child_uri
    key = key.strip("/")
    targets = find_targets(store, key)
    report = VerifyReport(uri(key) + "/" if key else uri(""))
    if not targets:
        raise NotFoundError(f"no run at or under {uri(key)} (a run holds {CFG} or {INTERNAL}/)")
    jobs: list[_Job] = []
    for run_name, only in targets:
        run = Run(store, run_name)
        report.runs += 1
        commits = _read_records(run, report, uri)
        report.records += len(commits)
        try:
            cfg = run.read_cfg()
        except UserError:
            cfg = None
        n_runs = _num_runs(cfg, commits)
        report.problems.extend(check_chunks(run, commits, uri))
        if commits:

            def record_uri(c: CommitRecord, r: Run = run) -> str:
                return uri(r.commit_key(c.worker, c.index))

            def hook_uri(h: str, r: Run = run) -> str:
                return uri(r.hook_prefix(h).rstrip("/"))

            report.problems.extend(check_records(commits, n_runs, record_uri, hook_uri, only))
        hooks = only or sorted(set(run.hooks()) | {h for c in commits for h in c.files})
        for hook in hooks:
            report.hooks += 1
            try:
                meta = run.read_metadata(hook)
            except UserError as exc:
                report.problems.append(Problem(uri(run.metadata_key(hook)), "metadata", str(exc).split(": ", 1)[-1]))
                meta = None
            else:
                if meta is None and commits:
                    report.problems.append(Problem(uri(run.metadata_key(hook)), "metadata", "missing"))
            batch_size = (meta or {}).get("batch_size")
            if commits:
                for c in commits:
                    f = c.files.get(hook)
                    if f is None:
                        continue
                    expect = None
                    if isinstance(batch_size, int) and not isinstance(batch_size, bool):
                        expect = len(covered_batches(c, n_runs)) * batch_size
                    jobs.append(_Job(hook, uri(f.key), meta, f, c, expect))
                report.uncommitted += len(run.uncommitted_files(hook, commits))
            else:
                for f in run.committed_files(hook, commits):
                    jobs.append(_Job(hook, uri(f.key), meta, f, None, None))
    report.files = len(jobs)
    _run_jobs(store, jobs, report, nan, threads, progress)
    return report


def _run_jobs(
    store: Store,
    jobs: list[_Job],
    report: VerifyReport,
    nan: bool,
    threads: int,
    progress: Callable[[int, int], object] | None,
) -> None:
    total = sum(j.rec.size for j in jobs) * (2 if nan else 1)
    done = [0]
    lock = threading.Lock()

    def advance(n: int) -> None:
        if progress is None or n <= 0:
            return
        with lock:
            done[0] += n
            progress(min(done[0], total), total)

    if progress is not None:
        progress(0, total)
    stop = threading.Event()
    results: list[tuple[str, tuple[list[Problem], dict]]] = []
    ex = ThreadPoolExecutor(max_workers=max(1, threads))
    try:
        futures = {ex.submit(check_file, store, j, nan, advance, stop): j for j in jobs}
        for fut in as_completed(futures):
            results.append((futures[fut].rec.key, fut.result()))
    except BaseException:  # Ctrl-C or a store error: stop the other checks before leaving
        stop.set()
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    for _, (problems, info) in sorted(results, key=lambda r: _order(r[0])):
        report.problems.extend(problems)
        report.hashed += info["hashed"]
        report.bytes_hashed += info["bytes_hashed"]
        report.no_checksum += info["no_checksum"]
        report.scanned += info["scanned"]


def _order(key: str) -> tuple:
    parsed = parse_megabatch_name(key)
    return (posixpath.dirname(key), parsed or (0, 0), key)
