"""How collection scales with K workers, and what the store sees per worker.

- scaling-k2: K=2 worker processes (one CPU thread each, so two workers on
  this box stand in for two machines) against K=1, same config and the same
  total batches, writing to the loopback S3 server (moto in its own
  process). The result is the tokens each worker collects per CPU-second in
  steady state (CPU time of the process, uploader threads included, from its
  first commit to its last): if sharding, commits and statistics add no
  per-worker work as K grows, K=2 matches K=1 and K machines give K times
  the tokens until the store is the limit. `extra` also has tokens per
  CPU-second over the whole loop (first batch to exit), where the fixed
  per-worker costs (data setup, final merge, interpreter exit) weigh twice as
  much at K=2 with half the batches each. Target: >= 0.9x. The wall-clock aggregate tokens/s
  (first worker's first batch to last worker's `done`) is in `extra`; on a
  box with fewer free cores than workers it cannot double.
- store-load: one worker against the loopback S3 server with every HTTP
  request counted (botocore's before-send event): requests and bytes per
  committed megabatch, against the floor of one PUT per hook file plus one
  commit record. `extra` holds the per-worker request and byte rates at the
  measured tokens/s and the same rates projected to 100 workers.

Model: tests/modelfixtures.py's tiny Llama (4 layers, d_model 64) with the
real SmolLM2 tokenizer; the numbers measure the pipeline and the store
protocol, not a GPU. docs/scaling.md turns them into projections.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks.harness import BenchResult, benchmark, rate_ratio, scratch_bucket

BATCH, SEQ, BPU = 2, 64, 4  # pydoc holds ~290 documents: 144 global batches of 2
HOOKS = ["residuals_1", "mlp_3"]

_tiny: dict[str, Path] = {}


def _tiny_model() -> Path:
    if "dir" not in _tiny:
        from tests.modelfixtures import make_tiny_llama_dir

        _tiny["dir"] = make_tiny_llama_dir(Path(tempfile.mkdtemp(prefix="vaultsh-bench-tiny-")) / "model")
    return _tiny["dir"]


def _raw_cfg(run_name: str, uri: str, num_runs: int, n_batches: int) -> dict:
    return {
        "run_name": run_name,
        "num_runs": num_runs,
        "transformer_config": {"model_name": str(_tiny_model()), "dtype": "float32"},
        "data_config": {"data_key": "pydoc", "n_batches": n_batches, "seq_length": SEQ, "batch_size": BATCH},
        "upload_config": {"batches_per_upload": BPU, "hooks": HOOKS},
        "storage": {"uri": uri},
    }


def _run_k(k: int, n_batches: int, bucket: str, endpoint: str) -> dict:
    """K worker processes at once: aggregate tokens/s, and tokens per CPU-second of each worker's loop."""
    import psutil
    import yaml

    from vaultsh.events import decode

    tmp = Path(tempfile.mkdtemp(prefix="vaultsh-bench-scaling-"))
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_raw_cfg(f"scale-k{k}-{time.time_ns()}", f"s3://{bucket}", k, n_batches)))
    env = dict(os.environ, S3_ENDPOINT_URL=endpoint, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    events: dict[int, list[dict]] = {w: [] for w in range(k)}
    cpu_at_loop: dict[int, float] = {}
    cpu_at_commit: dict[int, list[float]] = {w: [] for w in range(k)}
    procs, readers, logs = [], [], []
    for w in range(k):
        r, wfd = os.pipe()
        log = open(tmp / f"w{w}.log", "w+b")
        logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "vaultsh", "collect", str(cfg), "--machine", str(w), "--events-fd", str(wfd)],
            env=env,
            pass_fds=(wfd,),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        procs.append(proc)
        os.close(wfd)

        def read(fd=r, w=w, pid=proc.pid):
            with os.fdopen(fd, "rb") as f:
                for line in f:
                    e = decode(line)
                    if e is None:
                        continue
                    if (e["type"] == "loading" and e["what"] == "data") or e["type"] == "committed":
                        try:
                            t = psutil.Process(pid).cpu_times()
                        except psutil.Error:
                            continue
                        if e["type"] == "committed":
                            cpu_at_commit[w].append(t.user + t.system)
                        else:
                            cpu_at_loop[w] = t.user + t.system
                    events[w].append(e)

        t = threading.Thread(target=read, daemon=True)
        t.start()
        readers.append(t)
    cpu_loop = {}
    for w, p in enumerate(procs):
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            logs[w].seek(0)
            raise RuntimeError(f"worker {w} failed: {logs[w].read().decode(errors='replace')[-2000:]}")
        readers[w].join()
        cpu_loop[w] = usage.ru_utime + usage.ru_stime - cpu_at_loop[w]
    starts, ends, per_worker, per_cpu, steady = [], [], [], [], []
    batches = 0
    for w, evs in events.items():
        t0 = next(e["time"] for e in evs if e["type"] == "loading" and e["what"] == "data")
        done = evs[-1]
        starts.append(t0)
        ends.append(done["time"])
        batches += done["batches"]
        per_worker.append(round(done["batches"] * BATCH * SEQ / (done["time"] - t0), 1))
        per_cpu.append(round(done["batches"] * BATCH * SEQ / cpu_loop[w], 1))
        c = cpu_at_commit[w]
        steady.append(round((len(c) - 1) * BPU * BATCH * SEQ / (c[-1] - c[0]), 1))
    return {
        "tokens_per_s": round(batches * BATCH * SEQ / (max(ends) - min(starts)), 1),
        "per_worker": per_worker,
        "tokens_per_cpu_s": per_cpu,
        "steady_tokens_per_cpu_s": steady,
        "batches": batches,
        "load_average": round(os.getloadavg()[0], 1),
    }


@benchmark("scaling-k2", "2 worker processes vs 1: tokens per CPU-second of each worker, and aggregate tokens/s")
def bench_scaling_k2(quick: bool) -> BenchResult:
    n = 48 if quick else 128
    with scratch_bucket() as (bucket, endpoint):
        one = _run_k(1, n, bucket, endpoint)
        two = _run_k(2, n, bucket, endpoint)
    return rate_ratio(
        "scaling-k2",
        "tokens/CPU-s per worker",
        one["steady_tokens_per_cpu_s"][0],
        min(two["steady_tokens_per_cpu_s"]),
        0.9,
        f"tiny Llama (d=64), {n} batches of {BATCH}x{SEQ}, {len(HOOKS)} hooks, one CPU thread per worker; "
        f"wall aggregate {one['tokens_per_s']:.0f} -> {two['tokens_per_s']:.0f} tokens/s on {os.cpu_count()} shared CPUs",
        {"k1": one, "k2": two, "wall_ratio": round(two["tokens_per_s"] / one["tokens_per_s"], 3)},
    )


class _RequestCounter:
    """Counts the HTTP requests and request-body bytes an S3 client sends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter = Counter()
        self.bytes_up = 0

    def __call__(self, request, **kwargs) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(request.url)
        q = parts.query
        if request.method == "PUT" and "partNumber=" in q:
            kind = "PUT part"
        elif request.method == "POST" and ("uploads" in q or "uploadId=" in q):
            kind = "POST multipart"
        elif request.method == "GET" and ("list-type=" in q or parts.path.rstrip("/").count("/") <= 1):
            kind = "LIST"
        else:
            kind = request.method
        size = int(request.headers.get("Content-Length") or 0)
        with self.lock:
            self.requests[kind] += 1
            self.bytes_up += size


@benchmark("store-load", "S3 requests and bytes per committed megabatch (one worker, loopback S3)")
def bench_store_load(quick: bool) -> BenchResult:
    from collector.config import load_config
    from collector.worker import run_worker
    from vaultsh.events import EventSink
    from vaultsh.store.s3 import S3Store

    n = 32 if quick else 96
    counter = _RequestCounter()
    events: list[dict] = []
    with scratch_bucket() as (bucket, endpoint):
        store = S3Store(bucket, endpoint_url=endpoint)
        store.client.meta.events.register("before-send.s3", counter)
        cfg = load_config(_raw_cfg(f"load-{time.time_ns()}", f"s3://{bucket}", 1, n))
        run_worker(cfg, 0, sink=EventSink(0, callback=events.append), store=store)
    megabatches = sum(1 for e in events if e["type"] == "committed")
    t0 = next(e["time"] for e in events if e["type"] == "loading" and e["what"] == "data")
    elapsed = events[-1]["time"] - t0
    total = sum(counter.requests.values())
    per_mb = total / megabatches
    floor = len(HOOKS) + 1  # one PUT per hook file + one commit record
    mb_per_s = megabatches / elapsed
    extra = {
        "requests": dict(counter.requests),
        "requests_per_megabatch": round(per_mb, 2),
        "bytes_per_megabatch": round(counter.bytes_up / megabatches),
        "tokens_per_megabatch": BATCH * SEQ * BPU,
        "worker_requests_per_s": round(total / elapsed, 1),
        "worker_MB_per_s": round(counter.bytes_up / elapsed / 1e6, 2),
        "at_100_workers_requests_per_s": round(100 * total / elapsed),
        "at_100_workers_MB_per_s": round(100 * counter.bytes_up / elapsed / 1e6, 1),
        "megabatches_per_s": round(mb_per_s, 3),
    }
    ratio = per_mb / floor
    return BenchResult(
        "store-load",
        "requests/megabatch",
        float(floor),
        round(per_mb, 2),
        round(ratio, 3),
        "<= 3x",
        ratio <= 3.0,
        f"{megabatches} megabatches of {BPU}x{BATCH}x{SEQ} tokens, {len(HOOKS)} hooks; startup and final merge included",
        extra,
    )
