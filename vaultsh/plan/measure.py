"""`--measure`: time a few real batches on this machine, and optionally the store's upload rate.

The compute side reuses the collector's own parts: `collector.model` loads the
model as a worker does, `collector.data.BatchStream` makes worker 0's first
batches, `collector.capture.ActivationCapture` runs the truncated forward pass,
and each hook's output is copied into a host buffer of the storage dtype and
folded into running statistics, as the worker loop does. The first batch is a
warm-up and is not timed.

The upload side (`measure_upload`) writes `upload_workers` probe objects of one
megabatch file's size (capped) in parallel under `{run}/_vaultsh/plan-probe/`
and deletes them again; nothing in the run's hook directories is touched.
"""

from __future__ import annotations

import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

PROBE_CAP = 256 << 20


@dataclass
class ComputeMeasurement:
    device: str
    batches_timed: int
    seconds_per_batch: float
    tokens_per_s: float  # token positions (padding included) per second
    real_token_fraction: float  # share of positions the mask keeps
    load_seconds: float
    peak_device_bytes: int | None
    peak_rss_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_compute(cfg: Any, specs: list, batches: int = 3) -> ComputeMeasurement:
    """Load the model as the worker does and time `batches` batches after one warm-up."""
    import psutil
    import torch

    from collector.capture import ActivationCapture
    from collector.data import BatchStream
    from collector.model import load_model_and_tokenizer
    from vaultsh.stats import RunningStats

    t0 = time.perf_counter()
    model, tokenizer, device = load_model_and_tokenizer(cfg.model)
    load_s = time.perf_counter() - t0
    name = cfg.storage.dtype or cfg.model.dtype
    sdtype = model.dtype if name == "auto" else getattr(torch, name)
    data = cfg.data.model_copy(
        update={"n_batches": min(cfg.data.n_batches, cfg.data.start_batch + (batches + 1) * cfg.num_runs)}
    )
    stream = BatchStream(data, tokenizer, worker=0, num_workers=cfg.num_runs)
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    positions = real = 0
    hosts: dict[str, Any] = {}
    with ActivationCapture(model, specs) as capture, torch.inference_mode():
        for i, batch in enumerate(stream):
            if i > batches:
                break
            start = time.perf_counter()
            inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)}
            outputs = capture.run(**inputs)
            mask = batch.mask.to(device).reshape(-1)
            for h, out in outputs.items():
                D = out.shape[-1]
                RunningStats(D).update(out.reshape(-1, D), mask)
                if (
                    h not in hosts or hosts[h].shape != out.shape
                ):  # allocated in the warm-up, as the worker preallocates
                    hosts[h] = torch.empty(out.shape, dtype=sdtype, pin_memory=cuda)
                hosts[h].copy_(out)
            if cuda:
                torch.cuda.synchronize()
            if i > 0:  # batch 0 warms up
                times.append(time.perf_counter() - start)
                positions += batch.input_ids.numel()
                real += int(batch.mask.sum())
    if not times:
        raise RuntimeError("the data source gave fewer than 2 batches: nothing to time")
    per_batch = statistics.median(times)
    return ComputeMeasurement(
        device=str(device),
        batches_timed=len(times),
        seconds_per_batch=per_batch,
        tokens_per_s=(positions / len(times)) / per_batch,
        real_token_fraction=real / positions if positions else 0.0,
        load_seconds=load_s,
        peak_device_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None,
        peak_rss_bytes=int(psutil.Process().memory_info().rss),
    )


def measure_upload(cfg: Any, file_bytes: int, store: Any = None) -> dict[str, Any]:
    """Aggregate upload rate (bytes/s) of `upload_workers` parallel writes of one file's size (capped)."""
    from vaultsh.run import Run
    from vaultsh.store import open_store

    store = store if store is not None else open_store(cfg.storage.uri)
    run = Run(store, cfg.run_name)
    size = max(1, min(file_bytes, PROBE_CAP))
    n = cfg.upload.upload_workers
    tag = uuid.uuid4().hex[:12]
    keys = [f"{run.internal_prefix}plan-probe/{tag}-{i}.bin" for i in range(n)]
    chunk = bytes(min(size, 8 << 20))

    def put(key: str) -> None:
        def writer(f: Any) -> None:
            left = size
            while left > 0:
                k = min(left, len(chunk))
                f.write(memoryview(chunk)[:k])
                left -= k

        store.put_stream(key, writer)

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=n) as ex:
            list(ex.map(put, keys))
        elapsed = time.perf_counter() - start
    finally:
        for k in keys:
            try:
                store.delete(k)
            except Exception:
                pass
    return {
        "bytes_per_s": n * size / max(elapsed, 1e-9),
        "objects": n,
        "object_bytes": size,
        "seconds": elapsed,
        "store": store.child_uri(run.internal_prefix + "plan-probe/"),
    }
