"""Staging: checked CPU tensors -> what the caller gets (device, dtype, normalisation, token view).

Runs in the prefetcher's background threads. On CUDA the copies are
`non_blocking` from pinned buffers on a side stream; the consumer's stream
waits on an event before it touches them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from vaultsh.dtypes import float_name, torch_dtype_by_name
from vaultsh.errors import UserError
from vaultsh.reader.filters import TokenFilter, check_aligned
from vaultsh.stats import RunningStats

NORMALIZE_MODES = ("center", "unit_norm", "mean_norm_sqrt_d", "center_unit_norm", "standardize")


def parse_dtype(dtype) -> torch.dtype | None:
    """A floating torch dtype from a dtype or a name ("bfloat16", "torch.float16", "bf16"); None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        name = str(dtype).strip()
        found = torch_dtype_by_name(float_name(name) or name)
        if found is None:
            raise UserError(f"dtype {dtype!r} is not a torch floating point dtype (e.g. float32, bfloat16, float16)")
        dt = found
    if not dt.is_floating_point:
        raise UserError(f"dtype {dtype!r} is not a floating point dtype (states are activations)")
    return dt


def seed_of(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (never Python's per-process salted hash)."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFFFFFFFFFFFFFF


Norm = tuple[torch.Tensor | None, "torch.Tensor | float"]


def normalizer(stats: RunningStats, mode: str) -> Norm:
    """(shift, scale) with y = (x - shift) * scale for a normalisation mode."""
    mean = torch.from_numpy(stats.mean.copy())
    if mode == "center":
        return mean, 1.0
    if mode == "unit_norm":
        if not stats.mean_norm > 0:
            raise UserError("normalize='unit_norm' needs a positive mean norm in statistics.json")
        return None, 1.0 / stats.mean_norm
    if mode == "mean_norm_sqrt_d":  # SAELens' expected_average_only_in: mean norm sqrt(d_model)
        if not stats.mean_norm > 0:
            raise UserError("normalize='mean_norm_sqrt_d' needs a positive mean norm in statistics.json")
        return None, math.sqrt(stats.d) / stats.mean_norm
    if mode == "center_unit_norm":
        rms = math.sqrt(float(stats.var.sum()))
        if not rms > 0:
            raise UserError("normalize='center_unit_norm' needs a positive variance in statistics.json")
        return mean, 1.0 / rms
    if mode == "standardize":
        std = torch.from_numpy(stats.std.copy())
        return mean, torch.where(std > 0, 1.0 / std, torch.ones_like(std))
    raise UserError(f"normalize={mode!r} is not allowed; use one of {', '.join(NORMALIZE_MODES)} or None")


@dataclass
class Staged:
    """One megabatch ready for the consumer: the states of each of its files (hooks), in task order."""

    states: list[torch.Tensor]
    input_ids: torch.Tensor | None
    mask: torch.Tensor | None
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0  # tokens kept (unmasked and not filtered)
    positions: int = 0  # N * T
    sequences: int = 0
    source: torch.Tensor | None = None  # provenance: [N, 3] per sequence, [tokens, 4] in token mode
    dropped: dict[str, int] = field(default_factory=dict)  # tokens each filter dropped
    event: Any = None  # a CUDA event the consumer's stream waits on
    aliases: bool = False  # some tensors are views of the download buffer


@dataclass
class StagedPart:
    """One decoded file of a megabatch: which source (hook directory) it came from, its tensors, its URI."""

    source: int
    states: torch.Tensor
    input_ids: torch.Tensor
    mask: torch.Tensor
    labels: dict[str, torch.Tensor]
    uri: str
    provenance: torch.Tensor | None = None  # [N, 3] as stored, where the file has it


class Stager:
    """Device copy, dtype conversion, normalisation, token filters and (token mode) masked-token removal.

    Every file of a megabatch keeps the same tokens in the same order: one keep
    mask (from the first file's mask and ids and the filter's reference hook)
    and one permutation serve all of them.
    """

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype | None,
        norms: list[Norm] | None,
        tokens: bool,
        return_ids: bool,
        return_mask: bool,
        return_labels: bool,
        token_shuffle_seed: int | None,
        token_filter: TokenFilter | None = None,
        return_source: bool = False,
    ):
        self.device = device
        self.dtype = dtype
        self.norms = norms
        self.tokens = tokens
        self.return_ids = return_ids or tokens  # token mode keeps ids aligned through the mixer
        self.return_mask = return_mask and not tokens
        self.return_labels = return_labels and not tokens
        self.token_shuffle_seed = token_shuffle_seed
        self.filter = token_filter if token_filter is not None and token_filter.active else None
        self.return_source = return_source
        self.tls = threading.local()

    def _stream(self):
        if self.device.type != "cuda":
            return None
        s = getattr(self.tls, "stream", None)
        if s is None:
            s = self.tls.stream = torch.cuda.Stream(device=self.device)
        return s

    def _convert(self, states: torch.Tensor, source: int) -> torch.Tensor:
        out_dtype = self.dtype or states.dtype
        if self.norms is None:
            return states if states.dtype == out_dtype else states.to(out_dtype)
        shift, scale = self.norms[source]
        work = torch.float64 if out_dtype == torch.float64 else torch.float32
        x = states.to(work, copy=True)
        if shift is not None:
            x.sub_(shift.to(device=x.device, dtype=work))
        if isinstance(scale, torch.Tensor):
            x.mul_(scale.to(device=x.device, dtype=work))
        elif scale != 1.0:
            x.mul_(scale)
        return x if x.dtype == out_dtype else x.to(out_dtype)

    def stage(self, parts: list[StagedPart], buf: torch.Tensor, pos: int) -> Staged:
        first = parts[0]
        for p in parts[1:]:
            check_aligned(first.input_ids, p.input_ids, first.uri, p.uri)
        ids, mask, labels = first.input_ids, first.mask, first.labels
        n, t = ids.shape
        dropped: dict[str, int] = {}
        if self.filter is not None:
            ref = parts[self.filter.norm_part].states if self.filter.max_norm is not None else None
            mask, dropped = self.filter.keep(ids, mask, ref)
        elif self.tokens:
            dropped = {"masked": int(mask.numel() - int(mask.sum()))}
        out = Staged([p.states for p in parts], None, None, sequences=n, positions=n * t, dropped=dropped)
        out.tokens = int(mask.sum())
        src = self._source(first, n, t) if self.return_source else None
        stream = self._stream()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if stream is not None:
                ids = ids.to(self.device, non_blocking=True)
                mask = mask.to(self.device, non_blocking=True)
                labels = {k: v.to(self.device, non_blocking=True) for k, v in labels.items()}
            perm = None
            if self.token_shuffle_seed is not None:  # Activault: tokens shuffled within the megabatch
                g = torch.Generator().manual_seed(seed_of(self.token_shuffle_seed, pos, 1))
                perm = torch.randperm(n * t, generator=g).to(ids.device)
                ids, mask = ids.reshape(n * t)[perm].reshape(n, t), mask.reshape(n * t)[perm].reshape(n, t)
            keep = mask.reshape(n * t) if self.tokens and out.tokens != n * t else None
            states = []
            for p in parts:
                x = p.states.to(self.device, non_blocking=True) if stream is not None else p.states
                x = self._convert(x, p.source)
                d = x.shape[-1]
                if perm is not None:
                    x = x.reshape(n * t, d)[perm].reshape(n, t, d)
                if self.tokens:
                    x = x.reshape(n * t, d)
                    if keep is not None:
                        x = x[keep]
                states.append(x)
            if self.tokens:
                ids = ids.reshape(n * t)
                if keep is not None:
                    ids = ids[keep]
                if src is not None:
                    src = src.reshape(n * t, 4)
                    if perm is not None:
                        src = src[perm.cpu()]
                    if keep is not None:
                        src = src[keep.cpu()]
            if ids.dtype != torch.int64:
                ids = ids.to(torch.int64)
            if stream is not None:
                out.event = torch.cuda.Event()
                out.event.record(stream)
        if out.event is not None:
            out.event.synchronize()  # the pinned buffer is released once the copies are done
        out.states = states
        out.input_ids = ids if self.return_ids else None
        out.mask = mask if self.return_mask else None
        out.labels = labels if self.return_labels else {}
        out.source = src
        raw = buf.untyped_storage().data_ptr()

        def view(x: torch.Tensor | None) -> bool:
            return x is not None and x.device.type == "cpu" and x.untyped_storage().data_ptr() == raw

        out.aliases = any(view(x) for x in out.states)
        if not out.aliases:
            # the states are copies (device, dtype, token mode): copy the small tensors too, so the
            # download buffer is freed now rather than kept alive by an input_ids view
            c = lambda x: x.clone() if view(x) else x  # noqa: E731
            out.input_ids, out.mask = c(out.input_ids), c(out.mask)
            out.labels = {k: c(v) for k, v in out.labels.items()}
        return out

    def _source(self, part: StagedPart, n: int, t: int) -> torch.Tensor:
        """Provenance: [N, 3] per sequence as stored (-1 where the file has none); in token mode
        [N, T, 4] per token: the sequence's three values and the token's position in the sequence."""
        seq = (
            part.provenance.to(torch.int64)
            if part.provenance is not None
            else torch.full((n, 3), -1, dtype=torch.int64)
        )
        if not self.tokens:
            return seq.clone()
        pos = torch.arange(t, dtype=torch.int64).expand(n, t)
        return torch.cat([seq[:, None, :].expand(n, t, 3), pos[..., None]], dim=-1)

    def deliver(self, item: Staged) -> None:
        """On the consumer's thread: make its CUDA stream wait for the copies."""
        if item.event is None:
            return
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(item.event)
        for x in (*item.states, item.input_ids, item.mask, *item.labels.values()):
            if x is not None and x.is_cuda:
                x.record_stream(cur)
