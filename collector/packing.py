"""Packing: documents concatenated with EOS between them, cut into rows of seq_length.

With ``packing: true`` every row is full (no padding, attention mask all
ones): document 1, EOS, document 2, EOS, ... and a document longer than what
is left of a row continues on the next row. This is the usual layout of SAE
training data. The EOS separators are real tokens: masked only with
``clean_added_tokens`` (like every special token). Global batch ``b`` is rows
``b*batch_size ... (b+1)*batch_size - 1`` of this one packed stream, so
sharding across workers stays exact; every worker tokenises the documents
before its last batch (row boundaries depend on their lengths).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple


class PackedRow(NamedTuple):
    """One packed row: ids, content mask, and its document pieces as (position in row, tag, token offset)."""

    ids: Any
    keep: Any
    segments: list[tuple[int, Any, int]]


def pack_rows(
    docs: Iterable[tuple[Any, Any, Any]], seq_length: int, eos_id: int, eos_keep: bool
) -> Iterator[PackedRow]:
    """Rows of exactly seq_length tokens; each piece records where in its document it starts.

    ``docs`` yields (ids, keep, tag) per document (numpy int64/bool,
    untruncated; ``tag`` says which document it is and comes back in
    ``segments``). An EOS is appended to each document unless it already ends
    with one (the EOS counts as the document's last token for offsets). The
    final partial row is not yielded.
    """
    import numpy as np

    T = int(seq_length)
    ids_buf = np.empty(T, dtype=np.int64)
    keep_buf = np.empty(T, dtype=bool)
    fill = 0
    segments: list[tuple[int, Any, int]] = []
    for ids, keep, tag in docs:
        ids = np.asarray(ids, dtype=np.int64)
        keep = np.asarray(keep, dtype=bool)
        if not len(ids) or ids[-1] != eos_id:
            ids = np.append(ids, eos_id)
            keep = np.append(keep, eos_keep)
        pos = 0
        while pos < len(ids):
            segments.append((fill, tag, pos))
            n = min(T - fill, len(ids) - pos)
            ids_buf[fill : fill + n] = ids[pos : pos + n]
            keep_buf[fill : fill + n] = keep[pos : pos + n]
            fill += n
            pos += n
            if fill == T:
                yield PackedRow(ids_buf.copy(), keep_buf.copy(), segments)
                fill = 0
                segments = []
