"""A small benchmark harness: a registry, a result type and a timer.

Each benchmark measures a baseline (raw forward pass, raw boto3, raw file I/O)
and our code in the same process, and reports the ratio against a target.
`vaultsh bench` discovers every `benchmarks/bench_*.py` module and runs them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field


@dataclass
class BenchResult:
    name: str
    metric: str  # what baseline/ours measure, e.g. "MB/s", "bytes"
    baseline: float | None
    ours: float
    ratio: float | None
    target: str  # e.g. ">= 0.8x" or "< 1 MB"
    passed: bool
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Benchmark:
    name: str
    description: str
    func: Callable[[bool], BenchResult]


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, description: str):
    """Register `func(quick: bool) -> BenchResult` under `name`."""

    def wrap(func):
        REGISTRY[name] = Benchmark(name, description, func)
        return func

    return wrap


def discover() -> dict[str, Benchmark]:
    """Import every benchmarks/bench_*.py module so it registers itself."""
    import benchmarks

    for mod in pkgutil.iter_modules(benchmarks.__path__):
        if mod.name.startswith("bench_"):
            importlib.import_module(f"benchmarks.{mod.name}")
    return REGISTRY


@contextlib.contextmanager
def scratch_bucket(default_endpoint: bool = False) -> Iterator[tuple[str, str]]:
    """(bucket, endpoint URL): a fresh bucket on the loopback S3 server, with fake credentials; emptied after.
    With `default_endpoint`, S3_ENDPOINT_URL names the server meanwhile, so that a bare `s3://bucket/...` URI
    (`open_location`) reaches it."""
    from vaultsh.testing import s3server

    s3server.use_fake_credentials()
    endpoint = s3server.endpoint()
    bucket = s3server.new_bucket()
    if default_endpoint:
        os.environ["S3_ENDPOINT_URL"] = endpoint
    try:
        yield bucket, endpoint
    finally:
        s3server.empty_bucket(bucket)
        if default_endpoint:
            os.environ.pop("S3_ENDPOINT_URL", None)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The shortest wall time (seconds) of `repeats` calls to `fn`."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def alternating_best(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """The shortest time of each side over `rounds` rounds, by name. Every round runs each side once, in
    reverse order every other round, so that no side always runs first (or right after the same one). A side
    is a callable that does its work once and returns the seconds it took."""
    names = list(sides)
    best = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            best[name] = min(best[name], sides[name]())
    return best


def rate_ratio(name, metric, base, ours, minimum, notes="", extra=None, digits: int | None = 1) -> BenchResult:
    """A result comparing two rates in `metric` (higher is better; shown rounded to `digits`): it passes when
    ours / base >= `minimum`."""
    ratio = ours / base
    return BenchResult(
        name,
        metric,
        round(base, digits),
        round(ours, digits),
        round(ratio, 3),
        f">= {minimum}x",
        ratio >= minimum,
        notes,
        extra or {},
    )


def throughput_ratio(name, nbytes, t_base, t_ours, minimum, notes="", extra=None) -> BenchResult:
    """A result comparing two timings of moving `nbytes` (higher MB/s is better)."""
    return rate_ratio(name, "MB/s", nbytes / t_base / 1e6, nbytes / t_ours / 1e6, minimum, notes, extra)
