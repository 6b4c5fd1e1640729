"""Where documents come from: `datasets:` entries, named mixes, labelled `path` data.

`plan_sources(spec, base_dir)` turns the data section into a list of
:class:`SourceSpec` (one per dataset; a `data_key` gives one),
and `document_stream(...)` reads them into one deterministic stream of
:class:`Document`: each source's records in a seeded order,
labels attached (category, `label_columns`, the dataset's name in a mix),
the sources interleaved by weight (collector/mixing.py), then shaped
(collector/shaping.py).

`datasets` entries are read by collector/data/hfdatasets.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from collector.config.datacheck import LOCAL_SUFFIXES
from collector.data.hfdatasets import BUILDERS, is_saved_dataset
from collector.data.records import iter_records, record_to_document
from collector.data.registry import resolve_data_key
from collector.data.specs import Document, SourceSpec
from vaultsh.errors import ConfigError, UserError


def _get(spec: Any, name: str, default: Any = None) -> Any:
    v = getattr(spec, name, default)
    return default if v is None and default is not None else v


def _entry_field(e: Any, name: str, default: Any = None) -> Any:
    return e.get(name, default) if isinstance(e, dict) else getattr(e, name, default)


def entry_to_source(entry: Any, where: str) -> SourceSpec:
    """A `datasets:` entry (DatasetEntry or dict) as a SourceSpec of kind 'datasets'."""
    path = str(_entry_field(entry, "path"))
    fmt = _entry_field(entry, "format")
    p = Path(path).expanduser()
    local = fmt is not None or p.exists()  # otherwise a hub dataset id
    if local:
        path = str(p.resolve()) if p.exists() else str(p)
    if local and fmt is None:
        fmt = _infer_format(Path(path), where)
    template = _entry_field(entry, "text_template")
    name = str(_entry_field(entry, "name") or path)
    return SourceSpec(
        key=name,
        name=name,
        source=f"datasets:{path}",
        kind="datasets",
        chat=_entry_field(entry, "chat"),
        text_field=_entry_field(entry, "text_field"),
        template=template,
        hf_subset=_entry_field(entry, "subset"),
        hf_split=_entry_field(entry, "split") or "train",
        ds_path=path,
        ds_local=bool(local),
        ds_format=fmt,
        streaming=bool(_entry_field(entry, "streaming", False)),
        weight=float(_entry_field(entry, "weight", 1.0)),
    )


def _infer_format(p: Path, where: str) -> str | None:
    if p.is_file():
        fmt = LOCAL_SUFFIXES.get(p.suffix.lower())
        if fmt is None:
            raise ConfigError(
                f"{where}: cannot tell the format of {str(p)!r} from its name; set format: one of {', '.join(BUILDERS)}"
            )
        return fmt
    if p.is_dir():
        if is_saved_dataset(p):
            return None
        found = sorted(
            {
                LOCAL_SUFFIXES[x.suffix.lower()]
                for x in p.rglob("*")
                if x.is_file() and x.suffix.lower() in LOCAL_SUFFIXES
            }
        )
        if len(found) == 1:
            return found[0]
        if not found:
            raise ConfigError(f"{where}: directory {str(p)!r} holds no .json/.jsonl/.csv/.txt/.parquet files")
        raise ConfigError(f"{where}: directory {str(p)!r} mixes formats ({', '.join(found)}); set format")
    return None


def plan_sources(spec: Any, base_dir: str | os.PathLike | None = None) -> list[SourceSpec]:
    """The data section's sources, in order (one for data_key / path, one per dataset of a mix)."""
    label = "data"
    if _get(spec, "datasets") is not None:
        return [entry_to_source(e, f"{label}.datasets[{i}]") for i, e in enumerate(spec.datasets)]
    if _get(spec, "data_mixes") is not None:
        from collector.config.datacheck import load_mix

        errors, _, entries = load_mix(spec.data_mixes, spec.mix, label, Path(base_dir) if base_dir else None)
        if errors:
            raise ConfigError(errors[0])
        return [entry_to_source(e, f"mix {spec.mix!r} datasets[{i}]") for i, e in enumerate(entries)]
    if _get(spec, "path") is not None:
        entry = {
            "name": Path(spec.path).name or spec.path,
            "path": spec.path,
            "subset": _get(spec, "subset"),
            "split": _get(spec, "split", "train"),
            "format": None,
            "text_field": _get(spec, "text_field"),
            "text_template": _get(spec, "text_template"),
            "chat": _get(spec, "chat"),
            "streaming": False,
        }
        return [entry_to_source(entry, f"{label}.path")]
    key = _get(spec, "data_key")
    if key is None:
        raise ConfigError("data.data_key: required but missing (or give datasets, data_mixes with mix, or path)")
    src = resolve_data_key(key, base_dir)
    chat = _get(spec, "chat")
    if chat is not None:
        from dataclasses import replace

        src = replace(src, chat=chat)
    if not _get(spec, "shuffle", True):
        from dataclasses import replace

        src = replace(src, shuffle=False)
    return [src]


def is_finite(src: SourceSpec) -> bool:
    """Whether a source can be read to its end cheaply (not a streamed hub dataset)."""
    return not (src.kind == "hf" or (src.kind == "datasets" and src.streaming and not src.ds_local))


# ---------------------------------------------------------------- records

# ---------------------------------------------------------------- documents


def _source_seed(seed: int, j: int) -> int:
    """Seed of source j: the run's seed for the first (a single data_key reads as before)."""
    if j == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, j]).generate_state(1)[0])


def iter_labelled_documents(
    src: SourceSpec,
    seed: int | None,
    category_field: str | None,
    label_columns: Sequence[str],
    source_label: str | None,
    keep=None,
    source_index: int = -1,
) -> Iterator[Document]:
    """Documents of one source with their labels; `keep(record, where)` filters records first.

    `source_index` is recorded on each document (its provenance: which source of the run).
    """

    for i, rec in iter_records(src, seed):
        if keep is not None and not keep(rec, f"data {src.name!r} record {i}"):
            continue
        doc = record_to_document(rec, i, src)
        if doc is None:
            continue
        doc.source = source_index
        if category_field or label_columns:
            where = f"data {src.name!r} record {i}"
            if not isinstance(rec, dict):
                raise UserError(f"{where}: labels need object records, got {type(rec).__name__}")
            if category_field:
                if rec.get(category_field) is None:  # HF datasets fill a field some records lack with null
                    present = ", ".join(str(k) for k, v in rec.items() if v is not None)
                    raise UserError(
                        f"{where}: record has no category field {category_field!r} "
                        f"(fields: {present}); set data.category_field"
                    )
                doc.labels["category"] = str(rec[category_field])
            for c in label_columns:
                if c not in rec:
                    raise UserError(f"{where}: record has no label column {c!r} (fields: {', '.join(map(str, rec))})")
                doc.labels[c] = rec[c]
        if source_label is not None:
            doc.labels["dataset"] = source_label
        yield doc


def category_field_of(spec: Any) -> str | None:
    """The record field holding the category, or None when the run is not labelled by category."""
    f = _get(spec, "category_field")
    if f:
        return f
    if (
        _get(spec, "path") is not None
        or _get(spec, "categories")
        or _get(spec, "category_balance_strategy", "use_all") == "equalize"
    ):
        return "category"
    return None


def document_stream(spec: Any, sources: list[SourceSpec], seed: int, length_fn=None) -> Iterator[Document]:
    """The one deterministic document stream of the data section (every worker reads the same)."""
    from collector import shaping
    from collector.mixing import interleave

    cat = category_field_of(spec)
    labels = list(_get(spec, "label_columns", []) or [])
    packing = bool(_get(spec, "packing", False))
    multi = len(sources) > 1 and not packing
    flt = _get(spec, "filter")
    keep = shaping.parse_filter(flt) if flt else None
    streams = [
        iter_labelled_documents(
            s,
            _source_seed(seed, j) if _get(spec, "shuffle", True) else None,
            cat,
            labels,
            s.name if multi else None,
            keep,
            source_index=j,
        )
        for j, s in enumerate(sources)
    ]
    if len(streams) == 1:
        docs: Iterator[Document] = streams[0]
    else:
        docs = interleave(
            streams, [s.weight for s in sources], seed, _get(spec, "stopping_strategy", "first_exhausted")
        )
    return shaping.shape(docs, spec, seed, length_fn, finite=all(is_finite(s) for s in sources))
