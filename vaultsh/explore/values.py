"""Per-token values to rank or colour tokens by: a dimension, a direction, an SAE feature, the norm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vaultsh.errors import UserError


@dataclass
class ValueFn:
    """`fn(x [n, D] float32) -> [n]`, with a name for output and the D it needs (None: any)."""

    name: str
    fn: Callable
    d: int | None = None
    sae: object | None = None

    def check(self, d: int, where: str) -> None:
        if self.d is not None and self.d != d:
            raise UserError(f"{self.name} needs d_model={self.d} but {where} has d_model={d}")


def load_direction(path: str | Path):
    """A direction vector [D] from a `.npy` (no pickles) or a `.safetensors` file (one tensor, or `direction`)."""
    import numpy as np
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--direction {path}: no such file")
    if p.suffix == ".npy":
        try:
            v = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise UserError(f"--direction {path}: not a plain .npy array ({exc})") from None
        t = torch.from_numpy(np.asarray(v, dtype=np.float32))
    elif p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            d = load_file(str(p))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"--direction {path}: not a readable safetensors file ({exc})") from None
        if "direction" in d:
            t = d["direction"]
        elif len(d) == 1:
            t = next(iter(d.values()))
        else:
            raise UserError(f"--direction {path}: {len(d)} tensors ({', '.join(sorted(d))}); name one 'direction'")
        t = t.to(torch.float32)
    else:
        raise UserError(f"--direction {path}: use a .npy or .safetensors file (pickles are refused)")
    t = t.reshape(-1) if t.dim() == 2 and 1 in t.shape else t
    if t.dim() != 1:
        raise UserError(f"--direction {path}: a vector is needed, got shape {list(t.shape)}")
    return t


def value_fn(
    *,
    dim: int | None = None,
    direction: str | None = None,
    sae: str | None = None,
    feature: int | None = None,
    norm: bool = False,
) -> ValueFn:
    """Exactly one of: `dim`, `direction` (a file), `sae` + `feature`, `norm`."""
    chosen = [n for n, v in (("--dim", dim), ("--direction", direction), ("--sae", sae)) if v is not None]
    if norm:
        chosen.append("--norm")
    if len(chosen) != 1:
        raise UserError(
            "give exactly one of --dim D, --direction FILE, --sae CKPT --feature F"
            + (", --norm" if norm or not chosen else "")
            + (f" (got {', '.join(chosen)})" if chosen else "")
        )
    if feature is not None and sae is None:
        raise UserError("--feature F needs --sae CKPT")
    if norm:
        return ValueFn("norm", lambda x: x.norm(dim=-1))
    if dim is not None:
        if dim < 0:
            raise UserError(f"--dim {dim}: use a whole number >= 0")

        def pick(x, dim=dim):
            if dim >= x.shape[-1]:
                raise UserError(f"--dim {dim}: out of range, d_model is {x.shape[-1]} (0-{x.shape[-1] - 1})")
            return x[..., dim]

        return ValueFn(f"dim {dim}", pick)
    if direction is not None:
        v = load_direction(direction)
        return ValueFn(f"direction {Path(direction).name}", lambda x: x @ v, d=int(v.shape[0]))
    from vaultsh.explore.sae import load_sae

    assert sae is not None  # exactly one was chosen, and it was none of the others
    if feature is None:
        raise UserError("--sae CKPT needs --feature F")
    s = load_sae(sae)
    f = s.check_feature(feature)
    return ValueFn(f"SAE feature {f}", lambda x: s.feature(x, f), d=s.d_in, sae=s)


def value_spec(text: str) -> dict:
    """`value_fn`'s keywords for what a batch viewer is typed: `FILE` (a direction) or `CKPT F` (SAE latent F)."""
    words = text.split()
    if len(words) == 2 and words[1].isdigit():
        return {"sae": words[0], "feature": int(words[1])}
    if len(words) == 1:
        return {"direction": words[0]}
    raise UserError(f"{text!r}: give a FILE, or a CKPT and a FEATURE number")


def parse_int(name: str, value, lo: int | None = 0) -> int | None:
    """An option's whole-number value (None stays None); a clear error otherwise."""
    if value is None:
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} {value!r}: not a whole number") from None
    if lo is not None and v < lo:
        raise UserError(f"{name} {v}: use a whole number >= {lo}")
    return v
