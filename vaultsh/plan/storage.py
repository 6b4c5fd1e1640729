"""Exact bytes and file counts a run writes, from the real megabatch format.

Every megabatch file's size is computed the way the worker writes it:

- safetensors: `vaultsh.megabatch.build_header` is called on ``meta``-device
  tensors of the real shapes and dtypes (``states [n, T, D]`` in the storage
  dtype, ``input_ids`` int64, ``mask`` bool, ``source`` int64 [n, 3]) with the header metadata the
  worker puts in (run, hook, model, worker, megabatch, batch range, tokenizer,
  creation time), so the JSON header, its padding and the data offsets are
  the real ones. Header lengths change only where a number gains a digit, so
  the megabatches of a worker are walked in runs of equal-length headers
  (bisection), not one by one: a plan of millions of files is instant.
- pt: `torch.save` of Activault's dict into a byte counter, with tensors of
  the real shapes backed by untouched anonymous memory (no RAM is used, the
  data is never read: the CRC is switched off for the count).

One thing is not exact by construction: the creation timestamp is written with
microseconds, which Python's ``isoformat()`` leaves out when they are zero
(one file in a million is then 7 bytes shorter before padding).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

#: a creation time of the length the worker writes (datetime.now(timezone.utc).isoformat())
_CREATED = "2026-01-01T00:00:00.000000+00:00"

ID_BYTES = 8  # input_ids are int64
MASK_BYTES = 1  # mask is bool
SOURCE_BYTES = 3 * 8  # provenance: source [N, 3] int64 per sequence


@dataclass(frozen=True)
class MegabatchSpan:
    """One megabatch of one worker: global batch range and row count."""

    worker: int
    index: int
    batch_start: int
    batch_end: int
    batches: int


def worker_batches(n_batches: int, start_batch: int, num_runs: int, worker: int) -> range:
    """Global batch indices worker `worker` is assigned (as `collector.data.BatchStream.batch_indices`)."""
    first = start_batch + (worker - start_batch) % num_runs
    return range(first, max(first, n_batches), num_runs)


def megabatch_spans(batches: range, bpu: int, worker: int, keep_short: bool) -> tuple[int, MegabatchSpan | None]:
    """(number of full megabatches, the short final megabatch or None)."""
    n = len(batches)
    full, rem = divmod(n, bpu)
    if rem == 0 or not keep_short:
        return full, None
    first = full * bpu
    return full, MegabatchSpan(worker, full, batches[first], batches[n - 1] + 1, rem)


def _full_span(batches: range, bpu: int, worker: int, i: int) -> MegabatchSpan:
    return MegabatchSpan(worker, i, batches[i * bpu], batches[i * bpu + bpu - 1] + 1, bpu)


def equal_length_runs(count: int, key: Callable[[int], Any]) -> Iterator[tuple[int, int]]:
    """(first, last) index runs of [0, count) over which the monotone `key` is constant.

    `key` must be non-decreasing in every component, so equal keys at both ends
    of a range mean the key is constant on it.
    """
    stack = [(0, count - 1)] if count > 0 else []
    out = []
    while stack:
        lo, hi = stack.pop()
        if key(lo) == key(hi):
            out.append((lo, hi))
            continue
        mid = (lo + hi) // 2
        stack.append((lo, mid))
        stack.append((mid + 1, hi))
    out.sort()
    # merge neighbours with equal keys (bisection may split a run)
    merged: list[tuple[int, int]] = []
    for lo, hi in out:
        if merged and key(merged[-1][0]) == key(lo):
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return iter(merged)


def file_metadata(run_name: str, hook: str, model: str, span: MegabatchSpan) -> dict[str, Any]:
    """The `__metadata__` the worker writes into a megabatch (before format/format_version)."""
    from vaultsh.megabatch import file_metadata as worker_metadata

    return worker_metadata(
        run_name, hook, model, span.worker, span.index, span.batch_start, span.batch_end, created=_CREATED
    )


@lru_cache(maxsize=4096)
def _safetensors_prefix_len(rows: int, T: int, D: int, dtype: str, meta_items: tuple) -> int:
    import torch

    from vaultsh import megabatch as mbf

    with torch.device("meta"):
        tensors = {
            "states": torch.empty((rows, T, D), dtype=getattr(torch, dtype)),
            "input_ids": torch.empty((rows, T), dtype=torch.int64),
            "mask": torch.empty((rows, T), dtype=torch.bool),
            mbf.SOURCE: torch.empty((rows, 3), dtype=torch.int64),
        }
    meta = {str(k): str(v) for k, v in meta_items}
    meta["format"] = mbf.FORMAT_NAME
    meta["format_version"] = str(mbf.FORMAT_VERSION)
    prefix, _ = mbf.build_header(tensors, meta)
    return len(prefix)


def data_bytes(rows: int, T: int, D: int, itemsize: int) -> int:
    """Tensor bytes of one safetensors megabatch: states + input_ids + mask + source."""
    return rows * T * (D * itemsize + ID_BYTES + MASK_BYTES) + rows * SOURCE_BYTES


def safetensors_file_size(rows: int, T: int, D: int, dtype: str, itemsize: int, meta: dict[str, Any]) -> int:
    return _safetensors_prefix_len(rows, T, D, dtype, tuple(meta.items())) + data_bytes(rows, T, D, itemsize)


class _Counter:
    """A write-only file that counts bytes and never reads them."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, b: Any) -> int:
        k = memoryview(b).nbytes
        self.n += k
        return k

    def flush(self) -> None:
        pass


def _untouched(shape: tuple[int, ...], dtype: Any) -> Any:
    """A CPU tensor of `shape` over anonymous memory that is never touched (costs no RAM)."""
    import math

    import torch

    n = math.prod(shape)
    item = torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(1, n * item))
    return torch.frombuffer(buf, dtype=dtype, count=n).reshape(shape)


@lru_cache(maxsize=64)
def pt_file_size(rows: int, T: int, D: int, dtype: str) -> int:
    """Exact size of Activault's `.saved.pt` dict as the worker `torch.save`s it."""
    import torch

    states = _untouched((rows, T, D), getattr(torch, dtype))
    ids = _untouched((rows, T), torch.int64)
    obj = {
        "states": states,
        "input_ids": ids,
        "tensor_bytes": states.numel() * states.element_size() + ids.numel() * ids.element_size(),
    }
    counter = _Counter()
    try:
        import torch.utils.serialization.config as scfg

        patch = scfg.patch(**{"save.compute_crc32": False})  # type: ignore[attr-defined]  # added at import time
    except (ImportError, AttributeError):  # older torch: the CRC reads the zero pages (slower, same size)
        from contextlib import nullcontext

        patch = nullcontext()
    with patch:
        torch.save(obj, counter)  # type: ignore[arg-type]  # it needs only write(); the stub asks for IO[bytes]
    return counter.n


@dataclass
class WorkerFiles:
    worker: int
    batches: int = 0
    files: int = 0  # megabatch files of one hook
    sequences: int = 0
    bytes: int = 0
    dropped_batches: int = 0  # pt: short final megabatch not written


@dataclass
class HookStorage:
    """What one hook writes over the whole run."""

    hook: str
    files: int = 0
    sequences: int = 0
    tokens: int = 0  # token positions stored (N x T, padding included)
    bytes: int = 0
    bytes_per_megabatch: int = 0  # a full megabatch file (first one; all full ones within a few bytes)
    min_file_bytes: int = 0
    max_file_bytes: int = 0
    per_worker: list[WorkerFiles] = field(default_factory=list)
    #: file size -> number of files of that size (the exact size distribution)
    size_counts: dict[int, int] = field(default_factory=dict)

    def add(self, size: int, n: int = 1) -> None:
        self.size_counts[size] = self.size_counts.get(size, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "files": self.files,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "bytes_per_megabatch": self.bytes_per_megabatch,
            "min_file_bytes": self.min_file_bytes,
            "max_file_bytes": self.max_file_bytes,
            "per_worker": [vars(w).copy() for w in self.per_worker],
        }


def hook_storage(
    *,
    run_name: str,
    hook: str,
    model: str,
    fmt: str,
    dtype: str,
    itemsize: int,
    B: int,
    T: int,
    D: int,
    bpu: int,
    n_batches: int,
    start_batch: int,
    num_runs: int,
) -> HookStorage:
    """Exact files, sequences, token positions and bytes one hook's directory gets."""
    hs = HookStorage(hook)
    sizes: list[int] = []
    full_sizes: list[int] = []
    for w in range(num_runs):
        batches = worker_batches(n_batches, start_batch, num_runs, w)
        full, short = megabatch_spans(batches, bpu, w, keep_short=(fmt == "safetensors"))
        wf = WorkerFiles(worker=w, batches=len(batches))
        if fmt == "pt":
            wf.dropped_batches = len(batches) - full * bpu
            if full:
                size = pt_file_size(B * bpu, T, D, dtype)
                wf.bytes += full * size
                hs.add(size, full)
                sizes.append(size)
                full_sizes.append(size)
        else:

            def key(i: int, batches: range = batches, w: int = w) -> tuple[int, int, int]:
                s = _full_span(batches, bpu, w, i)
                return (len(str(s.index)), len(str(s.batch_start)), len(str(s.batch_end)))

            for lo, hi in equal_length_runs(full, key):
                meta = file_metadata(run_name, hook, model, _full_span(batches, bpu, w, lo))
                size = safetensors_file_size(B * bpu, T, D, dtype, itemsize, meta)
                wf.bytes += size * (hi - lo + 1)
                hs.add(size, hi - lo + 1)
                sizes.append(size)
                full_sizes.append(size)
            if short is not None:
                meta = file_metadata(run_name, hook, model, short)
                size = safetensors_file_size(B * short.batches, T, D, dtype, itemsize, meta)
                wf.bytes += size
                hs.add(size)
                sizes.append(size)
        wf.files = full + (1 if short is not None else 0)
        wf.sequences = (full * bpu + (short.batches if short is not None else 0)) * B
        hs.per_worker.append(wf)
        hs.files += wf.files
        hs.sequences += wf.sequences
        hs.bytes += wf.bytes
    hs.tokens = hs.sequences * T
    if sizes:
        hs.bytes_per_megabatch = (full_sizes or sizes)[0]
        hs.min_file_bytes, hs.max_file_bytes = min(sizes), max(sizes)
    return hs


def size_every_file(**shape: Any) -> tuple[int, int]:
    """(files, bytes) of one hook's safetensors megabatches, each file sized from its own header: the naive exact
    count that `hook_storage` (given the same keyword arguments) must equal, one header per file. The reference for
    tests and the `plan-storage` benchmark's baseline."""
    if shape["fmt"] != "safetensors":
        raise ValueError(f"size_every_file sizes safetensors files, not {shape['fmt']!r}")
    num_runs, bpu, B, T, D = shape["num_runs"], shape["bpu"], shape["B"], shape["T"], shape["D"]
    total = files = 0
    for w in range(num_runs):
        batches = worker_batches(shape["n_batches"], shape["start_batch"], num_runs, w)
        full, short = megabatch_spans(batches, bpu, w, keep_short=True)
        spans = [_full_span(batches, bpu, w, i) for i in range(full)] + ([short] if short else [])
        for span in spans:
            meta = file_metadata(shape["run_name"], shape["hook"], shape["model"], span)
            total += safetensors_file_size(B * span.batches, T, D, shape["dtype"], shape["itemsize"], meta)
            files += 1
    return files, total
