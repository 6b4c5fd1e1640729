"""Token filters and alignment checks shared by every hook of an aligned read.

A filter decides per token position of a megabatch, from what every hook has
in common (its input_ids, its mask, its position, and the norm of one
reference hook), so all hooks keep exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vaultsh.errors import UserError

FILTERS = ("masked", "skip_positions", "exclude_token_ids", "max_norm")


class AlignmentError(UserError):
    """Files that should hold the same tokens do not (different runs, data or order)."""


@dataclass
class TokenFilter:
    """Which token positions to keep.

    skip_positions: drop positions 0..k-1 of every sequence (BOS, attention sinks).
    exclude_token_ids: drop these token ids wherever they occur.
    max_norm: drop tokens whose norm in the reference hook (`norm_part`) is above this.
    """

    skip_positions: int = 0
    exclude_token_ids: torch.Tensor | None = None
    max_norm: float | None = None
    norm_part: int = 0

    @property
    def active(self) -> bool:
        return bool(self.skip_positions) or self.exclude_token_ids is not None or self.max_norm is not None

    def keep(
        self, ids: torch.Tensor, mask: torch.Tensor, ref_states: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, int]]:
        """The [N, T] keep mask and how many tokens each filter dropped (in FILTERS order, each
        counted among the tokens the filters before it kept)."""
        keep = mask.clone()
        dropped = {"masked": int(mask.numel() - int(mask.sum()))}
        if self.skip_positions:
            before = int(keep.sum())
            keep[:, : self.skip_positions] = False
            dropped["skip_positions"] = before - int(keep.sum())
        if self.exclude_token_ids is not None:
            before = int(keep.sum())
            keep &= ~torch.isin(ids, self.exclude_token_ids.to(ids.device))
            dropped["exclude_token_ids"] = before - int(keep.sum())
        if self.max_norm is not None and ref_states is not None:
            before = int(keep.sum())
            norms = torch.linalg.vector_norm(ref_states.to(torch.float32), dim=-1)
            keep &= (norms <= self.max_norm).to(keep.device)
            dropped["max_norm"] = before - int(keep.sum())
        return keep, dropped


def check_aligned(ids_a: torch.Tensor, ids_b: torch.Tensor, uri_a: str, uri_b: str) -> None:
    """Raise AlignmentError naming the first sequence and position where two files' input_ids differ."""
    if tuple(ids_a.shape) != tuple(ids_b.shape):
        raise AlignmentError(
            f"{uri_b}: input_ids shape {list(ids_b.shape)} differs from {uri_a}'s "
            f"{list(ids_a.shape)}: these files do not hold the same tokens"
        )
    if torch.equal(ids_a, ids_b):
        return
    diff = (ids_a != ids_b).nonzero()
    n, t = (int(v) for v in diff[0])
    raise AlignmentError(
        f"{uri_b}: input_ids differ from {uri_a} at sequence {n}, position {t} "
        f"(token {int(ids_b[n, t])} vs {int(ids_a[n, t])}; {diff.shape[0]} position(s) differ): "
        "these files do not hold the same tokens"
    )
