"""Provenance: where each stored sequence came from, as it is assembled into a megabatch.

Every megabatch file gets a ``source`` tensor (int64 ``[N, 3]``): per
sequence, the index of its source in the hook's ``metadata.json``
``"sources"`` list, the document (record/row) index within that source, and
the token offset within that document of the sequence's first token; -1
where not known. Without packing a sequence is one document from its first
token (offset 0). With packing a row may hold several documents: ``source``
names the one the row starts in (and where in it), and ``source_segments``
(int64 ``[M, 5]``: row, position in row, source, document, token offset)
lists every document piece of every row, exactly.

``metadata.json`` also records ``tokenizer_fingerprint`` (what token ids
mean) and ``padding_token_id``, so a later run can feed exactly these
sequences to another model with the same tokenizer (collector/reuse.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vaultsh.megabatch import SEGMENT_COLUMNS, SOURCE_COLUMNS

UNKNOWN = -1


def empty_source(rows: int):
    """A megabatch's ``source`` buffer: every row unknown until a batch fills it."""
    import torch

    return torch.full((rows, len(SOURCE_COLUMNS)), UNKNOWN, dtype=torch.int64)


def record_batch(source_buf, segments: list, row: int, batch) -> None:
    """Copy `batch`'s provenance into rows row..row+B of `source_buf`; its packed pieces into `segments`."""
    import torch

    if batch.source:
        source_buf[row : row + len(batch.source)] = torch.tensor(batch.source, dtype=torch.int64)
    segments.extend((r + row, pos, src, doc, off) for r, pos, src, doc, off in batch.segments)


def segments_tensor(segments: list, rows: int):
    """``source_segments`` of a megabatch's first `rows` rows, or None when the run does not pack."""
    import torch

    if not segments:
        return None
    kept = [s for s in segments if s[0] < rows]
    return torch.tensor(kept, dtype=torch.int64).reshape(-1, len(SEGMENT_COLUMNS))


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the tokenizer's vocabulary (token string -> id, added tokens included).

    Two tokenizers with equal fingerprints give every token id the same meaning,
    which is what feeding one run's stored ``input_ids`` to another model needs.
    """
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted((str(k), int(v)) for k, v in vocab.items()), ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def padding_id(tokenizer) -> int:
    """The id the collector pads with (the pad token, else EOS, else 0), as BatchStream does."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def hook_metadata(stream: Any, tokenizer) -> dict:
    """The provenance fields of each hook's metadata.json."""
    names = getattr(stream, "source_names", None)
    if names is None:
        names = [s.name for s in stream.sources]
    return {
        "sources": list(names),
        "source_columns": list(SOURCE_COLUMNS),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "padding_token_id": getattr(stream, "pad_id", padding_id(tokenizer)),
    }
