"""Memory estimate of one worker: weights, activations, upload buffers; a batch size that fits.

The model (an estimate, and labelled as one wherever it is shown):

- **weights**: parameters x bytes of the compute dtype. The worker loads the
  whole model (`collector.model`), so that is what a device holds; the share
  the forward pass uses (embeddings + layers 0..deepest hook) is shown too.
  On CPU float16 is computed in float32 (as the loader does).
- **activations per batch** (on the device, peak inside one decoder layer):
  the residual stream and the layer input (2 x B*T*D), the captured hook
  outputs (hooks x B*T*D), the larger of attention's working set
  (q, k, v, output: 2*D + 2*kv_dim per token) and the gated MLP's
  (3 x B*T*d_mlp), all in the compute dtype, plus the [B, T, T] attention mask
  (1 byte per entry). SDPA attention is assumed (no [B, heads, T, T] scores).
- **upload buffers** (host memory, pinned on CUDA): the megabatch being filled
  and up to `max_queued_megabatches` waiting for upload, each
  hooks x rows*T*D in the storage dtype plus input_ids (int64) and mask.
- **per device**: weights / devices + activations, times a 10% allocator
  margin, against `max_per_device_memory`. On CPU everything (weights,
  activations, upload buffers) is in one memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

MARGIN = 1.10  # allocator fragmentation, CUDA context, small temporaries

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'55GB' -> 55e9, '80GiB' -> 80 * 2**30 (the config's max_per_device_memory spellings)."""
    import re

    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*$", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a memory size: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class MemoryInputs:
    """Everything the estimate depends on (so a batch size can be re-evaluated)."""

    params: int
    params_used: int
    compute_bytes: int
    storage_bytes: int
    B: int
    T: int
    D: int
    d_mlp: int
    kv_dim: int
    n_hooks: int
    bpu: int
    queued: int  # max_queued_megabatches
    cpu: bool
    devices: int = 1
    limit: int | None = None  # bytes per device
    limit_source: str = ""
    hook_widths: int = 0  # the hooks' widths summed (0: n_hooks * D)

    @property
    def stored_width(self) -> int:
        return self.hook_widths or self.n_hooks * self.D


@dataclass
class MemoryEstimate:
    weights_loaded: int
    weights_used: int
    activations_per_batch: int
    upload_buffer_per_megabatch: int
    upload_buffers: int
    per_device: int
    host: int
    devices: int
    limit: int | None
    limit_source: str
    fits: bool | None
    suggested_batch_size: int | None = None
    min_devices: int | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def activations_per_batch(m: MemoryInputs, B: int | None = None) -> int:
    B = m.B if B is None else B
    tok = B * m.T
    per_token = (2 * m.D + m.stored_width + max(2 * m.D + 2 * m.kv_dim, 3 * m.d_mlp)) * m.compute_bytes
    return tok * per_token + B * m.T * m.T  # + the [B, T, T] boolean attention mask


def upload_buffer_per_megabatch(m: MemoryInputs, B: int | None = None) -> int:
    B = m.B if B is None else B
    rows = B * m.bpu
    return rows * m.T * m.stored_width * m.storage_bytes + rows * m.T * (8 + 1)


def per_device_bytes(m: MemoryInputs, B: int | None = None) -> int:
    """The estimate compared with the per-device limit, for batch size B."""
    total = math.ceil(m.params * m.compute_bytes / m.devices) + activations_per_batch(m, B)
    if m.cpu:
        total += (m.queued + 1) * upload_buffer_per_megabatch(m, B)
    return math.ceil(total * MARGIN)


def largest_batch_that_fits(m: MemoryInputs) -> int | None:
    """The largest batch size <= the configured one whose estimate fits the limit; None if not even 1 fits."""
    if m.limit is None:
        return None
    if per_device_bytes(m, 1) > m.limit:
        return None
    lo, hi = 1, m.B  # per_device_bytes is increasing in B
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if per_device_bytes(m, mid) <= m.limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def min_devices(m: MemoryInputs, B: int | None = None, max_devices: int = 4096) -> int | None:
    """Fewest devices to spread the weights over so batch size B (default: the configured one) fits (GPU case)."""
    if m.limit is None or m.cpu:
        return None
    lo, hi = m.devices, max_devices  # per_device_bytes is decreasing in devices
    if per_device_bytes(MemoryInputs(**{**asdict(m), "devices": hi}), B) > m.limit:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if per_device_bytes(MemoryInputs(**{**asdict(m), "devices": mid}), B) <= m.limit:
            hi = mid
        else:
            lo = mid + 1
    return lo


def estimate_memory(m: MemoryInputs) -> MemoryEstimate:
    import humanize

    weights = m.params * m.compute_bytes
    act = activations_per_batch(m)
    buf = upload_buffer_per_megabatch(m)
    per_dev = per_device_bytes(m)
    host = (m.queued + 1) * buf + (weights + act if m.cpu else 0)
    est = MemoryEstimate(
        weights_loaded=weights,
        weights_used=m.params_used * m.compute_bytes,
        activations_per_batch=act,
        upload_buffer_per_megabatch=buf,
        upload_buffers=(m.queued + 1) * buf,
        per_device=per_dev,
        host=host,
        devices=m.devices,
        limit=m.limit,
        limit_source=m.limit_source,
        fits=None if m.limit is None else per_dev <= m.limit,
    )
    if est.fits is False and m.limit is not None:  # (it fits unless there is a limit)
        size = humanize.naturalsize
        best = largest_batch_that_fits(m)
        est.suggested_batch_size = best
        where = "per device" if not m.cpu else "in memory"
        msg = (
            f"estimated {size(per_dev, binary=True)} {where} exceeds {m.limit_source} "
            f"({size(m.limit, binary=True)}) at batch_size {m.B}"
        )
        if best is not None:
            msg += f": use batch_size {best} (estimated {size(per_device_bytes(m, best), binary=True)})"
        else:
            nd = min_devices(m)
            at = m.B
            if nd is None:
                nd, at = min_devices(m, 1), 1
            est.min_devices = nd
            if nd is not None and nd > m.devices:
                msg += (
                    f": even batch_size 1 does not fit on {m.devices} device(s); spread the weights over at "
                    f"least {nd} devices (--devices {nd}) for batch_size {at}, or use a smaller dtype"
                )
            else:
                msg += ": even batch_size 1 does not fit; shorten seq_length or use a smaller dtype"
        est.warnings.append(msg)
    return est
