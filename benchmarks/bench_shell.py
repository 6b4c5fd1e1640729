"""The `vaultsh s3` shell against a moto S3 server on loopback (vaultsh/testing/s3server.py).

- shell-inspect-header-time / shell-inspect-header-bytes: `inspect 0` in a
  hook directory, up to the header view (model, hook, dtype, shapes; the part
  shown before the states check starts), for a 10.5 MB and a 1.05 GB megabatch
  (quick: 10.5 MB and 84 MB) written with `write_megabatch` and committed with a
  commit record. Everything the command does until then is measured: the
  listing that finds the hook directory, the commit records that number the
  files, the HEAD and the ranged header read. Bytes are counted on the wire by
  a TCP relay (both directions, HTTP heads included). Best of 5 runs, each
  from a fresh shell (no cache). The small file is the baseline: the ratio
  large/small shows the cost stays flat. Targets at 1 GB: < 1 s and < 1 MB.
- shell-filecount: `filecount` over 20,000 keys (quick: 5,000) of a run
  layout (2 hooks of megabatches, commit records, statistics snapshots) against
  a bare boto3 paginated `list_objects_v2` loop over the same prefix that only
  counts keys; rounds alternate which goes first, best of each kept. Target:
  >= 0.9x the bare loop's keys/s.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.harness import BenchResult, benchmark, rate_ratio

MB = 1 << 20
SEQ_LEN, D_MODEL = 1024, 1280  # 10.5 MB per 2 sequences of float32
RUN, HOOK = "run", "blocks.0.hook_resid_post"
_cache: dict = {}


def _shell(store, cwd: str):
    from vaultsh.shell.app import Shell

    return Shell(store=store, cwd=cwd, stdout=io.StringIO(), stderr=io.StringIO(), interactive=False)


def _write_run(store, run: str, n_sequences: int) -> int:
    """A run with one committed megabatch of float32 [n, 1024, 1280]; returns its size."""
    import torch

    from vaultsh.megabatch import write_megabatch
    from vaultsh.run import CommitRecord, FileRecord, Run, metadata_for

    r = Run(store, run)
    r.write_cfg({"run_name": run, "model_name": "bench-model", "num_runs": 1})
    r.write_metadata(
        HOOK,
        metadata_for(batch_size=n_sequences, sequence_length=SEQ_LEN, d_in=D_MODEL, hook=HOOK, model="bench-model"),
    )
    block = torch.randn(1, SEQ_LEN, D_MODEL, generator=torch.Generator().manual_seed(0))
    states = block.expand(n_sequences, SEQ_LEN, D_MODEL).contiguous()  # the layout matters, not the values
    ids = torch.arange(SEQ_LEN, dtype=torch.int64).repeat(n_sequences, 1)
    key = r.megabatch_key(HOOK, 0, 0)
    size = write_megabatch(store, key, states, ids, metadata={"hook": HOOK, "model": "bench-model", "run": run})
    r.commit(
        CommitRecord(
            worker=0,
            index=0,
            batch_start=0,
            batch_end=1,
            tokens=n_sequences * SEQ_LEN,
            files={
                HOOK: FileRecord(
                    HOOK, key, size, n_sequences=n_sequences, n_tokens=n_sequences * SEQ_LEN, worker=0, index=0
                )
            },
        )
    )
    return size


def _header_view(url: str, bucket: str, run: str) -> tuple[float, int, int]:
    """(seconds, wire bytes, requests) of `inspect 0` up to its header view, from a fresh shell."""
    from vaultsh.shell.commands import inspect
    from vaultsh.shell.registry import REGISTRY
    from vaultsh.shell.render import render
    from vaultsh.shell.results import InspectHeader
    from vaultsh.store.s3 import S3Store
    from vaultsh.testing import s3server

    with s3server.CountingRelay(url) as relay:
        store = S3Store(bucket, endpoint_url=relay.url)
        calls = [0]
        store.client.meta.events.register("before-send.s3", lambda **_: calls.__setitem__(0, calls[0] + 1))
        shell = _shell(store, f"{run}/{HOOK}")
        relay.reset()
        calls[0] = 0
        t0 = time.perf_counter()
        parts = inspect(shell.ctx, REGISTRY.parse(REGISTRY.get("inspect"), ["0"]))
        header = next(parts)
        render(header, shell.ctx.out)
        elapsed = time.perf_counter() - t0
        parts.close()  # the states check would start here
        wire = relay.bytes_up + relay.bytes_down
    assert isinstance(header, InspectHeader) and header.header.seq_len == SEQ_LEN
    return elapsed, wire, calls[0]


def _inspect_setup(quick: bool) -> dict:
    key = ("inspect", quick)
    if key not in _cache:
        from vaultsh.store.s3 import S3Store
        from vaultsh.testing import s3server

        url = s3server.endpoint()
        bucket = s3server.new_bucket("vaultsh-bench-shell")
        store = S3Store(bucket, endpoint_url=url)
        sizes = {"small": _write_run(store, "small", 2), "large": _write_run(store, "large", 16 if quick else 200)}
        runs = {}
        for name in ("small", "large"):
            best = (float("inf"), 0, 0)
            for _ in range(5):
                best = min(best, _header_view(url, bucket, name))
            runs[name] = best
        s3server.empty_bucket(bucket)
        _cache[key] = {"sizes": sizes, "runs": runs, "server": s3server.describe()}
    return _cache[key]


def _inspect_notes(d: dict) -> str:
    (ts, bs, rs), (tl, bl, rl) = d["runs"]["small"], d["runs"]["large"]
    return (
        f"{d['sizes']['small'] / 1e6:.0f} MB: {ts * 1e3:.0f} ms, {bs:,} B, {rs} requests; "
        f"{d['sizes']['large'] / 1e6:.0f} MB: {tl * 1e3:.0f} ms, {bl:,} B, {rl} requests"
    )


def _inspect_flat(
    name: str, quick: bool, figure: int, metric: str, target: str, limit: float, flat: float
) -> BenchResult:
    """One `figure` of the header views (0: seconds, 1: wire bytes), the large megabatch's against the small
    one's: it passes when the large one's stays under `limit` and large / small under `flat`."""
    d = _inspect_setup(quick)
    small, large = d["runs"]["small"][figure], d["runs"]["large"][figure]
    ratio = large / small
    return BenchResult(
        name,
        metric,
        float(round(small, 4)),
        float(round(large, 4)),
        round(ratio, 3),
        target,
        large < limit and ratio < flat,
        _inspect_notes(d),
        {"sizes": d["sizes"], "runs": d["runs"], "server": d["server"]},
    )


@benchmark("shell-inspect-header-time", "shell `inspect 0` header view on S3: time, 10 MB vs 1 GB megabatch")
def bench_inspect_time(quick: bool) -> BenchResult:
    return _inspect_flat("shell-inspect-header-time", quick, 0, "s", "< 1 s at 1 GB, flat (ratio ~1)", 1.0, 1.5)


@benchmark("shell-inspect-header-bytes", "shell `inspect 0` header view on S3: bytes on the wire, 10 MB vs 1 GB")
def bench_inspect_bytes(quick: bool) -> BenchResult:
    return _inspect_flat(
        "shell-inspect-header-bytes", quick, 1, "bytes", "< 1 MB at 1 GB, flat (ratio ~1)", 1_000_000, 1.1
    )


def _fill(bucket: str, n_keys: int) -> int:
    """A run layout of about `n_keys` tiny objects; returns how many were written."""
    from vaultsh.testing import s3server

    per = n_keys // 4
    keys = [f"{RUN}/cfg.json"]
    for hook in ("residuals_0", "mlp_0"):
        keys += [f"{RUN}/{hook}/metadata.json", f"{RUN}/{hook}/statistics.json"]
        keys += [f"{RUN}/{hook}/w{i % 8:04d}--{i // 8:07d}.safetensors" for i in range(per)]
    keys += [f"{RUN}/_vaultsh/commits/w{i % 8:04d}/{i // 8:07d}.json" for i in range(per)]
    keys += [
        f"{RUN}/_vaultsh/stats/w{i % 8:04d}/residuals_0/{i // 8:07d}.safetensors" for i in range(n_keys - len(keys))
    ]
    client = s3server.client(max_pool_connections=32)
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))
    return len(keys)


@benchmark("shell-filecount", "shell `filecount` over 20k keys on S3 vs a bare paginated list_objects_v2 loop")
def bench_filecount(quick: bool) -> BenchResult:
    from vaultsh.store.s3 import S3Store
    from vaultsh.testing import s3server

    n_keys = 5_000 if quick else 20_000
    url = s3server.endpoint()
    bucket = s3server.new_bucket("vaultsh-bench-count")
    written = _fill(bucket, n_keys)
    client = s3server.client()
    store = S3Store(bucket, endpoint_url=url)

    def bare() -> int:
        n = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{RUN}/"):
            n += len(page.get("Contents", ()))
        return n

    shell = _shell(store, RUN)  # the user is in the run directory already (`cd run` is not timed)

    def ours() -> int:
        shell.stdout.seek(0)
        shell.stdout.truncate()
        assert shell.dispatch(["filecount"]) == 0
        return int(shell.stdout.getvalue().splitlines()[0].rsplit(": ", 1)[1].split()[0].replace(",", ""))

    times: dict[str, float] = {"bare": float("inf"), "ours": float("inf")}
    counts = {}
    rounds = 3 if quick else 4
    for r in range(rounds):
        order = [("bare", bare), ("ours", ours)] if r % 2 == 0 else [("ours", ours), ("bare", bare)]
        for name, fn in order:
            t0 = time.perf_counter()
            counts[name] = fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    s3server.empty_bucket(bucket)
    assert counts["bare"] == counts["ours"] == written, counts
    return rate_ratio(
        "shell-filecount",
        "keys/s",
        written / times["bare"],
        written / times["ours"],
        0.9,
        f"{written:,} keys; bare loop {times['bare']:.2f} s, filecount {times['ours']:.2f} s "
        f"(best of {rounds}, alternating)",
        {"keys": written, "server": s3server.describe()},
        digits=None,
    )
