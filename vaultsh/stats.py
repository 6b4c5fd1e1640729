"""Mergeable, exact running statistics per feature (count, mean, M2, mean norm).

One `RunningStats` per hook accumulates, in float64, the per-feature mean and
M2 (sum of squared deviations from the mean, so the variance is exact) and the
sum of per-token L2 norms. Batches are reduced with a two-pass algorithm inside
fixed-size chunks and combined with Chan et al.'s parallel formula, so results
stay accurate even when values sit on a large offset (naive sum-of-squares
would cancel catastrophically). The same formula merges batches within a
worker and workers within a run, in any order and any tree shape.

statistics.json carries Activault's fields (`mean`, `std`, `norm`, `M2`) plus
`count`, `d_model` and `norm_sum`, which make `from_activault_json` an exact
inverse of `to_activault_json`. `to_bytes`/`from_bytes` give an exact binary
form (safetensors, float64) for per-worker partial statistics.

torch is never imported at module import time. A torch tensor on an
accelerator is reduced there, in float64, and only 2*d+1 numbers come back; a
CPU tensor (any dtype, bfloat16 included) is converted chunk by chunk by torch
into a reused float64 numpy buffer and reduced by numpy; anything else goes
through numpy directly. Inputs are never modified.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vaultsh.errors import FormatError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["RunningStats", "merge_all", "STATS_FORMAT"]

STATS_FORMAT = "vaultsh-stats"
STATS_VERSION = 1

# Elements per float64 chunk while reducing a batch (~32 MiB of float64).
_CHUNK_ELEMENTS = 1 << 22


def _is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _combine_chunks(counts: np.ndarray, means: np.ndarray, m2s: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Exact multi-way combination of per-chunk (count, mean, M2) rows."""
    n = int(counts.sum())
    w = counts.astype(np.float64)[:, None]
    mean = (w * means).sum(axis=0) / n
    dev = means - mean
    m2 = m2s.sum(axis=0) + (w * dev * dev).sum(axis=0)
    return n, mean, m2


def _moments_numpy(x2, fill=None) -> tuple[int, np.ndarray, np.ndarray, float]:
    """(count, mean, M2, norm_sum) of the rows of a 2-D array, in float64.

    `fill(dest, start, k)` copies rows start..start+k into the float64 buffer
    `dest` (the default slices `x2` as a numpy array).
    """
    n, d = x2.shape
    step = max(1, _CHUNK_ELEMENTS // max(d, 1))
    counts, means, m2s = [], [], []
    norm_sum = 0.0
    # One reused float64 scratch buffer (the in-place steps never touch the input).
    buf = np.empty((min(step, n), d), dtype=np.float64)
    for s in range(0, n, step):
        k = min(step, n - s)
        c = buf[:k]
        if fill is None:
            c[...] = x2[s : s + k]
        else:
            fill(c, s, k)
        norm_sum += float(np.sqrt(np.einsum("ij,ij->i", c, c)).sum())
        mu = c.sum(axis=0) / k
        np.subtract(c, mu, out=c)
        np.multiply(c, c, out=c)
        m2s.append(c.sum(axis=0))
        means.append(mu)
        counts.append(k)
    if len(counts) == 1:
        return n, means[0], m2s[0], norm_sum
    cnt, mean, m2 = _combine_chunks(np.asarray(counts), np.stack(means), np.stack(m2s))
    return cnt, mean, m2, norm_sum


def _moments_torch(x2) -> tuple[int, np.ndarray, np.ndarray, float]:
    """Same as `_moments_numpy` for a 2-D torch tensor, computed on its device.

    On the CPU each chunk is converted to float64 by torch (which knows
    bfloat16) straight into a numpy buffer and reduced by numpy (faster there);
    on an accelerator the whole reduction stays on the device.
    """
    import torch

    if x2.device.type == "cpu":

        def fill(dest: np.ndarray, s: int, k: int) -> None:
            torch.from_numpy(dest).copy_(x2[s : s + k])

        with torch.no_grad():
            return _moments_numpy(x2, fill)
    return _moments_torch_device(x2)


def _moments_torch_device(x2) -> tuple[int, np.ndarray, np.ndarray, float]:
    """The all-torch reduction (used on accelerators; works on any device)."""
    import torch

    n, d = x2.shape
    step = max(1, _CHUNK_ELEMENTS // max(d, 1))
    means, m2s, counts = [], [], []
    norm_sum = None
    with torch.no_grad():
        # One reused float64 scratch buffer (the in-place steps never touch the input).
        buf = torch.empty((min(step, n), d), dtype=torch.float64, device=x2.device)
        for s in range(0, n, step):
            k = min(step, n - s)
            c = buf[:k]
            c.copy_(x2[s : s + k])
            ns = torch.linalg.vector_norm(c, dim=1).sum()
            norm_sum = ns if norm_sum is None else norm_sum + ns
            mu = c.sum(dim=0) / k
            c.sub_(mu)
            c.mul_(c)
            m2s.append(c.sum(dim=0))
            means.append(mu)
            counts.append(k)
        if len(counts) == 1:
            mean, m2 = means[0], m2s[0]
        else:
            w = torch.tensor(counts, dtype=torch.float64, device=x2.device)[:, None]
            mt = torch.stack(means)
            mean = (w * mt).sum(dim=0) / n
            dv = mt - mean
            m2 = torch.stack(m2s).sum(dim=0) + (w * dv * dv).sum(dim=0)
        assert norm_sum is not None  # the loop ran: n >= 1 (empty batches never get here)
        packed = torch.cat([mean, m2, norm_sum.reshape(1)]).cpu().numpy()
    return n, packed[:d].copy(), packed[d : 2 * d].copy(), float(packed[2 * d])


@dataclass(init=False)
class RunningStats:
    """Per-feature count, mean and M2 plus the sum of token L2 norms, in float64.

    `mean` and `m2` are given as any d values (a list, a numpy array, a torch tensor) or None for zeros,
    and held as float64 numpy arrays.
    """

    d: int
    count: int
    mean: np.ndarray
    m2: np.ndarray
    norm_sum: float

    def __init__(
        self, d: int, count: int = 0, mean: ArrayLike | None = None, m2: ArrayLike | None = None, norm_sum: float = 0.0
    ) -> None:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"d must be a positive integer, got {d!r}")
        self.d = int(d)
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        self.count = int(count)
        self.mean = self._vec(mean, "mean")
        self.m2 = self._vec(m2, "m2")
        self.norm_sum = float(norm_sum)

    def _vec(self, v, name: str) -> np.ndarray:
        if v is None:
            return np.zeros(self.d, dtype=np.float64)
        if _is_torch_tensor(v):
            v = v.detach().to("cpu").double().numpy()
        a = np.array(v, dtype=np.float64, copy=True).reshape(-1)
        if a.shape != (self.d,):
            raise ValueError(f"{name} has {a.size} values, expected d={self.d}")
        return a

    # -- derived -----------------------------------------------------------
    @property
    def var(self) -> np.ndarray:
        """Population variance per feature (M2 / count); zeros when empty."""
        if self.count == 0:
            return np.zeros(self.d, dtype=np.float64)
        return np.maximum(self.m2, 0.0) / self.count

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per feature, sqrt(M2 / count)."""
        return np.sqrt(self.var)

    @property
    def mean_norm(self) -> float:
        """Mean L2 norm of the tokens seen (Activault's `norm`); 0.0 when empty."""
        return self.norm_sum / self.count if self.count else 0.0

    # -- accumulation ------------------------------------------------------
    def _check_other(self, other: RunningStats) -> None:
        if not isinstance(other, RunningStats):
            raise TypeError(f"can only merge RunningStats, got {type(other).__name__}")
        if other.d != self.d:
            raise ValueError(f"cannot merge statistics with d={other.d} into statistics with d={self.d}")

    def _merge_moments(self, n: int, mean: np.ndarray, m2: np.ndarray, norm_sum: float) -> None:
        if n == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = n, np.array(mean, dtype=np.float64), np.array(m2, dtype=np.float64)
            self.norm_sum = float(norm_sum)
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * (n / total))
        self.count = total
        self.norm_sum += float(norm_sum)

    def merge_(self, other: RunningStats) -> RunningStats:
        """Merge `other` into this object (Chan's parallel update); returns self."""
        self._check_other(other)
        self._merge_moments(other.count, other.mean, other.m2, other.norm_sum)
        return self

    def merge(self, other: RunningStats) -> RunningStats:
        """A new object holding the statistics of both; neither input changes."""
        return self.copy().merge_(other)

    def __add__(self, other: RunningStats) -> RunningStats:
        return self.merge(other)

    def copy(self) -> RunningStats:
        return RunningStats(self.d, self.count, self.mean.copy(), self.m2.copy(), self.norm_sum)

    def update(self, x, mask=None) -> RunningStats:
        """Add the tokens of `x` ([n, d] or [N, T, d], numpy or torch, any float dtype).

        `mask` (bool, shape `x.shape[:-1]`) keeps only the tokens where it is
        true. Returns self. An update with no tokens is a no-op.
        """
        n, mean, m2, norm_sum = self._batch_moments(x, mask)
        self._merge_moments(n, mean, m2, norm_sum)
        return self

    def _batch_moments(self, x, mask):
        if _is_torch_tensor(x):
            return self._batch_moments_torch(x, mask)
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if x.ndim < 2 or x.shape[-1] != self.d:
            raise ValueError(f"expected activations of shape [..., {self.d}], got {tuple(x.shape)}")
        if x.dtype.kind not in "fiub" and x.dtype.name != "bfloat16":  # ml_dtypes' bfloat16 converts fine
            x = x.astype(np.float64)
        x2 = x.reshape(-1, self.d)
        if mask is not None:
            if _is_torch_tensor(mask):
                mask = mask.detach().to("cpu").numpy()
            m = np.asarray(mask)
            if tuple(m.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"mask shape {tuple(m.shape)} does not match activations {tuple(x.shape[:-1])}")
            m = m.astype(bool, copy=False).reshape(-1)
            if not m.all():
                x2 = x2[m]
        if x2.shape[0] == 0:
            return 0, None, None, 0.0
        return _moments_numpy(x2)

    def _batch_moments_torch(self, x, mask):
        import torch

        if x.ndim < 2 or x.shape[-1] != self.d:
            raise ValueError(f"expected activations of shape [..., {self.d}], got {tuple(x.shape)}")
        x = x.detach()
        x2 = x.reshape(-1, self.d)
        if mask is not None:
            if not _is_torch_tensor(mask):
                mask = torch.as_tensor(np.asarray(mask))
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match activations {tuple(x.shape[:-1])}")
            m = mask.to(device=x.device, dtype=torch.bool).reshape(-1)
            x2 = x2[m]
        if x2.shape[0] == 0:
            return 0, None, None, 0.0
        return _moments_torch(x2)

    @classmethod
    def from_batch(cls, x, mask=None) -> RunningStats:
        """Statistics of one batch (the feature size is taken from `x.shape[-1]`)."""
        d = int(x.shape[-1]) if hasattr(x, "shape") else int(np.asarray(x).shape[-1])
        return cls(d).update(x, mask)

    @staticmethod
    def merge_all(items: Iterable[RunningStats], d: int | None = None) -> RunningStats:
        return merge_all(items, d)

    # -- equality ----------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RunningStats):
            return NotImplemented
        return (
            self.d == other.d
            and self.count == other.count
            and self.norm_sum == other.norm_sum
            and np.array_equal(self.mean, other.mean, equal_nan=True)
            and np.array_equal(self.m2, other.m2, equal_nan=True)
        )

    def __repr__(self) -> str:
        return f"RunningStats(d={self.d}, count={self.count}, mean_norm={self.mean_norm:.6g})"

    # -- statistics.json ---------------------------------------------------
    def to_activault_json(self) -> dict:
        """Activault's statistics.json fields (mean, std, norm, M2) plus count, d_model, norm_sum."""
        return {
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "norm": float(self.mean_norm),
            "M2": self.m2.tolist(),
            "count": int(self.count),
            "d_model": int(self.d),
            "norm_sum": float(self.norm_sum),
        }

    @classmethod
    def from_activault_json(cls, data: dict, count: int | None = None, where: str = "statistics.json") -> RunningStats:
        """Inverse of `to_activault_json`; also reads Activault's own files.

        Activault's statistics.json has no token count; `count` can supply one,
        otherwise it is recovered from M2 / std**2 (how Activault computed std).
        """
        if not isinstance(data, dict):
            raise FormatError(f"{where}: expected a JSON object, got {type(data).__name__}")

        def vec(name: str) -> np.ndarray | None:
            v = data.get(name)
            if v is None:
                return None
            if not isinstance(v, list) or not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
                raise FormatError(f"{where}: field {name!r} must be a list of numbers")
            return np.array(v, dtype=np.float64)

        mean, std, m2 = vec("mean"), vec("std"), vec("M2")
        if mean is None:
            raise FormatError(f"{where}: missing field 'mean'")
        d = data.get("d_model", mean.size)
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise FormatError(f"{where}: field 'd_model' must be a positive integer, got {d!r}")
        for name, v in (("mean", mean), ("std", std), ("M2", m2)):
            if v is not None and v.size != d:
                raise FormatError(f"{where}: field {name!r} has {v.size} values, expected d_model={d}")

        n = data.get("count", count)
        if n is None:
            n = _infer_count(m2, std)
            if n is None:
                raise FormatError(f"{where}: no 'count' field and it cannot be inferred from M2/std; pass count=")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise FormatError(f"{where}: field 'count' must be a non-negative integer, got {n!r}")
        n = int(n)
        if m2 is None:
            if std is None:
                raise FormatError(f"{where}: needs 'M2' or 'std'")
            m2 = std * std * n

        norm_sum = data.get("norm_sum")
        norm = data.get("norm", 0.0)
        for name, v in (("norm_sum", norm_sum), ("norm", norm)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise FormatError(f"{where}: field {name!r} must be a number, got {v!r}")
        if norm_sum is None:
            norm_sum = float(norm) * n
        return cls(d, n, mean, m2, float(norm_sum))

    # -- exact binary form -------------------------------------------------
    def to_bytes(self) -> bytes:
        """An exact binary form (safetensors, float64) for per-worker partials."""
        from safetensors.numpy import save

        tensors = {
            "mean": np.ascontiguousarray(self.mean, dtype=np.float64),
            "m2": np.ascontiguousarray(self.m2, dtype=np.float64),
            "count": np.array([self.count], dtype=np.int64),
            "norm_sum": np.array([self.norm_sum], dtype=np.float64),
        }
        return save(tensors, metadata={"format": STATS_FORMAT, "version": str(STATS_VERSION), "d": str(self.d)})

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "statistics") -> RunningStats:
        from safetensors.numpy import load

        try:
            t = load(bytes(data))
        except Exception as e:  # safetensors raises its own error types
            raise FormatError(f"{where}: not a vaultsh statistics file ({e})") from None
        missing = {"mean", "m2", "count", "norm_sum"} - set(t)
        if missing:
            raise FormatError(f"{where}: not a vaultsh statistics file (missing {sorted(missing)})")
        mean, m2, cnt, ns = t["mean"], t["m2"], t["count"], t["norm_sum"]
        if (
            mean.dtype != np.float64
            or m2.dtype != np.float64
            or mean.ndim != 1
            or m2.shape != mean.shape
            or mean.size < 1
            or cnt.shape != (1,)
            or ns.shape != (1,)
            or int(cnt[0]) < 0
        ):
            raise FormatError(f"{where}: inconsistent statistics tensors")
        return cls(int(mean.size), int(cnt[0]), mean, m2, float(ns[0]))


def _infer_count(m2: np.ndarray | None, std: np.ndarray | None) -> int | None:
    if m2 is None or std is None:
        return None
    ok = (std > 0) & np.isfinite(std) & np.isfinite(m2)
    if not ok.any():
        return None
    est = float(np.median(m2[ok] / (std[ok] * std[ok])))
    if not math.isfinite(est) or est < 0:
        return None
    return int(round(est))


def merge_all(items: Iterable[RunningStats], d: int | None = None) -> RunningStats:
    """Merge any number of statistics (an empty iterable needs `d`)."""
    out: RunningStats | None = RunningStats(d) if d is not None else None
    for s in items:
        if out is None:
            out = s.copy()
        else:
            out.merge_(s)
    if out is None:
        raise ValueError("merge_all of no statistics needs d=")
    return out
