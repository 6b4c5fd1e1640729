"""`filecount` / `sizecheck`: one streaming pass over the listing under a prefix.

Objects are counted as they arrive, page by page (nothing is kept per object
but one small entry per megabatch file), so 100k+ keys cost one paginated
listing and a few MB. Groups:

- megabatches, per hook directory, split into committed and uncommitted. A
  file is committed when its run holds a commit record with the same
  (worker, index) — read from the record's key
  (`_vaultsh/commits/wWWWW/IIIIIII.json`) and the file's deterministic name,
  so no record is downloaded. A run without commit records (Activault) has
  every file committed, as readers treat it.
- metadata: cfg.json, metadata.json, statistics.json;
- internal: everything under `_vaultsh/` (commit records, statistics snapshots);
- other: the rest.
"""

from __future__ import annotations

import posixpath
import re
import time
from collections.abc import Callable

from vaultsh.run import CFG, INTERNAL, METADATA, STATISTICS, megabatch_format, parse_megabatch_name
from vaultsh.shell.results import Group, Tally

_COMMIT_KEY = re.compile(r"^(?:(.*)/)?" + re.escape(INTERNAL) + r"/commits/w(\d{4,})/(\d{7,})\.json$")
_META_NAMES = {CFG, METADATA, STATISTICS}


def _commits_prefix(run: str) -> str:
    return (run + "/" if run else "") + f"{INTERNAL}/commits/"


def tally(store, key: str, command: str, uri: str, on_progress: Callable[[int], object] | None = None) -> Tally:
    base = key + "/" if key else ""
    t = Tally(command, uri)
    mb: dict[str, dict[tuple[int, int], int]] = {}  # hook dir -> {(worker, index): size}
    odd: dict[str, list[int]] = {}  # hook dir -> [files, bytes] with names that carry no (worker, index)
    commits: dict[str, set[tuple[int, int]]] = {}  # run -> committed (worker, index)
    last = time.monotonic()
    for info in store.iter_objects(base):
        k, size = info.key, info.size
        t.objects += 1
        t.bytes += size
        d, _, name = k.rpartition("/")
        if INTERNAL in d.split("/"):
            t.internal.files += 1
            t.internal.bytes += size
            m = _COMMIT_KEY.match(k)
            if m:
                commits.setdefault(m.group(1) or "", set()).add((int(m.group(2)), int(m.group(3))))
        elif name in _META_NAMES:
            t.metadata.files += 1
            t.metadata.bytes += size
        elif megabatch_format(name) and d:
            wi = parse_megabatch_name(name)
            if wi is None:
                acc = odd.setdefault(d, [0, 0])
                acc[0] += 1
                acc[1] += size
                mb.setdefault(d, {})
            else:
                mb.setdefault(d, {})[wi] = size
        else:
            t.other.files += 1
            t.other.bytes += size
        if on_progress is not None and t.objects % 256 == 0:
            now = time.monotonic()
            if now - last > 0.05:
                last = now
                on_progress(t.objects)
    if on_progress is not None:
        on_progress(t.objects)

    # Commit records of runs whose records lie outside the listed prefix (e.g. listing one hook dir).
    for run in {posixpath.dirname(d) for d in mb}:
        prefix = _commits_prefix(run)
        if run in commits or prefix.startswith(base):
            continue
        found: set[tuple[int, int]] = set()
        for info in store.iter_objects(prefix):
            m = _COMMIT_KEY.match(info.key)
            if m and (m.group(1) or "") == run:
                found.add((int(m.group(2)), int(m.group(3))))
        commits[run] = found

    for d in sorted(mb):
        files = mb[d]
        extra_files, extra_bytes = odd.get(d, (0, 0))
        label = d[len(base) :] if d != key else (posixpath.basename(d) or ".")
        g = Group(label, files=len(files) + extra_files, bytes=sum(files.values()) + extra_bytes)
        recs = commits.get(posixpath.dirname(d))
        if recs:
            done = [s for wi, s in files.items() if wi in recs]
            g.committed, g.committed_bytes = len(done), sum(done)
        else:  # no commit records: every file counts as committed (Activault runs)
            g.committed, g.committed_bytes = g.files, g.bytes
        t.hooks[label] = g
    return t
