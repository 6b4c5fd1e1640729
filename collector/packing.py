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

from typing import Any, Iterable, Iterator


def pack_rows(docs: Iterable[tuple[Any, Any, int]], seq_length: int, eos_id: int,
              eos_keep: bool) -> Iterator[tuple[Any, Any, int]]:
    """(ids, content mask, index of the document the row starts in) rows of exactly seq_length tokens.

    ``docs`` yields (ids, keep, doc_index) per document (numpy int64/bool,
    untruncated). An EOS is appended to each document unless it already ends
    with one. The final partial row is not yielded.
    """
    import numpy as np

    T = int(seq_length)
    ids_buf = np.empty(T, dtype=np.int64)
    keep_buf = np.empty(T, dtype=bool)
    fill = 0
    start_doc = -1
    for ids, keep, di in docs:
        ids = np.asarray(ids, dtype=np.int64)
        keep = np.asarray(keep, dtype=bool)
        if not len(ids) or ids[-1] != eos_id:
            ids = np.append(ids, eos_id)
            keep = np.append(keep, eos_keep)
        pos = 0
        while pos < len(ids):
            if fill == 0:
                start_doc = di
            n = min(T - fill, len(ids) - pos)
            ids_buf[fill:fill + n] = ids[pos:pos + n]
            keep_buf[fill:fill + n] = keep[pos:pos + n]
            fill += n
            pos += n
            if fill == T:
                yield ids_buf.copy(), keep_buf.copy(), start_doc
                fill = 0
