"""Sources -> records -> documents: each source's records in a fixed, seeded order, rendered as `Document`s."""

from __future__ import annotations

import csv
import json
import mmap
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from collector.data.hfdatasets import iter_dataset_records
from collector.data.registry import resolve_data_key
from collector.data.specs import Document, SourceSpec
from vaultsh.errors import UserError

AUTO_CHAT_FIELDS = ("messages", "conversations", "conversation")


def _pydoc_documents(max_chars: int) -> list[str]:
    """pydoc topics in sorted-key order, split at blank lines and packed to <= max_chars."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for k in sorted(topics):
        paras = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", topics[k]) if p.strip()]
        cur: list[str] = []
        size = 0
        for p in paras:
            if cur and size + 2 + len(p) > max_chars:
                docs.append("\n\n".join(cur))
                cur, size = [], 0
            cur.append(p)
            size += len(p) + (2 if size else 0)
        if cur:
            docs.append("\n\n".join(cur))
    return docs


_RX_PARAGRAPH = re.compile(rb"(?m)^[^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*")
_RX_LINE = re.compile(rb"(?m)^[^\n]*\S[^\n]*")


class _IndexedFile:
    """Records of a .txt/.jsonl file located by byte offsets; read lazily in any order."""

    def __init__(self, path: str, mode: str):
        import numpy as np

        self.path = path
        self.mode = mode  # paragraph | line | file
        self._fh = open(path, "rb")
        size = os.fstat(self._fh.fileno()).st_size
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        if mode == "file":
            spans = [(0, size)] if size else []
        else:
            rx = _RX_PARAGRAPH if mode == "paragraph" else _RX_LINE
            spans = [m.span() for m in rx.finditer(self._mm)]
        arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        self.starts, self.ends = arr[:, 0], arr[:, 1]

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, i: int) -> tuple[str, int]:
        s, e = int(self.starts[i]), int(self.ends[i])
        return self._mm[s:e].decode("utf-8", errors="replace").strip(), s

    def close(self) -> None:
        if isinstance(self._mm, mmap.mmap):
            self._mm.close()
        self._fh.close()


def _order(n: int, spec: SourceSpec, seed: int | None) -> Iterable[int]:
    if seed is None or not spec.shuffle:
        return range(n)
    import numpy as np

    return (int(i) for i in np.random.default_rng(seed).permutation(n))


def iter_records(spec: SourceSpec, seed: int | None) -> Iterator[tuple[int, Any]]:
    """(source index, record) in source order (seed None) or the seeded shuffled order."""
    if spec.kind == "pydoc":
        docs = _pydoc_documents(spec.max_doc_chars)
        for i in _order(len(docs), spec, seed):
            yield i, docs[i]
        return
    if spec.kind == "hf":
        yield from _iter_hf(spec, seed)
        return
    if spec.kind == "datasets":
        yield from iter_dataset_records(spec, seed)
        return
    path = spec.path
    assert path is not None
    suffix = Path(path).suffix.lower()
    if suffix in (".txt", ".jsonl") or (suffix == ".json" and not _is_json_array(path)):
        mode = spec.txt_split if suffix == ".txt" else "line"
        idx = _IndexedFile(path, mode)
        try:
            for i in _order(len(idx), spec, seed):
                text, offset = idx.get(i)
                if suffix == ".txt":
                    yield i, text
                else:
                    try:
                        yield i, json.loads(text)
                    except json.JSONDecodeError as e:
                        raise UserError(f"data file {path!r}: invalid JSON record at byte {offset}: {e}") from None
        finally:
            idx.close()
        return
    if suffix == ".json":
        try:
            with open(path, encoding="utf-8") as fh:
                records = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"data file {path!r}: not readable as JSON: {e}") from None
    else:  # .csv
        try:
            with open(path, encoding="utf-8", newline="") as fh:
                records = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"data file {path!r}: not readable as CSV: {e}") from None
    for i in _order(len(records), spec, seed):
        yield i, records[i]


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[")


def _iter_hf(spec: SourceSpec, seed: int | None) -> Iterator[tuple[int, Any]]:
    try:
        import datasets  # noqa: F401  (optional dependency)
        from datasets import load_dataset
    except ImportError:
        raise UserError(
            f"data_config.data_key: {spec.key!r} streams {spec.hf_repo!r} from the Hugging Face hub, "
            "which needs the 'datasets' package: pip install datasets"
        ) from None
    try:
        ds = load_dataset(spec.hf_repo, spec.hf_subset, split=spec.hf_split, streaming=True)
        if seed is not None and spec.shuffle:
            if hasattr(ds, "shuffle"):
                ds = ds.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)
            else:
                ds = buffer_shuffle(iter(ds), seed, spec.shuffle_buffer)
        it = iter(ds)
    except UserError:
        raise
    except Exception as e:  # network, auth, unknown split/subset: one clear message
        sub = f" (subset {spec.hf_subset!r})" if spec.hf_subset else ""
        raise UserError(
            f"data_config.data_key: could not open hub dataset {spec.hf_repo!r}{sub} split {spec.hf_split!r}: "
            f"{type(e).__name__}: {e}"
        ) from None
    yield from enumerate(it)


def buffer_shuffle(it: Iterator[Any], seed: int, size: int) -> Iterator[Any]:
    """Seeded shuffle buffer (reservoir-style) over an iterator."""
    import random

    rng = random.Random(seed)
    buf: list[Any] = []
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


_ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}


def _normalize_messages(raw: Any, where: str) -> list[dict]:
    """role/content or ShareGPT from/value messages -> [{"role", "content"}]."""
    if not isinstance(raw, (list, tuple)):
        raise UserError(f"{where}: expected a list of messages, got {type(raw).__name__}")
    out = []
    for m in raw:
        if not isinstance(m, dict):
            raise UserError(f"{where}: a message must be an object with role/content (or from/value), got {m!r:.80}")
        if "role" in m:
            role, content = m.get("role"), m.get("content")
        elif "from" in m:
            role, content = _ROLE_MAP.get(str(m.get("from")).lower(), "user"), m.get("value")
        else:
            raise UserError(f"{where}: a message needs role/content or from/value, got fields {sorted(m)}")
        out.append({"role": str(role) if role else "user", "content": content if isinstance(content, str) else ""})
    return out


def _field(rec: Any, name: str, where: str) -> Any:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: record is a {type(rec).__name__}, not an object with field {name!r}")
    if name not in rec:
        raise UserError(f"{where}: record has no field {name!r} (fields: {', '.join(map(str, rec))})")
    return rec[name]


def record_to_document(rec: Any, index: int, spec: SourceSpec) -> Document | None:
    where = f"data {spec.name!r} record {index}"
    for k, v in spec.filter:
        if not isinstance(rec, dict) or rec.get(k) != v:
            return None
    text: str | None = None
    messages: list[dict] | None = None
    if spec.chat_columns:
        messages = [{"role": r, "content": _text(_field(rec, f, where))} for r, f in spec.chat_columns]
    elif spec.chat_field:
        messages = _normalize_messages(_field(rec, spec.chat_field, where), where)
    elif spec.template is not None:
        if not isinstance(rec, dict):
            raise UserError(f"{where}: a template needs object records, got {type(rec).__name__}")
        try:
            text = spec.template.format_map(_FormatRecord(rec))
        except KeyError as e:
            present = ", ".join(str(k) for k, v in rec.items() if v is not None)
            raise UserError(
                f"{where}: template {spec.template!r} names field {e.args[0]!r}, which the record lacks "
                f"(fields: {present})"
            ) from None
        except (IndexError, ValueError, AttributeError) as e:
            raise UserError(f"{where}: template {spec.template!r} cannot be applied: {e}") from None
    elif spec.text_field is not None and not isinstance(rec, str):
        value = _field(rec, spec.text_field, where)
        if isinstance(value, list):  # a list of messages: chat
            messages = _normalize_messages(value, where)
        else:
            text = _text(value)
    elif isinstance(rec, str):
        text = rec
    elif isinstance(rec, dict):
        if "text" in rec:
            text = _text(rec["text"])
        elif isinstance(rec.get("prompt"), str):  # prompt datasets (OR-Bench, AdvBench, ...)
            text = rec["prompt"]
        else:
            for f in AUTO_CHAT_FIELDS:
                if isinstance(rec.get(f), list):
                    messages = _normalize_messages(rec[f], where)
                    break
            else:
                raise UserError(
                    f"{where}: cannot find text (no 'text' field and no {'/'.join(AUTO_CHAT_FIELDS)} list; fields: "
                    f"{', '.join(map(str, rec))}); set text_field, template or chat_field in a registry entry"
                )
    else:
        raise UserError(f"{where}: unsupported record type {type(rec).__name__}")

    if messages is not None:
        if not any(m["content"].strip() for m in messages):
            return None
        if spec.chat is False:  # auto-detected chat record in a source marked plain
            text = "\n\n".join(m["content"] for m in messages if m["content"].strip())
            return Document(text=text, index=index)
        return Document(messages=messages, index=index)
    if text is None or not text.strip():
        return None
    if spec.chat:
        return Document(messages=[{"role": "user", "content": text}], index=index)
    return Document(text=text, index=index)


def _text(v: Any) -> str:
    return v if isinstance(v, str) else ("" if v is None else str(v))


class _FormatRecord(dict):
    """A record for str.format_map: a missing field, or a null one (how Hugging Face datasets
    fill a field that some records lack), is a KeyError."""

    def __missing__(self, key):
        raise KeyError(key)

    def __getitem__(self, key):
        v = super().__getitem__(key)
        if v is None:
            raise KeyError(key)
        return v


def iter_documents(
    source: SourceSpec | str, seed: int | None = None, base_dir: str | os.PathLike | None = None
) -> Iterator[Document]:
    """Documents of a source, empty/filtered records skipped.

    ``seed=None`` gives source order (pydoc: sorted topics; files: file order);
    an integer gives the seeded shuffled order that :class:`BatchStream` uses.
    ``source`` may be a data key, resolved with :func:`resolve_data_key`.
    """
    spec = resolve_data_key(source, base_dir) if isinstance(source, str) else source
    for i, rec in iter_records(spec, seed):
        doc = record_to_document(rec, i, spec)
        if doc is not None:
            yield doc


# --------------------------------------------------------------------------
# rendering, tokenising, masks
