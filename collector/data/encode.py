"""Rendering, tokenising and masks: a `Document` -> token ids and the content mask of one row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from collector.data.specs import Document
from vaultsh.errors import UserError

# Tokenising a very long document only to keep its first seq_length tokens is
# wasteful: the text is cut to _CUT_CHARS_PER_TOKEN * seq_length characters
# first (English averages ~4), and the cut is trusted only if it still yields
# seq_length + _CUT_MARGIN tokens (boundary effects of a cut reach back a token
# or two, not 32); otherwise it is retried with a 4x longer cut, up to the
# whole text.
_CUT_CHARS_PER_TOKEN = 8
_CUT_MIN_CHARS = 2048
_CUT_MARGIN = 32

_SENT_USER = "VAULTSHSENTINELUSERQ7"
_SENT_SYS = "VAULTSHSENTINELSYSZ3"


@dataclass(frozen=True)
class _DefaultSystem:
    prefix: str  # rendered text from the start through the end of the default system turn
    start: int  # char offset where the masked block begins (after a BOS the template wrote)


def find_default_system_block(tokenizer) -> _DefaultSystem | None:
    """Locate the system turn a chat template inserts when a conversation has none.

    Renders [user U], [system S, user U] and [system S] with sentinels: with
    ``P`` = text before S and ``Q`` = text between S and U in the second, and
    ``C`` = text after S in the third (the system turn's closer), a default
    turn exists when the text before U in the first is ``P + D + Q``; the
    block is ``P + D + C`` (a leading BOS the template writes is left out).
    Returns None when the template inserts no default system turn.
    """

    def render(msgs):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)

    try:
        a_full = render([{"role": "user", "content": _SENT_USER}])
        s_full = render([{"role": "system", "content": _SENT_SYS}, {"role": "user", "content": _SENT_USER}])
    except Exception:  # templates without a system role raise
        return None
    try:
        c_full = render([{"role": "system", "content": _SENT_SYS}])
    except Exception:
        c_full = None
    if not (isinstance(a_full, str) and isinstance(s_full, str)):
        return None
    a = a_full.find(_SENT_USER)
    s = s_full.find(_SENT_SYS)
    u = s_full.find(_SENT_USER, max(s, 0))
    if a < 0 or s < 0 or u < 0:
        return None
    A, P, Q = a_full[:a], s_full[:s], s_full[s + len(_SENT_SYS) : u]
    if not (A.startswith(P) and A.endswith(Q) and len(A) >= len(P) + len(Q)):
        return None
    closer = ""
    if isinstance(c_full, str) and (c := c_full.find(_SENT_SYS)) >= 0 and c_full[:c] == P:
        tail = c_full[c + len(_SENT_SYS) :]
        if tail and Q.startswith(tail):
            closer = tail
    end = len(A) - len(Q) + len(closer)
    start = 0
    bos = getattr(tokenizer, "bos_token", None)
    # a BOS the template writes once at the very start is not part of the system turn;
    # when the "BOS" also opens every turn (SmolLM's <|im_start|>) it is.
    if bos and A.startswith(bos) and s_full.count(bos) == 1:
        start = len(bos)
    if len(A) - len(Q) <= start:
        return None
    return _DefaultSystem(prefix=A[:end], start=start)


# a rendered document: (text, add_special_tokens, masked char span of the default system turn)
Rendered = tuple[str, bool, tuple[int, int] | None]


class Encoder:
    """Renders documents and tokenises them into (ids, content mask) rows."""

    def __init__(
        self,
        tokenizer,
        seq_length: int,
        clean_added_tokens: bool,
        clean_default_system_prompt: bool,
        data_key: str = "",
        generation_prompt: bool = False,
    ):
        self.tok = tokenizer
        self.generation_prompt = generation_prompt
        self.seq_length = seq_length
        self.clean_added = clean_added_tokens
        self.clean_sys = clean_default_system_prompt
        self.data_key = data_key
        self.is_fast = bool(getattr(tokenizer, "is_fast", False))
        self.special_ids: frozenset[int] = frozenset()
        if clean_added_tokens:
            ids = set(getattr(tokenizer, "all_special_ids", []) or [])
            ids |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
            self.special_ids = frozenset(int(i) for i in ids if i is not None)
        import numpy as np

        self._special_arr = np.asarray(sorted(self.special_ids), dtype=np.int64)
        self._sys: _DefaultSystem | None | bool = False  # False: not computed yet

    def default_system(self) -> _DefaultSystem | None:
        if self._sys is False:
            self._sys = find_default_system_block(self.tok)
        return self._sys  # type: ignore[return-value]

    def render(self, doc: Document) -> Rendered:
        """(text, add_special_tokens, masked char span of the default system turn)."""
        if doc.messages is None:
            return doc.text or "", True, None
        if getattr(self.tok, "chat_template", None) is None:
            raise UserError(
                f"data_config.data_key: {self.data_key!r} renders chat with the tokenizer's chat template, "
                "but this tokenizer has none; use a plain-text key (e.g. NAME:plain)"
            )
        try:
            text = self.tok.apply_chat_template(
                doc.messages, tokenize=False, add_generation_prompt=self.generation_prompt
            )
        except Exception as e:
            raise UserError(
                f"data {self.data_key!r} document {doc.index}: the chat template rejected it: {e}"
            ) from None
        span = None
        if self.clean_sys and doc.messages and doc.messages[0].get("role") != "system":
            ds = self.default_system()
            if ds is not None and text.startswith(ds.prefix):
                span = (ds.start, len(ds.prefix))
        return text, False, span

    def _tokenize(self, texts: list[str], add_special: bool, offsets: bool) -> dict:
        kw: dict[str, Any] = dict(
            add_special_tokens=add_special, truncation=False, return_attention_mask=False, verbose=False
        )
        if offsets:
            kw["return_special_tokens_mask"] = True
            if self.is_fast:
                kw["return_offsets_mapping"] = True
        return self.tok(texts, **kw)

    def _encode_group(self, texts: list[str], add_special: bool, offsets: bool) -> list[dict]:
        """Tokenise texts, cutting long ones first (see _CUT_*); each row gets a 'long' flag."""
        rows: list[dict | None] = [None] * len(texts)
        todo = list(range(len(texts)))
        limit = max(_CUT_MIN_CHARS, self.seq_length * _CUT_CHARS_PER_TOKEN)
        while todo:
            enc = self._tokenize([texts[i][:limit] for i in todo], add_special, offsets)
            keys = list(enc.keys())
            again = []
            for j, i in enumerate(todo):
                row = {k: enc[k][j] for k in keys}
                if len(texts[i]) > limit and len(row["input_ids"]) < self.seq_length + _CUT_MARGIN:
                    again.append(i)  # the cut may have lost tokens we need: cut less
                else:
                    rows[i] = row
            todo, limit = again, limit * 4
        out: list[dict] = []
        for r in rows:
            assert r is not None  # every text has its row once nothing is left to do
            r["long"] = len(r["input_ids"]) > self.seq_length
            out.append(r)
        return out

    @staticmethod
    def _by_special(rendered: Sequence[Rendered]) -> Iterator[tuple[bool, list[int]]]:
        """(add_special_tokens, the indices of the rendered documents that take it): one tokenizer call each."""
        for add_special in (True, False):
            idx = [i for i, r in enumerate(rendered) if r[1] is add_special]
            if idx:
                yield add_special, idx

    def _encode_rendered(self, rendered: Sequence[Rendered], offsets: bool) -> list[dict]:
        """_encode_group's row of each rendered document, in document order."""
        rows: list[dict] = [{} for _ in rendered]
        for add_special, idx in self._by_special(rendered):
            for i, r in zip(idx, self._encode_group([rendered[i][0] for i in idx], add_special, offsets)):
                rows[i] = r
        return rows

    def too_long(self, docs: Sequence[Document]) -> list[bool]:
        """Whether each document has more than seq_length tokens (for skip_cache)."""
        return [bool(r["long"]) for r in self._encode_rendered([self.render(d) for d in docs], offsets=False)]

    def lengths(self, docs: Sequence[Document]) -> list[int]:
        """Exact token count of each rendered document (for sort_by_length)."""
        out = [0] * len(docs)
        rendered = [self.render(d) for d in docs]
        for add_special, idx in self._by_special(rendered):
            enc = self._tokenize([rendered[i][0] for i in idx], add_special, offsets=False)
            for i, ids in zip(idx, enc["input_ids"]):
                out[i] = len(ids)
        return out

    def encode(self, docs: Sequence[Document]) -> list[tuple[Any, Any, bool]]:
        """(ids truncated to seq_length, content mask, was_longer) per document."""
        rendered = [self.render(d) for d in docs]
        rows = self._encode_rendered(rendered, offsets=True)
        return [self._mask_row(r, rd) for r, rd in zip(rows, rendered)]

    def _mask_row(self, row: dict, rendered: Rendered) -> tuple[Any, Any, bool]:
        import numpy as np

        T = self.seq_length
        ids = np.asarray(row["input_ids"][:T], dtype=np.int64)
        keep = np.ones(len(ids), dtype=bool)
        if self.clean_added:
            if self._special_arr.size:
                keep &= ~np.isin(ids, self._special_arr)
            stm = row.get("special_tokens_mask")
            if stm is not None:  # BOS/EOS the tokenizer added
                keep &= ~np.asarray(stm[:T], dtype=bool)
        span = rendered[2]
        if span is not None:
            s, e = span
            offs = row.get("offset_mapping")
            if offs is not None:
                o = np.asarray(offs[:T], dtype=np.int64).reshape(-1, 2)
                keep &= ~((o[:, 0] < e) & (o[:, 1] > s))
            else:  # slow tokenizer: the block's own tokens are a prefix of the row
                text = rendered[0]
                pre = self.tok(text[:s], add_special_tokens=False)["input_ids"] if s else []
                blk = self.tok(text[:e], add_special_tokens=False)["input_ids"]
                if ids[: len(blk)].tolist() == blk[:T]:
                    keep[len(pre) : min(len(blk), T)] = False
        return ids, keep, bool(row["long"])


# --------------------------------------------------------------------------
