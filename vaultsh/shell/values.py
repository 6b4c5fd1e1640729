"""The options that pick a per-token value: `top` ranks tokens by it, `view --heat` colours them by it.

Declared here once for both commands' flags, and read here once (`value_options`).
"""

from __future__ import annotations

from vaultsh.explore.values import parse_int


def value_flags(use: str = "", norm: bool = False) -> dict[str, str]:
    """The value options as registry flags, each help text after `use` (e.g. "heat: "); `--norm` only with `norm`."""
    flags = {"--norm": "the token's norm"} if norm else {}
    flags |= {
        "--dim D": "dimension D",
        "--direction FILE": "x . v (v from .npy or .safetensors)",
        "--sae CKPT": "an SAE checkpoint (SAELens or sparsify safetensors)",
        "--feature F": "the SAE latent",
    }
    return {flag: use + text for flag, text in flags.items()}


def value_options(a):
    """The per-token value (a `vaultsh.explore.values.ValueFn`) that a command line's value options pick."""
    from vaultsh.explore.values import value_fn

    return value_fn(
        dim=parse_int("--dim", a.dim),
        direction=a.direction,
        sae=a.sae,
        feature=parse_int("--feature", a.feature),
        norm=bool(getattr(a, "norm", False)),
    )
