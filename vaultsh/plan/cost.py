"""Request counts and S3 cost of a run, from prices the user gives (no built-in price list).

Requests are counted the way the collector and `vaultsh.store.s3.S3Store` make
them:

- each megabatch file: one PUT below the multipart threshold (64 MiB), else
  CreateMultipartUpload + one UploadPart per 16 MiB part + Complete;
- per megabatch: its commit record (1 PUT) and a statistics snapshot per hook
  (hooks PUTs; the previous snapshot is deleted, DELETEs are free);
- per worker: cfg.json, each hook's metadata.json and statistics.json (up to
  1 + 2 x hooks PUTs), and a few LIST/GET/HEAD requests at start and end.

Megabatch PUTs are exact; the bookkeeping counts are upper bounds (a worker
skips cfg.json/metadata.json another worker already wrote).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

GIB = 2**30
MULTIPART_THRESHOLD = 64 << 20
MULTIPART_CHUNK = 16 << 20
MAX_PARTS = 10_000


@dataclass
class Prices:
    """Prices in the user's currency: per GB-month stored (GB = 2**30 bytes, as S3 bills),
    per 1000 PUT/POST/LIST requests, per 1000 GET/HEAD requests."""

    gb_month: float | None = None
    put_1k: float | None = None
    get_1k: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.gb_month, self.put_1k, self.get_1k))


def put_requests_for_file(size: int) -> int:
    """PUT-class requests boto3's transfer manager makes for one upload of `size` bytes."""
    if size < MULTIPART_THRESHOLD:
        return 1
    chunk = MULTIPART_CHUNK
    while math.ceil(size / chunk) > MAX_PARTS:  # boto3 grows the part size to stay under 10,000 parts
        chunk *= 2
    return 2 + math.ceil(size / chunk)


@dataclass
class RequestCounts:
    data_puts: int
    bookkeeping_puts: int
    gets: int

    @property
    def puts(self) -> int:
        return self.data_puts + self.bookkeeping_puts


def count_requests(file_sizes: Iterable[tuple[int, int]], megabatches: int, hooks: int, workers: int) -> RequestCounts:
    """`file_sizes`: (size, how many files of that size)."""
    data = sum(n * put_requests_for_file(size) for size, n in file_sizes)
    book = megabatches * (1 + hooks) + workers * (1 + 2 * hooks) + workers * 3  # + LISTs at start/end
    gets = workers * (3 + hooks * (2 + workers))  # cfg HEAD/GET, metadata HEADs, stats merge reads
    return RequestCounts(data, book, gets)


@dataclass
class CostEstimate:
    stored_bytes: int
    stored_gib: float
    put_requests: int
    data_put_requests: int
    get_requests: int
    storage_per_month: float | None
    requests_once: float | None
    prices: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_cost(stored_bytes: int, requests: RequestCounts, prices: Prices) -> CostEstimate:
    storage = None if prices.gb_month is None else stored_bytes / GIB * prices.gb_month
    req = None
    if prices.put_1k is not None or prices.get_1k is not None:
        req = requests.puts / 1000 * (prices.put_1k or 0.0) + requests.gets / 1000 * (prices.get_1k or 0.0)
    return CostEstimate(
        stored_bytes=stored_bytes,
        stored_gib=stored_bytes / GIB,
        put_requests=requests.puts,
        data_put_requests=requests.data_puts,
        get_requests=requests.gets,
        storage_per_month=storage,
        requests_once=req,
        prices=asdict(prices),
    )
