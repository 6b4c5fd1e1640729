"""A downloaded file's bytes -> checked CPU tensors (zero-copy views where possible).

Every check that stops garbage from being yielded lives here: the safetensors
header (or a weights-only `.saved.pt` load), tensor shapes and dtype against
metadata.json, the sequence count against the commit record, and optionally
the file's sha256 against the commit record.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass, field

import torch

from vaultsh.dtypes import to_torch_dtype, torch_dtype_by_name
from vaultsh.errors import FormatError
from vaultsh.megabatch import MAX_HEADER_BYTES, SOURCE, load_pt, parse_header

_PROBE = 64 << 10


@dataclass
class Decoded:
    states: torch.Tensor
    input_ids: torch.Tensor
    mask: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    source: torch.Tensor | None = None  # provenance per sequence [N, 3], where the file has it


def metadata_shape(md: dict | None) -> tuple[int, int, int] | None:
    """metadata.json's `shape` [N, T, D], when it is a valid one."""
    shape = md.get("shape") if md else None
    if isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and v >= 0 for v in shape):
        return tuple(shape)  # type: ignore[return-value]
    return None


def metadata_dtype(md: dict | None) -> torch.dtype | None:
    """metadata.json's dtype ("torch.bfloat16") as a torch dtype, looked up by name (never eval'ed)."""
    raw = (md.get("storage_dtype") or md.get("dtype")) if md else None
    if not isinstance(raw, str):
        return None
    return torch_dtype_by_name(raw)


def check_sha256(mv: memoryview, expected: str, uri: str) -> None:
    digest = hashlib.sha256(mv).hexdigest()
    if digest != expected:
        raise FormatError(
            f"{uri}: corrupt: sha256 {digest[:12]}... differs from the commit record's {expected[:12]}..."
        )


def _load_pt_quietly(data: bytes, uri: str) -> dict:
    """An Activault `.saved.pt` dict, loaded with torch.load(weights_only=True) only.

    megabatch.load_pt wraps the load in warnings.catch_warnings(), which swaps
    the process-wide warning filters and is not thread-safe: from a staging
    thread it can swallow the consumer's own warnings. The plain load emits no
    warnings, so it is used here; a load that fails goes through load_pt for
    the same refusal message as everywhere else.
    """
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - reworded (and re-raised) as a FormatError by load_pt
        load_pt(data, uri)
        raise
    states, ids = (obj.get("states"), obj.get("input_ids")) if isinstance(obj, dict) else (None, None)
    if not isinstance(states, torch.Tensor) or states.dim() != 3 or not isinstance(ids, torch.Tensor):
        return load_pt(data, uri)  # not Activault's dict: the same error as everywhere else
    return obj


def decode(buf: torch.Tensor, uri: str, labels: bool = False) -> Decoded:
    """Tensors of a whole file held in the uint8 tensor `buf` (safetensors: views of it; pt: loaded copies)."""
    mv = buf.numpy().data.cast("B")
    size = len(mv)
    if size >= 8:
        (n,) = struct.unpack("<Q", mv[:8])
        head = bytes(mv[: min(size, 8 + n)]) if 1 < n < MAX_HEADER_BYTES else bytes(mv[: min(size, _PROBE)])
    else:
        head = bytes(mv)
    header = parse_header(head, size, uri)  # validates offsets and shapes against the file size
    if header.format == "pt":
        obj = _load_pt_quietly(bytes(mv), uri)
        ids = obj["input_ids"]
        return Decoded(obj["states"], ids, torch.ones(ids.shape, dtype=torch.bool))

    def view(name: str) -> torch.Tensor:
        info = header.tensors[name]
        off = header.data_offset + info.start
        dt = to_torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dt)
        raw = buf[off : off + info.nbytes]
        if off % info.itemsize:
            raw = raw.clone()  # misaligned (a foreign writer): copy
        return raw.view(dt).reshape(info.shape)

    if "states" not in header.tensors or "input_ids" not in header.tensors:
        raise FormatError(f"{uri}: not a megabatch: no 'states' and 'input_ids' tensors")
    ids = view("input_ids")
    mask = view("mask") if "mask" in header.tensors else torch.ones(ids.shape, dtype=torch.bool)
    if mask.dtype != torch.bool:
        mask = mask.to(torch.bool)
    got_labels = {}
    if labels:
        got_labels = {k[len("labels.") :]: view(k) for k in header.tensors if k.startswith("labels.")}
    source = view(SOURCE) if SOURCE in header.tensors else None
    return Decoded(view("states"), ids, mask, got_labels, source)


def check(
    d: Decoded, uri: str, shape: tuple[int, int, int] | None, dtype: torch.dtype | None, n_sequences: int
) -> None:
    """Raise FormatError when the tensors disagree with metadata.json or the commit record."""
    if d.states.dim() != 3:
        raise FormatError(f"{uri}: states has shape {list(d.states.shape)}, expected [N, T, D]")
    n, t, dm = d.states.shape
    if tuple(d.input_ids.shape) != (n, t) or tuple(d.mask.shape) != (n, t):
        raise FormatError(
            f"{uri}: input_ids/mask shapes {list(d.input_ids.shape)}/{list(d.mask.shape)} "
            f"do not match states {[n, t, dm]}"
        )
    if shape is not None:
        n0, t0, d0 = shape
        if (t, dm) != (t0, d0) or n > n0 or n == 0:
            raise FormatError(
                f"{uri}: shape {[n, t, dm]} differs from metadata.json shape {[n0, t0, d0]} "
                f"(expected [N <= {n0}, {t0}, {d0}])"
            )
    if dtype is not None and d.states.dtype != dtype:
        raise FormatError(f"{uri}: dtype {d.states.dtype} differs from metadata.json dtype {dtype}")
    if n_sequences and n != n_sequences:
        raise FormatError(f"{uri}: {n} sequences, the commit record says {n_sequences}")
    if d.input_ids.dtype.is_floating_point or d.input_ids.dtype == torch.bool:
        raise FormatError(f"{uri}: input_ids has dtype {d.input_ids.dtype}, expected integers")
