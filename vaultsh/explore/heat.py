"""`view --heat`: one sequence with each token coloured by a value (norm, a dimension, an SAE feature).

Non-negative values (norm, SAE features) go white -> red over [0, max];
signed values (a dimension, a direction) blue <- white -> red over
[-max|v|, +max|v|]. Masked tokens are grey and do not set the scale.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field, fields

from vaultsh.explore.text import Pieces, load_pieces
from vaultsh.explore.values import ValueFn

GREY = (200, 200, 200)


def colour(value: float, scale: float, signed: bool) -> tuple[int, int, int]:
    """The RGB colour of `value` on a scale whose hottest end is `scale` (> 0)."""
    f = 0.0 if scale <= 0 else max(-1.0, min(1.0, value / scale))
    if f >= 0:
        return (255, round(255 * (1 - f)), round(255 * (1 - f)))
    if not signed:
        return (255, 255, 255)
    return (round(255 * (1 + f)), round(255 * (1 + f)), 255)


@dataclass
class HeatToken:
    token_id: int
    piece: str
    value: float
    real: bool

    def to_json(self) -> dict:
        return {"id": self.token_id, "piece": self.piece, "value": self.value, "real": self.real}


@dataclass
class HeatResult:
    file: str
    sequence: int
    value: str
    signed: bool
    scale: float
    tokens: list[HeatToken] = field(default_factory=list)
    png: str | None = None
    png_size: tuple[int, int] | None = None

    def colours(self) -> list[tuple[int, int, int]]:
        return [colour(t.value, self.scale, self.signed) if t.real else GREY for t in self.tokens]

    def to_json(self) -> dict:
        """Every field by name, in order; the tokens and the PNG's size as JSON lists."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        size = list(self.png_size) if self.png_size else None
        return {**out, "tokens": [t.to_json() for t in self.tokens], "png_size": size}


def heat(
    store, key: str, sequence: int, vf: ValueFn, *, png: str | None = None, header=None, pieces: Pieces | None = None
) -> HeatResult:
    """Per-token values of sequence `sequence` of megabatch `key` (one ranged read per tensor of its row).

    `header` (the file's, from `read_header`) and `pieces` (the run's decoder) are read when not given: the
    batch viewers pass theirs, so stepping through sequences reads only each sequence's rows.
    """
    import torch

    from vaultsh.megabatch import read_header, read_sequence

    if header is None:
        header = read_header(store, key)
    row = read_sequence(store, key, sequence, header)
    states, ids, mask = row["states"], row["input_ids"].tolist(), row["mask"].tolist()
    vf.check(states.shape[-1], key)
    vals = vf.fn(states.to(torch.float32)).tolist()
    if pieces is None:
        pieces = load_pieces(store, posixpath.dirname(posixpath.dirname(key)), header.metadata)
    toks = [HeatToken(int(i), pieces.piece(int(i)), float(v), bool(m)) for i, v, m in zip(ids, vals, mask)]
    real = [t.value for t in toks if t.real] or [0.0]
    signed = not (vf.name == "norm" or vf.name.startswith("SAE"))
    scale = max(abs(v) for v in real) if signed else max(max(real), 0.0)
    result = HeatResult(key, row["index"], vf.name, signed, float(scale), toks)
    if png:
        from vaultsh.explore.png import heat_png

        result.png_size = heat_png(result, png)
        result.png = str(png)
    return result
