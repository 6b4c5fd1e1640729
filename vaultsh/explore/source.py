"""Provenance of one token for `top` and `grep`: its source, document and token offset in that document.

A megabatch's `source [N, 3]` names where each sequence's first token came
from; with packing, `source_segments [M, 5]` (row, position, source,
document, offset) names every document piece of a row. A token at position
`p` belongs to the last piece of its row starting at or before `p`, at
offset `piece offset + p - piece position` in that document (without
segments: the sequence's own offset + p). See docs/format.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vaultsh.provenance import UNKNOWN, as_dict, describe


def token_source(
    source: np.ndarray | None, segments: np.ndarray | None, sequence: int, position: int, names: Sequence[str] | None
) -> dict | None:
    """`{"source", "source_index", "document_index", "token_offset"}` of one token (None: the file has no
    provenance); `token_offset` is the token's own offset in its document (-1 where unknown)."""
    if source is None or not 0 <= sequence < source.shape[0]:
        return None
    src, doc, off = (int(v) for v in source[sequence])
    start = 0
    if segments is not None and segments.size:
        mine = segments[(segments[:, 0] == sequence) & (segments[:, 1] <= position)]
        if mine.shape[0]:
            _, start, src, doc, off = (int(v) for v in mine[np.argmax(mine[:, 1])])
    tok = off + position - start if off != UNKNOWN else UNKNOWN
    return as_dict((src, doc, tok), names)


def source_text(d: dict | None) -> str:
    """One line for people, as the shell's batch viewer writes it: `my_jsonl doc 17 @ token 5`."""
    if d is None:
        return ""
    idx = d["source_index"]
    names = None if d["source"] is None or idx < 0 else [""] * idx + [d["source"]]
    return describe((idx, d["document_index"], d["token_offset"]), names)
