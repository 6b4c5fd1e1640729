"""Megabatch write throughput and header-read size, against plain file I/O.

- megabatch-write: `write_megabatch` of a 256 MB (quick: 32 MB) float32
  megabatch to a LocalStore, against writing the same tensor bytes to a plain
  file in the same directory. Both are fsynced (the store must be durable, so a
  baseline without fsync would measure the page cache, not the disk). Runs
  alternate and the best of each is kept. Target: >= 0.8x.
- megabatch-header-read: bytes `read_header` fetches from that file. Target:
  < 1 MB, independent of the file size.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.harness import BenchResult, benchmark, throughput_ratio

SEQ_LEN = 1024
D_MODEL = 1024


def _tensors(quick: bool):
    import torch

    mb_bytes = (32 if quick else 256) << 20
    n = mb_bytes // (SEQ_LEN * D_MODEL * 4)
    g = torch.Generator().manual_seed(0)
    states = torch.randn(n, SEQ_LEN, D_MODEL, generator=g)
    ids = torch.randint(0, 50_000, (n, SEQ_LEN), generator=g)
    return states, ids


@benchmark("megabatch-write", "write_megabatch to a LocalStore vs plain file writes of the same bytes")
def bench_write(quick: bool) -> BenchResult:
    from vaultsh.megabatch import _raw_view, write_megabatch
    from vaultsh.store.local import LocalStore

    states, ids = _tensors(quick)
    repeats = 3 if quick else 5
    with tempfile.TemporaryDirectory(prefix="vaultsh-bench-") as tmp:
        store = LocalStore(Path(tmp) / "store")
        plain = Path(tmp) / "store" / "plain.bin"
        views = [_raw_view(states), _raw_view(ids)]

        def baseline() -> None:
            with open(plain, "wb") as f:
                for v in views:
                    f.write(v)
                f.flush()
                os.fsync(f.fileno())

        def ours() -> int:
            return write_megabatch(store, "hook/mb.safetensors", states, ids, metadata={"hook": "hook"})

        written = ours()  # warm-up (allocations, lazy imports)
        t_base = t_ours = float("inf")
        for _ in range(repeats):
            for fn, target in ((baseline, plain), (ours, store.root / "hook" / "mb.safetensors")):
                target.unlink(missing_ok=True)
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if fn is baseline:
                    t_base = min(t_base, dt)
                else:
                    t_ours = min(t_ours, dt)
    nbytes = sum(v.nbytes for v in views)
    return throughput_ratio(
        "megabatch-write",
        nbytes,
        t_base,
        t_ours,
        0.8,
        notes=f"{nbytes / 1e6:.0f} MB of tensors, file {written / 1e6:.1f} MB; both fsynced; best of {repeats}",
        extra={"tensor_bytes": nbytes, "file_bytes": written},
    )


@benchmark("megabatch-header-read", "bytes read_header fetches from a large megabatch")
def bench_header_read(quick: bool) -> BenchResult:
    from tests.fakes import CountingStore
    from vaultsh.megabatch import read_header, write_megabatch
    from vaultsh.store.local import LocalStore

    states, ids = _tensors(quick)
    with tempfile.TemporaryDirectory(prefix="vaultsh-bench-") as tmp:
        store = LocalStore(tmp)
        size = write_megabatch(store, "mb.safetensors", states, ids, metadata={"hook": "hook"})
        counting = CountingStore(store)
        header = read_header(counting, "mb.safetensors")
    ok = counting.bytes_read < (1 << 20) and counting.calls <= 2 and header.n_sequences == states.shape[0]
    return BenchResult(
        "megabatch-header-read",
        "bytes",
        None,
        float(counting.bytes_read),
        None,
        "< 1 MB in <= 2 reads",
        ok,
        notes=f"{counting.calls} ranged read(s) of a {size / 1e6:.0f} MB file",
        extra={"file_bytes": size, "reads": counting.calls},
    )
