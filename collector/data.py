"""Text sources, the data registry, chat rendering, masks and batching.

Data keys
---------
``data_config.data_key`` is resolved by :func:`resolve_data_key` into a
:class:`SourceSpec`:

- ``NAME`` — an entry of the shipped registry ``collector/datasets.json``
  (plus the entries of a JSON file named by ``$VAULTSH_DATASETS``, which win);
- ``NAME:TEMPLATE`` — the same entry rendered with one of its named templates:
  ``chat`` (alias ``CHAT_TEMPLATE``, Activault's spelling) renders with the
  tokenizer's chat template, ``plain`` uses the raw text, and an entry may
  define more under ``"templates"``;
- a local file: ``file:PATH`` or any path ending in ``.txt``/``.jsonl``/
  ``.json``/``.csv`` (optionally ``:chat``/``:plain``); relative paths resolve
  against ``base_dir`` (the config file's directory), then the current
  directory, then the repository root;
- ``hf:REPO[:SUBSET]:SPLIT`` — a Hugging Face hub dataset, streamed (needs the
  optional ``datasets`` package).

Registry entries
----------------
``{"source": ..., "description": ..., "chat": bool}`` plus at most one way to
get text out of a record: ``text_field`` (a field holding text),
``template`` (a ``str.format`` template over the record's fields),
``chat_field`` (a field holding a list of messages, ``role``/``content`` or
ShareGPT ``from``/``value``) or ``chat_columns`` (``[[role, field], ...]``:
one message per field, Activault's ``chat_template``). With none of them a
record is auto-detected: a string, a ``text`` field, or a
``messages``/``conversations``/``conversation`` list. Optional:
``templates`` (``{name: {overrides}}``), ``filter`` (``{field: value}``,
records that differ are skipped), ``shuffle`` (default true),
``shuffle_buffer`` (streaming sources, default 10000), ``txt_split`` (``.txt``
files: ``paragraph`` (default) — one document per blank-line-separated block,
``line`` or ``file``), ``max_doc_chars`` (``pydoc_topics``: paragraphs are
packed into documents of up to this many characters, default 2000).

Documents and order
-------------------
A source yields records in a fixed order; empty records (no text, no
messages) and filtered ones are skipped. The order is shuffled
deterministically from ``seed``: a seeded permutation over finite sources
(pydoc, local files; ``.txt``/``.jsonl`` files are indexed by byte offset so
they are not held in memory), a seeded shuffle buffer over streaming ones
(``datasets``' own ``shuffle(seed, buffer_size)``, which also shuffles shards).

Batches
-------
Each sequence is one document: rendered (chat template if the source is
chat), tokenised, truncated on the right to ``seq_length`` and right-padded to
exactly ``seq_length`` with the pad token (eos when there is none). Global
batch ``b`` holds documents ``b*batch_size ... (b+1)*batch_size - 1`` of the
stream, so every worker (``b % num_workers == worker``) sees exactly the
batches a single worker would, and ``start_batch`` is pure slicing. Batches a
worker does not own are skipped without running the tokenizer, except with
``skip_cache`` (see below), where token counts decide which documents exist.
Every worker reads the whole document stream up to its last batch.

- ``skip_cache=True``: documents whose token count exceeds ``seq_length`` are
  dropped instead of truncated (Activault: "skip caching very long texts"),
  so every stored sequence is a whole document.
- End of data: the stream stops after the last *full* global batch; the
  documents of a final partial batch are not used. ``BatchStream.exhausted``
  and ``BatchStream.available_batches`` say so afterwards, and a warning is
  logged. A source too small for even one batch is a :class:`UserError`.
- ``packing`` (several documents per row) is not implemented; the hook is the
  ``packing`` attribute of the spec, which is refused for now.

Masks
-----
``attention_mask`` is 1 on every real position (special tokens included) and
0 on padding. ``mask`` is True only on content: False on padding; with
``clean_added_tokens`` also False on tokens the tokenizer added (BOS/EOS) and
on every added/special token id (``<|im_start|>``, ``<|im_end|>``, ...), as
Activault does; with ``clean_default_system_prompt`` also False on the whole
system turn the chat template inserts when a conversation has no system
message (header, default prompt text and closing tokens). A system prompt
supplied by the data is kept. Tokens are masked, never deleted, so positions
stay aligned with the model's activations.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import mmap
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from vaultsh.errors import ConfigError, UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

REGISTRY_PATH = Path(__file__).with_name("datasets.json")
REGISTRY_ENV = "VAULTSH_DATASETS"
REPO_ROOT = Path(__file__).resolve().parent.parent

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")
CHAT_ALIASES = {"chat_template": "chat"}
AUTO_CHAT_FIELDS = ("messages", "conversations", "conversation")
DEFAULT_SHUFFLE_BUFFER = 10_000
DEFAULT_MAX_DOC_CHARS = 2000
TXT_SPLITS = ("paragraph", "line", "file")
_EXTRACT_FIELDS = ("text_field", "template", "chat_field", "chat_columns")
_ENTRY_FIELDS = set(_EXTRACT_FIELDS) | {
    "source", "chat", "description", "templates", "filter", "shuffle",
    "shuffle_buffer", "txt_split", "max_doc_chars",
}

# Tokenising a very long document only to keep its first seq_length tokens is
# wasteful: the text is cut to _CUT_CHARS_PER_TOKEN * seq_length characters
# first (English averages ~4), and the cut is trusted only if it still yields
# seq_length + _CUT_MARGIN tokens (boundary effects of a cut reach back a token
# or two, not 32); otherwise it is retried with a 4x longer cut, up to the
# whole text.
_CUT_CHARS_PER_TOKEN = 8
_CUT_MIN_CHARS = 2048
_CUT_MARGIN = 32


# --------------------------------------------------------------------------
# specs


@dataclass
class DataSpec:
    """What to batch; the config's ``data_config`` has the same attributes."""

    data_key: str
    seq_length: int
    batch_size: int
    n_batches: int
    seed: int = 42
    start_batch: int = 0
    skip_cache: bool = False
    clean_added_tokens: bool = False
    clean_default_system_prompt: bool = False
    packing: bool = False  # concatenate documents with EOS up to seq_length (collector/packing.py)
    # other sources, labels and shaping: the same fields as collector.config.DataConfig
    datasets: list | None = None
    data_mixes: str | None = None
    mix: str | None = None
    stopping_strategy: str = "first_exhausted"
    path: str | None = None
    subset: str | None = None
    split: str = "train"
    text_field: str | None = None
    text_template: str | None = None
    chat: bool | None = None
    categories: list = field(default_factory=list)
    category_field: str | None = None
    category_balance_strategy: str = "use_all"
    label_columns: list = field(default_factory=list)
    shuffle: bool = True
    filter: str | None = None
    sample: float | int | None = None
    max_samples: int | None = None
    sort_by_length: bool = False
    reversed: bool = False


@dataclass(frozen=True)
class SourceSpec:
    """A resolved data key: where documents come from and how to render them."""

    key: str  # the data_key as written
    name: str  # registry name, or the file / hub location for direct keys
    source: str  # "pydoc_topics" | "file:<abs path>" | "hf:<repo>[:<subset>]:<split>" | "datasets:<path>"
    kind: str  # "pydoc" | "file" | "hf" | "datasets" (a `datasets:` entry, loaded with HF datasets)
    chat: bool | None = False  # None: decided per record (direct files only)
    template_name: str | None = None
    text_field: str | None = None
    template: str | None = None
    chat_field: str | None = None
    chat_columns: tuple[tuple[str, str], ...] | None = None
    description: str = ""
    path: str | None = None
    hf_repo: str | None = None
    hf_subset: str | None = None
    hf_split: str | None = None
    filter: tuple[tuple[str, Any], ...] = ()
    shuffle: bool = True
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    txt_split: str = "paragraph"
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS
    # kind "datasets" only
    ds_path: str | None = None  # hub id, or an absolute local file/directory
    ds_local: bool = False
    ds_format: str | None = None  # json | jsonl | csv | text | parquet (local files)
    streaming: bool = False
    weight: float = 1.0

    def to_dict(self) -> dict:
        """JSON-ready description (for cfg.json)."""
        out = {
            "data_key": self.key, "name": self.name, "source": self.source,
            "chat": self.chat, "template_name": self.template_name,
            "text_field": self.text_field, "template": self.template,
            "chat_field": self.chat_field,
            "chat_columns": [list(p) for p in self.chat_columns] if self.chat_columns else None,
            "filter": dict(self.filter) or None, "shuffle": self.shuffle,
            "description": self.description,
        }
        if self.kind == "hf":
            out["shuffle_buffer"] = self.shuffle_buffer
        if self.kind == "file" and (self.path or "").endswith(".txt"):
            out["txt_split"] = self.txt_split
        if self.kind == "pydoc":
            out["max_doc_chars"] = self.max_doc_chars
        if self.kind == "datasets":
            out.update(path=self.ds_path, subset=self.hf_subset, split=self.hf_split, format=self.ds_format,
                       streaming=self.streaming, weight=self.weight)
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class Document:
    """One document: plain ``text`` or chat ``messages`` (role/content dicts)."""

    text: str | None = None
    messages: list[dict] | None = None
    index: int = -1  # record index in source order (stream position for hub sources)
    labels: dict[str, Any] = field(default_factory=dict)  # per-sequence labels (category, label_columns, ...)
    source: int = -1  # index of its source in BatchStream.sources (the `sources` of metadata.json)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass
class Batch:
    """One global batch, on CPU."""

    index: int  # global batch index
    input_ids: "torch.Tensor"  # LongTensor [B, T]
    attention_mask: "torch.Tensor"  # LongTensor [B, T]: 1 real position, 0 padding
    mask: "torch.Tensor"  # BoolTensor [B, T]: True on content tokens only
    n_tokens: int  # mask.sum()
    doc_index: list[int] = field(default_factory=list)  # Document.index of each row
    labels: dict[str, list] = field(default_factory=dict)  # label name -> one value per row
    documents: list[Document] = field(default_factory=list)  # the rows' documents (not with packing)
    # provenance of each row's first token: (source index, document index, token offset); see collector/provenance.py
    source: list[tuple[int, int, int]] = field(default_factory=list)
    # packing only: every document piece of every row, (row, position, source, document, token offset)
    segments: list[tuple[int, int, int, int, int]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[1])


def batch_to_model_inputs(batch: Batch, device: Any) -> dict:
    """``input_ids`` and ``attention_mask`` of ``batch`` on ``device``, ready for ``model(**inputs)``."""
    import torch

    dev = torch.device(device)
    nb = dev.type == "cuda"
    return {
        "input_ids": batch.input_ids.to(dev, non_blocking=nb),
        "attention_mask": batch.attention_mask.to(dev, non_blocking=nb),
    }


# --------------------------------------------------------------------------
# registry and data keys


def load_registry(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The data registry: the shipped file (or ``path``), then ``$VAULTSH_DATASETS`` on top."""
    paths = [Path(path) if path is not None else REGISTRY_PATH]
    extra = os.environ.get(REGISTRY_ENV)
    if path is None and extra:
        paths.append(Path(extra).expanduser())
    merged: dict[str, dict] = {}
    for p in paths:
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"data registry {str(p)!r} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"data registry {str(p)!r} is not readable JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"data registry {str(p)!r} must be a JSON object of name -> entry")
        for name, entry in raw.items():
            if name.startswith("_"):
                continue
            _check_entry(name, entry, p)
            entry = dict(entry)
            entry["_registry"] = str(p)
            merged[name] = entry
    return merged


def registry_names(path: str | os.PathLike | None = None) -> list[str]:
    return sorted(load_registry(path))


def _check_entry(name: str, entry: Any, path: Path) -> None:
    where = f"data registry {str(path)!r}, entry {name!r}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object")
    unknown = sorted(set(entry) - _ENTRY_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} (allowed: {sorted(_ENTRY_FIELDS)})")
    if not isinstance(entry.get("source"), str):
        raise ConfigError(f"{where}: 'source' is required ('pydoc_topics', 'file:<path>' or 'hf:<repo>[:<subset>]:<split>')")
    given = [f for f in _EXTRACT_FIELDS if entry.get(f) is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}: give at most one of {list(_EXTRACT_FIELDS)}, not {given}")
    templates = entry.get("templates", {})
    if not isinstance(templates, dict) or not all(isinstance(v, dict) for v in templates.values()):
        raise ConfigError(f"{where}: 'templates' must map a name to an object of overrides")
    for tname, over in templates.items():
        bad = sorted(set(over) - (set(_EXTRACT_FIELDS) | {"chat"}))
        if bad:
            raise ConfigError(f"{where}: template {tname!r} may only set {sorted(set(_EXTRACT_FIELDS) | {'chat'})}, not {bad}")
        if sum(1 for f in _EXTRACT_FIELDS if over.get(f) is not None) > 1:
            raise ConfigError(f"{where}: template {tname!r} sets more than one of {list(_EXTRACT_FIELDS)}")
    for f in ("shuffle_buffer", "max_doc_chars"):
        v = entry.get(f, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: {f} must be a positive integer, got {v!r}")
    for f in ("chat", "shuffle"):
        if f in entry and entry[f] is not None and not isinstance(entry[f], bool):
            raise ConfigError(f"{where}: {f} must be true or false, got {entry[f]!r}")
    if not isinstance(entry.get("filter", {}), dict):
        raise ConfigError(f"{where}: filter must be an object of field -> required value")
    split = entry.get("txt_split", "paragraph")
    if split not in TXT_SPLITS:
        raise ConfigError(f"{where}: txt_split {split!r} is not one of {list(TXT_SPLITS)}")


def _template_key(name: str) -> str:
    low = name.strip().lower()
    return CHAT_ALIASES.get(low, low)


def _available_templates(entry: dict) -> dict[str, dict]:
    """Named templates of an entry: built-ins, then the entry's own (which win)."""
    out: dict[str, dict] = {"chat": {"chat": True}}
    if entry.get("chat_field") is None and entry.get("chat_columns") is None:
        out["plain"] = {"chat": False}
    for tname, over in (entry.get("templates") or {}).items():
        out[_template_key(tname)] = dict(over)
    return out


def _looks_like_path(key: str) -> bool:
    base = key
    if ":" in key:
        head, tail = key.rsplit(":", 1)
        if _template_key(tail) in ("chat", "plain"):
            base = head
    return base.lower().endswith(FILE_SUFFIXES)


def resolve_data_key(key: str, base_dir: str | os.PathLike | None = None,
                     registry: str | os.PathLike | None = None) -> SourceSpec:
    """Resolve ``data_config.data_key`` to a :class:`SourceSpec` (see the module docstring)."""
    if not isinstance(key, str) or not key.strip():
        raise ConfigError("data_config.data_key: must be a non-empty string (a registry name, NAME:TEMPLATE, file:PATH or hf:REPO[:SUBSET]:SPLIT)")
    key = key.strip()
    if key.startswith(("file:", "hf:")) or key == "pydoc_topics" or _looks_like_path(key):
        return _resolve_direct(key, base_dir)

    reg = load_registry(registry)
    if key in reg:  # a literal registry key may contain ':' (e.g. copied from Activault)
        name, tname = key, None
    else:
        name, _, tname = key.partition(":")
        tname = tname or None
        if name not in reg:
            raise ConfigError(
                f"data_config.data_key: {name!r} is not in the registry (known: {', '.join(sorted(reg))}); "
                "or give a file (file:PATH, *.txt, *.jsonl, *.json, *.csv) or hf:REPO[:SUBSET]:SPLIT"
            )
    entry = dict(reg[name])
    if tname is not None:
        avail = _available_templates(entry)
        tk = _template_key(tname)
        if tk not in avail:
            raise ConfigError(
                f"data_config.data_key: {name!r} has no template {tname!r} "
                f"(available: {', '.join(sorted(avail))}; 'CHAT_TEMPLATE' means 'chat')"
            )
        over = avail[tk]
        if any(over.get(f) is not None for f in _EXTRACT_FIELDS):
            for f in _EXTRACT_FIELDS:
                entry.pop(f, None)
        entry.update({k: v for k, v in over.items() if v is not None})
        tname = tk
    reg_dir = Path(entry.pop("_registry")).parent
    base = REPO_ROOT if reg_dir == REGISTRY_PATH.parent else reg_dir
    return _spec_from_entry(key, name, entry, tname, base_dirs=[base], where=f"registry entry {name!r}")


def _resolve_direct(key: str, base_dir: str | os.PathLike | None) -> SourceSpec:
    tname = None
    body = key
    if ":" in key:
        head, tail = key.rsplit(":", 1)
        if _template_key(tail) in ("chat", "plain") and head not in ("file", "hf"):
            body, tname = head, _template_key(tail)
    entry: dict[str, Any] = {"source": body}
    if body.startswith("hf:") or body == "pydoc_topics":
        entry["text_field"] = "text" if body == "pydoc_topics" else None
    else:
        if not body.startswith("file:"):
            entry["source"] = "file:" + body
    entry["chat"] = {"chat": True, "plain": False}.get(tname) if tname else None
    if body.startswith("hf:") and tname is None:
        entry["chat"] = None
    bases = [Path(base_dir)] if base_dir is not None else []
    bases += [Path.cwd(), REPO_ROOT]
    return _spec_from_entry(key, body, entry, tname, base_dirs=bases, where="data_config.data_key")


def _spec_from_entry(key: str, name: str, entry: dict, tname: str | None,
                     base_dirs: Sequence[Path], where: str) -> SourceSpec:
    src = entry["source"]
    common: dict[str, Any] = dict(
        key=key, name=name, template_name=tname,
        description=entry.get("description", ""),
        text_field=entry.get("text_field"), template=entry.get("template"),
        chat_field=entry.get("chat_field"),
        filter=tuple(sorted((entry.get("filter") or {}).items())),
        shuffle=bool(entry.get("shuffle", True)),
        shuffle_buffer=int(entry.get("shuffle_buffer", DEFAULT_SHUFFLE_BUFFER)),
        txt_split=entry.get("txt_split", "paragraph"),
        max_doc_chars=int(entry.get("max_doc_chars", DEFAULT_MAX_DOC_CHARS)),
    )
    cc = entry.get("chat_columns")
    if cc is not None:
        if not (isinstance(cc, list) and cc and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in cc)):
            raise ConfigError(f"{where}: chat_columns must be a list of [role, field] pairs, got {cc!r}")
        common["chat_columns"] = tuple((str(r), str(f)) for r, f in cc)
    chat = entry.get("chat", False)
    if chat is None and (common["chat_field"] or cc):
        chat = True
    if chat is not None and not isinstance(chat, bool):
        raise ConfigError(f"{where}: 'chat' must be true or false, got {chat!r}")
    if chat is False and (common["chat_field"] or cc):
        raise ConfigError(f"{where}: a chat_field/chat_columns source needs chat: true (or a template that gives text)")
    if common["template"] is not None:
        try:
            list(string.Formatter().parse(common["template"]))
        except ValueError as e:
            raise ConfigError(f"{where}: template {common['template']!r} is not a valid format string: {e}") from None
    common["chat"] = chat

    if src == "pydoc_topics":
        return SourceSpec(source=src, kind="pydoc", **common)
    if src.startswith("hf:"):
        parts = src[3:].split(":")
        if len(parts) == 2:
            repo, subset, split = parts[0], None, parts[1]
        elif len(parts) == 3:
            repo, subset, split = parts
        else:
            raise ConfigError(f"{where}: hub source {src!r} must be hf:REPO[:SUBSET]:SPLIT (e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT:train)")
        if not repo or not split:
            raise ConfigError(f"{where}: hub source {src!r} must be hf:REPO[:SUBSET]:SPLIT")
        return SourceSpec(source=src, kind="hf", hf_repo=repo, hf_subset=subset or None, hf_split=split, **common)
    if src.startswith("file:"):
        raw = src[5:]
        p = Path(raw).expanduser()
        cands = [p] if p.is_absolute() else [b / p for b in base_dirs]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            looked = ", ".join(str(c) for c in cands)
            raise ConfigError(f"{where}: data file {raw!r} not found (looked at: {looked})")
        if found.suffix.lower() not in FILE_SUFFIXES:
            raise ConfigError(f"{where}: data file {raw!r} must end in one of {', '.join(FILE_SUFFIXES)}")
        found = found.resolve()
        return SourceSpec(source=f"file:{found}", kind="file", path=str(found), **common)
    raise ConfigError(f"{where}: source {src!r} is not 'pydoc_topics', 'file:<path>' or 'hf:<repo>[:<subset>]:<split>'")


# --------------------------------------------------------------------------
# sources -> records -> documents


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


def _iter_records(spec: SourceSpec, seed: int | None) -> Iterator[tuple[int, Any]]:
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
        from collector.datasources import iter_dataset_records

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
                ds = _buffer_shuffle(iter(ds), seed, spec.shuffle_buffer)
        it = iter(ds)
    except UserError:
        raise
    except Exception as e:  # network, auth, unknown split/subset: one clear message
        sub = f" (subset {spec.hf_subset!r})" if spec.hf_subset else ""
        raise UserError(
            f"data_config.data_key: could not open hub dataset {spec.hf_repo!r}{sub} split {spec.hf_split!r}: "
            f"{type(e).__name__}: {e}"
        ) from None
    for i, rec in enumerate(it):
        yield i, rec


def _buffer_shuffle(it: Iterator[Any], seed: int, size: int) -> Iterator[Any]:
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


_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "bot": "assistant", "model": "assistant", "system": "system"}


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


def _record_to_document(rec: Any, index: int, spec: SourceSpec) -> Document | None:
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
            raise UserError(f"{where}: template {spec.template!r} names field {e.args[0]!r}, which the record lacks "
                            f"(fields: {present})") from None
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


def iter_documents(source: SourceSpec | str, seed: int | None = None,
                   base_dir: str | os.PathLike | None = None) -> Iterator[Document]:
    """Documents of a source, empty/filtered records skipped.

    ``seed=None`` gives source order (pydoc: sorted topics; files: file order);
    an integer gives the seeded shuffled order that :class:`BatchStream` uses.
    ``source`` may be a data key, resolved with :func:`resolve_data_key`.
    """
    spec = resolve_data_key(source, base_dir) if isinstance(source, str) else source
    for i, rec in _iter_records(spec, seed):
        doc = _record_to_document(rec, i, spec)
        if doc is not None:
            yield doc


# --------------------------------------------------------------------------
# rendering, tokenising, masks

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
    A, P, Q = a_full[:a], s_full[:s], s_full[s + len(_SENT_SYS):u]
    if not (A.startswith(P) and A.endswith(Q) and len(A) >= len(P) + len(Q)):
        return None
    closer = ""
    if isinstance(c_full, str) and (c := c_full.find(_SENT_SYS)) >= 0 and c_full[:c] == P:
        tail = c_full[c + len(_SENT_SYS):]
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


class _Encoder:
    """Renders documents and tokenises them into (ids, content mask) rows."""

    def __init__(self, tokenizer, seq_length: int, clean_added_tokens: bool,
                 clean_default_system_prompt: bool, data_key: str = "", generation_prompt: bool = False):
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

    def render(self, doc: Document) -> tuple[str, bool, tuple[int, int] | None]:
        """(text, add_special_tokens, masked char span of the default system turn)."""
        if doc.messages is None:
            return doc.text or "", True, None
        if getattr(self.tok, "chat_template", None) is None:
            raise UserError(
                f"data_config.data_key: {self.data_key!r} renders chat with the tokenizer's chat template, "
                "but this tokenizer has none; use a plain-text key (e.g. NAME:plain)"
            )
        try:
            text = self.tok.apply_chat_template(doc.messages, tokenize=False,
                                                add_generation_prompt=self.generation_prompt)
        except Exception as e:
            raise UserError(f"data {self.data_key!r} document {doc.index}: the chat template rejected it: {e}") from None
        span = None
        if self.clean_sys and doc.messages and doc.messages[0].get("role") != "system":
            ds = self.default_system()
            if ds is not None and text.startswith(ds.prefix):
                span = (ds.start, len(ds.prefix))
        return text, False, span

    def _tokenize(self, texts: list[str], add_special: bool, offsets: bool) -> dict:
        kw: dict[str, Any] = dict(add_special_tokens=add_special, truncation=False,
                                  return_attention_mask=False, verbose=False)
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
        for r in rows:
            r["long"] = len(r["input_ids"]) > self.seq_length
        return rows  # type: ignore[return-value]

    def too_long(self, docs: Sequence[Document]) -> list[bool]:
        """Whether each document has more than seq_length tokens (for skip_cache)."""
        out: list[bool | None] = [None] * len(docs)
        rendered = [self.render(d) for d in docs]
        for add_special in (True, False):
            idx = [i for i, r in enumerate(rendered) if r[1] is add_special]
            if not idx:
                continue
            rows = self._encode_group([rendered[i][0] for i in idx], add_special, offsets=False)
            for i, r in zip(idx, rows):
                out[i] = r["long"]
        return [bool(x) for x in out]

    def lengths(self, docs: Sequence[Document]) -> list[int]:
        """Exact token count of each rendered document (for sort_by_length)."""
        out = [0] * len(docs)
        rendered = [self.render(d) for d in docs]
        for add_special in (True, False):
            idx = [i for i, r in enumerate(rendered) if r[1] is add_special]
            if idx:
                enc = self._tokenize([rendered[i][0] for i in idx], add_special, offsets=False)
                for i, ids in zip(idx, enc["input_ids"]):
                    out[i] = len(ids)
        return out

    def encode(self, docs: Sequence[Document]) -> list[tuple[Any, Any, bool]]:
        """(ids truncated to seq_length, content mask, was_longer) per document."""
        rendered = [self.render(d) for d in docs]
        out: list[Any] = [None] * len(docs)
        for add_special in (True, False):
            idx = [i for i, r in enumerate(rendered) if r[1] is add_special]
            if not idx:
                continue
            rows = self._encode_group([rendered[i][0] for i in idx], add_special, offsets=True)
            for i, r in zip(idx, rows):
                out[i] = self._mask_row(r, rendered[i])
        return out

    def _mask_row(self, row: dict, rendered: tuple[str, bool, tuple[int, int] | None]) -> tuple[Any, Any, bool]:
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
                    keep[len(pre): min(len(blk), T)] = False
        return ids, keep, bool(row["long"])


# --------------------------------------------------------------------------
# batching


def _spec_value(spec: Any, name: str, default: Any = None) -> Any:
    return getattr(spec, name, default)


class BatchStream:
    """This worker's batches: global indices in [start_batch, n_batches) with b % num_workers == worker.

    After iteration: ``produced`` (batches yielded), ``exhausted`` (the source
    ran out before n_batches) and ``available_batches`` (global batches the
    source could fill, when exhausted).
    """

    def __init__(self, spec: Any, tokenizer, worker: int = 0, num_workers: int = 1, *,
                 base_dir: str | os.PathLike | None = None, source: SourceSpec | None = None,
                 max_new_tokens: int = 0):
        self.spec = spec
        self.tokenizer = tokenizer
        self.worker = int(worker)
        self.num_workers = int(num_workers)
        self.seq_length = int(_spec_value(spec, "seq_length"))
        self.batch_size = int(_spec_value(spec, "batch_size"))
        nb = _spec_value(spec, "n_batches")
        self.n_batches: int | None = None if nb is None else int(nb)
        self.seed = int(_spec_value(spec, "seed", 42))
        self.start_batch = int(_spec_value(spec, "start_batch", 0) or 0)
        self.skip_cache = bool(_spec_value(spec, "skip_cache", False))
        if self.seq_length < 1:
            raise ConfigError(f"data_config.seq_length: must be >= 1, got {self.seq_length}")
        if self.batch_size < 1:
            raise ConfigError(f"data_config.batch_size: must be >= 1, got {self.batch_size}")
        if self.n_batches is not None and self.n_batches < 0:
            raise ConfigError(f"data_config.n_batches: must be >= 0, got {self.n_batches}")
        if self.start_batch < 0:
            raise ConfigError(f"data_config.start_batch: must be >= 0, got {self.start_batch}")
        if self.num_workers < 1 or not 0 <= self.worker < self.num_workers:
            raise ConfigError(f"worker index {self.worker} is not in [0, num_runs={self.num_workers})")
        self.packing = bool(_spec_value(spec, "packing", False))
        self.max_new_tokens = int(max_new_tokens or 0)
        if self.packing and (self.skip_cache or self.max_new_tokens):
            raise ConfigError("data_config.packing: cannot be combined with skip_cache or generation (max_new_tokens)")
        if self.max_new_tokens >= self.seq_length:
            raise ConfigError(f"inference.max_new_tokens: {self.max_new_tokens} leaves no room for the prompt "
                              f"(seq_length {self.seq_length})")
        # generation mode: rows are prompts of up to seq_length - max_new_tokens tokens; a longer prompt
        # is dropped like skip_cache does (a cut prompt would lose the chat template's generation prompt)
        self.row_length = self.seq_length - self.max_new_tokens
        self.skip_cache = self.skip_cache or self.max_new_tokens > 0
        from collector.datasources import plan_sources

        self.sources = [source] if source is not None else plan_sources(spec, base_dir)
        self.source = self.sources[0]
        self.description = " + ".join(s.key for s in self.sources)
        clean_added = bool(_spec_value(spec, "clean_added_tokens", False))
        clean_sys = bool(_spec_value(spec, "clean_default_system_prompt", False))
        self.encoder = _Encoder(tokenizer, self.row_length, clean_added, clean_sys,
                                data_key=self.description, generation_prompt=self.max_new_tokens > 0)
        # packing tokenises whole documents (no truncation: they continue on the next row)
        self._full_encoder = _Encoder(tokenizer, 1 << 40, clean_added, clean_sys, data_key=self.description)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = int(eos) if eos is not None else self.pad_id
        self.eos_keep = not (clean_added and self.eos_id in self.encoder.special_ids)
        self.produced = 0
        self.exhausted = False
        self.available_batches: int | None = None

    def batch_indices(self) -> range:
        """Global batch indices this worker is assigned (it may get fewer if the data runs out)."""
        if self.n_batches is None:
            raise ValueError("n_batches is unbounded")
        first = self.start_batch + (self.worker - self.start_batch) % self.num_workers
        return range(first, max(first, self.n_batches), self.num_workers)

    @property
    def planned_batches(self) -> int | None:
        return None if self.n_batches is None else len(self.batch_indices())

    def _owned(self, b: int) -> bool:
        return b >= self.start_batch and b % self.num_workers == self.worker

    def _last_owned(self) -> int | None:
        if self.n_batches is None:
            return None
        r = self.batch_indices()
        return r[-1] if len(r) else -1

    def _groups(self, docs: Iterator[Document], last: int | None) -> Iterator[tuple[int, list[Document], list | None]]:
        """(global index, documents, encodings if owned) for global batches 0, 1, ... up to last."""
        B = self.batch_size
        b = 0
        while last is None or b <= last:
            owned = self._owned(b)
            if not self.skip_cache:
                group = list(itertools.islice(docs, B))
                if len(group) < B:
                    self._mark_exhausted(b)
                    return
                yield b, group, (self.encoder.encode(group) if owned else None)
            else:
                group, encs = [], []
                while len(group) < B:
                    more = list(itertools.islice(docs, B - len(group)))
                    if not more:
                        self._mark_exhausted(b)
                        return
                    if owned:
                        for d, e in zip(more, self.encoder.encode(more)):
                            if not e[2]:
                                group.append(d)
                                encs.append(e)
                    else:
                        group += [d for d, long in zip(more, self.encoder.too_long(more)) if not long]
                yield b, group, (encs if owned else None)
            b += 1

    def _mark_exhausted(self, b: int) -> None:
        self.exhausted = True
        self.available_batches = b
        what = "packed rows" if self.packing else "usable documents"
        if b == 0:
            raise UserError(
                f"data_config.data_key: {self.description!r} has fewer than batch_size={self.batch_size} {what}"
                + (" (skip_cache drops documents longer than seq_length)" if self.skip_cache else "")
            )
        if self.n_batches is None:
            log.info("data source %r ran out after %d global batches", self.description, b)
        elif b < self.n_batches:
            log.warning("data source %r ran out after %d global batches (n_batches=%s); worker %d produced %d",
                        self.description, b, self.n_batches, self.worker, self.produced)

    def __iter__(self) -> Iterator[Batch]:
        self.produced = 0
        self.exhausted = False
        self.available_batches = None
        last = self._last_owned()
        if last is not None and last < 0:
            return
        docs = self.documents()
        try:
            if self.packing:
                for b, rows in self._packed_groups(docs, last):
                    if rows is not None:
                        yield self._make_packed_batch(b, rows)
                        self.produced += 1
                return
            for b, group, encs in self._groups(docs, last):
                if encs is None:
                    continue
                yield self._make_batch(b, group, encs)
                self.produced += 1
        finally:
            close = getattr(docs, "close", None)
            if close is not None:
                close()

    def documents(self) -> Iterator[Document]:
        """The whole document stream (sources, labels, interleaving, shaping), as every worker sees it."""
        from collector.datasources import document_stream

        return document_stream(self.spec, self.sources, self.seed, self.encoder.lengths)

    def _packed_groups(self, docs: Iterator[Document], last: int | None) -> Iterator[tuple[int, list | None]]:
        """(global index, rows if owned) of packed batches 0, 1, ... up to last."""
        from collector.packing import pack_rows

        def encoded() -> Iterator[tuple[Any, Any, int]]:
            while True:
                chunk = list(itertools.islice(docs, 64))
                if not chunk:
                    return
                for d, (ids, keep, _long) in zip(chunk, self._full_encoder.encode(chunk)):
                    yield ids, keep, (d.source, d.index)

        rows = pack_rows(encoded(), self.seq_length, self.eos_id, self.eos_keep)
        b = 0
        while last is None or b <= last:
            group = list(itertools.islice(rows, self.batch_size))
            if len(group) < self.batch_size:
                self._mark_exhausted(b)
                return
            yield b, (group if self._owned(b) else None)
            b += 1

    def _make_packed_batch(self, b: int, rows: list) -> Batch:
        import numpy as np
        import torch

        ids = torch.from_numpy(np.stack([r.ids for r in rows]))
        mask = torch.from_numpy(np.stack([r.keep for r in rows]))
        first = [r.segments[0] for r in rows]
        return Batch(index=b, input_ids=ids, attention_mask=torch.ones_like(ids), mask=mask,
                     n_tokens=int(mask.sum()), doc_index=[doc for _pos, (_src, doc), _off in first],
                     source=[(src, doc, off) for _pos, (src, doc), off in first],
                     segments=[(i, pos, src, doc, off) for i, r in enumerate(rows)
                               for pos, (src, doc), off in r.segments])

    def _make_batch(self, b: int, docs: list[Document], encs: list) -> Batch:
        import torch

        B, T = len(encs), self.row_length
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        att = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.bool)
        for i, (row, keep, _long) in enumerate(encs):
            n = len(row)
            if n:
                ids[i, :n] = torch.from_numpy(row)
                att[i, :n] = 1
                mask[i, :n] = torch.from_numpy(keep)
        names = sorted({k for d in docs for k in d.labels})
        labels = {k: [d.labels.get(k) for d in docs] for k in names}
        return Batch(index=b, input_ids=ids, attention_mask=att, mask=mask,
                     n_tokens=int(mask.sum()), doc_index=[d.index for d in docs], labels=labels,
                     documents=list(docs), source=[(d.source, d.index, 0) for d in docs])
