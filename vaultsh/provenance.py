"""Reading provenance: a stored sequence's source, document and token offset in words.

The tensors are described in vaultsh/megabatch.py (``source``, ``source_segments``);
the names of the sources are the ``sources`` list of the hook's metadata.json.
"""

from __future__ import annotations

from collections.abc import Sequence

UNKNOWN = -1


def describe(source_row: Sequence[int], names: Sequence[str] | None) -> str:
    """One line for a sequence's provenance, e.g. ``my_jsonl doc 17 @ token 0`` ('?' where unknown)."""
    src, doc, off = (int(x) for x in source_row)
    if src == UNKNOWN and doc == UNKNOWN:
        return "unknown"
    if src == UNKNOWN:
        name = "?"
    elif names and 0 <= src < len(names):
        name = str(names[src])
    else:
        name = f"source {src}"
    return f"{name} doc {doc if doc != UNKNOWN else '?'} @ token {off if off != UNKNOWN else '?'}"


def source_names(metadata: dict | None) -> list[str] | None:
    """The `sources` list of a hook's metadata.json (None for runs made before provenance)."""
    names = (metadata or {}).get("sources")
    return [str(n) for n in names] if isinstance(names, list) else None


def as_dict(source_row: Sequence[int], names: Sequence[str] | None) -> dict:
    """A sequence's provenance for --json: the source's name (None if unknown) and the three numbers."""
    src, doc, off = (int(x) for x in source_row)
    name = str(names[src]) if names and 0 <= src < len(names) else None
    return {"source": name, "source_index": src, "document_index": doc, "token_offset": off}
