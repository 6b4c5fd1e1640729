"""Data keys and the data registry: `resolve_data_key` turns a `data_key` into a `SourceSpec`."""

from __future__ import annotations

import json
import os
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from collector.data.specs import DEFAULT_MAX_DOC_CHARS, DEFAULT_SHUFFLE_BUFFER, SourceSpec
from vaultsh.errors import ConfigError

REGISTRY_PATH = Path(__file__).parent.parent / "datasets.json"
REGISTRY_ENV = "VAULTSH_DATASETS"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")
CHAT_ALIASES = {"chat_template": "chat"}
TXT_SPLITS = ("paragraph", "line", "file")
_EXTRACT_FIELDS = ("text_field", "template", "chat_field", "chat_columns")
_ENTRY_FIELDS = set(_EXTRACT_FIELDS) | {
    "source",
    "chat",
    "description",
    "templates",
    "filter",
    "shuffle",
    "shuffle_buffer",
    "txt_split",
    "max_doc_chars",
}


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
        raise ConfigError(
            f"{where}: 'source' is required ('pydoc_topics', 'file:<path>' or 'hf:<repo>[:<subset>]:<split>')"
        )
    given = [f for f in _EXTRACT_FIELDS if entry.get(f) is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}: give at most one of {list(_EXTRACT_FIELDS)}, not {given}")
    templates = entry.get("templates", {})
    if not isinstance(templates, dict) or not all(isinstance(v, dict) for v in templates.values()):
        raise ConfigError(f"{where}: 'templates' must map a name to an object of overrides")
    for tname, over in templates.items():
        bad = sorted(set(over) - (set(_EXTRACT_FIELDS) | {"chat"}))
        if bad:
            raise ConfigError(
                f"{where}: template {tname!r} may only set {sorted(set(_EXTRACT_FIELDS) | {'chat'})}, not {bad}"
            )
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


def resolve_data_key(
    key: str, base_dir: str | os.PathLike | None = None, registry: str | os.PathLike | None = None
) -> SourceSpec:
    """Resolve ``data_config.data_key`` to a :class:`SourceSpec` (see the module docstring)."""
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(
            "data_config.data_key: must be a non-empty string (a registry name, NAME:TEMPLATE, file:PATH or hf:REPO[:SUBSET]:SPLIT)"
        )
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


def _spec_from_entry(
    key: str, name: str, entry: dict, tname: str | None, base_dirs: Sequence[Path], where: str
) -> SourceSpec:
    src = entry["source"]
    common: dict[str, Any] = dict(
        key=key,
        name=name,
        template_name=tname,
        description=entry.get("description", ""),
        text_field=entry.get("text_field"),
        template=entry.get("template"),
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
            raise ConfigError(
                f"{where}: hub source {src!r} must be hf:REPO[:SUBSET]:SPLIT (e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT:train)"
            )
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
