"""`vaultsh plan` sizing speed: exact bytes of many megabatch files without sizing each one.

- plan-storage: `vaultsh.plan.storage.hook_storage` (headers sized once per run
  of equal-length numbers, found by bisection) against the baseline of
  building every file's real safetensors header (what a naive exact count
  does), for one hook of a run with 20,000 (quick: 5,000) megabatches over
  4 workers. Both give the same byte count (checked). Target: >= 20x.
"""

from __future__ import annotations

import time

from benchmarks.harness import BenchResult, benchmark

KW = dict(
    run_name="bench.plan",
    hook="blocks.16.hook_resid_post",
    model="meta-llama/Llama-3.1-8B-Instruct",
    fmt="safetensors",
    dtype="bfloat16",
    itemsize=2,
    B=16,
    T=2048,
    D=4096,
    bpu=8,
    start_batch=0,
    num_runs=4,
)


@benchmark("plan-storage", "exact megabatch byte counts: bisection over header lengths vs sizing every file")
def bench_plan_storage(quick: bool) -> BenchResult:
    from vaultsh.plan.storage import _safetensors_prefix_len, hook_storage, size_every_file

    n_batches = (5_000 if quick else 20_000) * KW["bpu"] + 3
    _safetensors_prefix_len.cache_clear()
    t0 = time.perf_counter()
    files_b, bytes_b = size_every_file(**KW, n_batches=n_batches)
    t_base = time.perf_counter() - t0
    _safetensors_prefix_len.cache_clear()
    t0 = time.perf_counter()
    hs = hook_storage(**KW, n_batches=n_batches)
    t_ours = time.perf_counter() - t0
    same = (hs.files, hs.bytes) == (files_b, bytes_b)
    ratio = t_base / t_ours if t_ours > 0 else float("inf")
    return BenchResult(
        "plan-storage",
        "files sized per second",
        round(files_b / t_base),
        round(hs.files / t_ours),
        round(ratio, 1),
        ">= 20x",
        same and ratio >= 20,
        notes=f"{hs.files} files, {hs.bytes} bytes; counts equal: {same}",
        extra={"baseline_s": t_base, "ours_s": t_ours},
    )
