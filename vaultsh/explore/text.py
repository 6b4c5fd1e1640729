"""Token ids as text: per-token pieces, character offsets, decoded contexts.

A sequence's text is the concatenation of its tokens' pieces (each id decoded
on its own, once per id), so a character offset maps back to exactly one
token. For byte-level BPE tokenizers on ordinary text this is the same text
`tokenizer.decode` gives; a character split across two tokens shows as a
replacement character in both pieces.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from vaultsh import tokens as dec


class Pieces:
    """Decoded pieces of token ids, cached per id (a vocabulary is small, a store is not)."""

    def __init__(self, handle: dec.TokenizerHandle):
        self.handle = handle
        self._cache: dict[int, str] = {}

    @property
    def ok(self) -> bool:
        return self.handle.ok

    def piece(self, token_id: int) -> str:
        p = self._cache.get(token_id)
        if p is None:
            p = dec.decode(self.handle, [token_id]) if self.handle.ok else f"[{token_id}]"
            self._cache[token_id] = p
        return p

    def text(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """(text, start offset of each token) for `ids`."""
        parts, starts, pos = [], [], 0
        for i in ids:
            p = self.piece(int(i))
            starts.append(pos)
            parts.append(p)
            pos += len(p)
        return "".join(parts), starts


def token_span(starts: list[int], total: int, a: int, b: int) -> tuple[int, int]:
    """Tokens [first, last+1) covering characters [a, b) of a text whose tokens start at `starts`."""
    first = bisect.bisect_right(starts, a) - 1
    last = bisect.bisect_left(starts, max(b, a + 1)) - 1
    return max(first, 0), max(last, first) + 1


@dataclass
class Context:
    """Decoded text around tokens [start, end) of one sequence: before, the highlighted part, after."""

    before: str
    match: str
    after: str

    def to_json(self) -> dict:
        return {"before": self.before, "match": self.match, "after": self.after}


def context(pieces: Pieces, ids: Sequence[int], mask: Sequence[bool], start: int, end: int, k: int) -> Context:
    """The context of tokens [start, end): up to `k` tokens either side; masked tokens are left out."""
    lo, hi = max(0, start - k), min(len(ids), end + k)

    before = "".join(pieces.piece(int(ids[i])) for i in range(lo, start) if mask[i])
    match = "".join(pieces.piece(int(ids[i])) for i in range(start, end))
    after = "".join(pieces.piece(int(ids[i])) for i in range(end, hi) if mask[i])
    return Context(before, match, after)


def load_pieces(store, run: str, header_meta: dict | None = None) -> Pieces:
    """The run's tokenizer (cfg.json, else the megabatch header), as a piece decoder; ids when none loads."""
    from vaultsh.errors import UserError
    from vaultsh.run import Run

    try:
        cfg = Run(store, run).read_cfg()
    except UserError:
        cfg = None
    name, opts = dec.tokenizer_spec(cfg, header_meta or {})
    if not name:
        return Pieces(dec.load_tokenizer(None))
    return Pieces(dec.load_tokenizer(name, opts.get("cache_dir"), opts.get("gguf_file")))
