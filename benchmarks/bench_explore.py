"""Explore commands against the reader and the bytes they must read, in the same run.

- explore-top: `top --dim 0 -k 20` over a committed float32 run on a LocalStore
  (page cache warm) against the reader's own megabatch iteration over the same
  files (states, input_ids, mask delivered, nothing computed). Runs alternate,
  best of 3 each. Target: >= 0.9x the reader's throughput.
- explore-grep-bytes: bytes `grep` reads (headers + input_ids + mask, through
  the store's ranged reads) against the bytes of input_ids + mask themselves.
  Target: <= 1.2x.

Full size: 8 files of [64, SEQ_LEN, D_MODEL] float32; quick: 4 files of 16 sequences.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.harness import BenchResult, benchmark, throughput_ratio
from benchmarks.runs import HOOK, write_float32_run

RUN = "bench.explore"


def _run(quick: bool):
    from vaultsh.store import LocalStore

    tmp = tempfile.mkdtemp(prefix="vaultsh-bench-explore-")
    store = LocalStore(Path(tmp) / "vault")
    files = write_float32_run(store, RUN, 4 if quick else 8, 16 if quick else 64)
    return store, files


@benchmark("explore-top", "top --dim over a run vs the reader's own iteration of the same files (local)")
def bench_top(quick: bool) -> BenchResult:
    from vaultsh.explore.top import top
    from vaultsh.explore.values import value_fn
    from vaultsh.reader import ActivationReader

    store, files = _run(quick)
    nbytes = sum(size for _, size in files)
    src = f"{RUN}/{HOOK}"

    def reader_pass():
        r = ActivationReader(src, store=store, return_ids=True, return_mask=True, return_file=True)
        for mb in r:
            mb["states"].shape  # noqa: B018 - delivered, not used
        r.close()

    def top_pass():
        top(store, src, None, value_fn(dim=0), k=20)

    t_base = t_ours = float("inf")
    reader_pass()  # warm the page cache and the tokenizer cache
    top_pass()
    for _ in range(3):
        t0 = time.perf_counter()
        reader_pass()
        t_base = min(t_base, time.perf_counter() - t0)
        t0 = time.perf_counter()
        top_pass()
        t_ours = min(t_ours, time.perf_counter() - t0)
    return throughput_ratio(
        "explore-top", nbytes, t_base, t_ours, 0.9, notes=f"{len(files)} files, {nbytes / 1e6:.0f} MB, best of 3"
    )


@benchmark("explore-grep-bytes", "bytes grep reads vs the bytes of input_ids + mask")
def bench_grep_bytes(quick: bool) -> BenchResult:
    from vaultsh.explore.grep import grep

    store, files = _run(quick)
    r = grep(store, RUN, "zzzz-not-there", limit=1)
    ratio = r.bytes_read / r.ids_mask_bytes
    total = sum(size for _, size in files)
    return BenchResult(
        "explore-grep-bytes",
        "bytes",
        r.ids_mask_bytes,
        r.bytes_read,
        round(ratio, 4),
        "<= 1.2x",
        ratio <= 1.2,
        notes=f"of {total:,} bytes in the files ({r.bytes_read / total:.2%})",
    )
