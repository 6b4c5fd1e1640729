"""Turning stored token ids back into text: the shell (`inspect`, `view`, the batch viewer) and explore
(`grep`, `top`, `view --heat`) both decode through here.

The tokenizer is the one the run was collected with, named in its cfg.json
(vaultsh: `tokenizer.source`; Activault: `transformer_config.model_name`),
else in the megabatch header. It is loaded offline where it can be:

- a local directory: `AutoTokenizer.from_pretrained(dir, local_files_only=True)`;
- a `.gguf` file or `pkg:PACKAGE/FILE.gguf`: the converted copy the collector
  keeps under `$VAULTSH_CACHE` when there is one, else the GGUF file itself;
- a hub id: the local Hugging Face cache only (`cache_dir` from the config or
  the default cache); the shell never downloads.

A directory with `tokenizer.json` is decoded with the `tokenizers` library
directly (the same text as transformers' fast tokenizer, without its seconds
of import time); anything else goes through `AutoTokenizer`.
`VAULTSH_TOKENIZER` overrides the source. When nothing loads, callers show
token ids and one line saying why. Loaded tokenizers are kept for the process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TOKENIZER_ENV = "VAULTSH_TOKENIZER"

_cache: dict[tuple, TokenizerHandle] = {}
_lock = threading.Lock()


@dataclass
class TokenizerHandle:
    """A loaded tokenizer, or why there is none (`tokenizer` None and `note` set)."""

    source: str | None
    tokenizer: Any = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.tokenizer is not None


def _dig(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def tokenizer_spec(cfg: dict | None, header_meta: dict | None = None) -> tuple[str | None, dict]:
    """(source name, loading options) for a run's tokenizer, from cfg.json and the header."""
    cfg = cfg if isinstance(cfg, dict) else {}
    env = os.environ.get(TOKENIZER_ENV, "").strip()
    candidates = [
        env,
        _dig(cfg, "tokenizer", "source"),
        _dig(cfg, "tokenizer_name"),
        _dig(cfg, "model_name"),
        _dig(cfg, "transformer_config", "model_name"),
        _dig(cfg, "config", "model", "name"),
        _dig(cfg, "model", "name"),
        cfg.get("model") if isinstance(cfg.get("model"), str) else None,
        (header_meta or {}).get("tokenizer"),
        (header_meta or {}).get("model"),
    ]
    name = next((c for c in candidates if isinstance(c, str) and c.strip()), None)
    opts: dict = {}
    cache_dir = _dig(cfg, "transformer_config", "cache_dir") or _dig(cfg, "config", "model", "cache_dir")
    if isinstance(cache_dir, str) and cache_dir:
        opts["cache_dir"] = cache_dir
    kwargs = _dig(cfg, "transformer_config", "kwargs") or _dig(cfg, "config", "model", "kwargs")
    if isinstance(kwargs, dict) and isinstance(kwargs.get("gguf_file"), str):
        opts["gguf_file"] = kwargs["gguf_file"]
    return name, opts


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join((str(exc).strip().splitlines() or [type(exc).__name__])[0].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_tokenizer(name: str | None, cache_dir: str | None = None, gguf_file: str | None = None) -> TokenizerHandle:
    """Load (once per process) the tokenizer `name`; never raises."""
    if not name:
        return TokenizerHandle(None, note="no tokenizer named in cfg.json or the megabatch header")
    key = (name, cache_dir, gguf_file, os.environ.get(TOKENIZER_ENV, ""))
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    handle = _load(name, cache_dir, gguf_file)
    with _lock:
        _cache[key] = handle
    return handle


def _in_hub_cache(repo_id: str, cache_dir: str | None) -> bool:
    """True when the hub cache holds a tokenizer file of `repo_id` (checked without importing transformers)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        try:
            hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - an id that is no valid repo id
            return False
        if isinstance(hit, str):
            return True
    return False


class _FastDecoder:
    """`tokenizer.json` through the `tokenizers` library: the same decoding as transformers'
    fast tokenizer (special tokens kept, no space clean-up) without importing transformers."""

    def __init__(self, tok):
        self._tok = tok

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _fast_tokenizer(path: str, kw: dict) -> _FastDecoder | None:
    """A `tokenizers` decoder for a tokenizer directory (or hub snapshot) with tokenizer.json, else None."""
    import json
    from pathlib import Path

    if "gguf_file" in kw:
        return None
    folder = Path(path)
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(path, "tokenizer.json", cache_dir=kw.get("cache_dir"))
        except Exception:  # noqa: BLE001
            return None
        if not isinstance(hit, str):
            return None
        folder = Path(hit).parent
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        config = {}
    if not isinstance(config, dict) or config.get("clean_up_tokenization_spaces"):
        return None  # transformers post-processes the text: let it decode
    try:
        from tokenizers import Tokenizer

        return _FastDecoder(Tokenizer.from_file(str(folder / "tokenizer.json")))
    except Exception:  # noqa: BLE001 - fall back to transformers
        return None


def _load(name: str, cache_dir: str | None, gguf_file: str | None) -> TokenizerHandle:
    try:
        from collector.model import gguf_cache_dir, resolve_model_source

        source = resolve_model_source(name, {"gguf_file": gguf_file} if gguf_file else None)
    except Exception as exc:  # noqa: BLE001 - a bad name is reported, not raised
        return TokenizerHandle(name, note=f"tokenizer {name!r} not found: {_first_line(exc)}")
    attempts: list[tuple[str, dict]] = []
    if source.gguf_file:
        try:
            converted = gguf_cache_dir(source)
        except OSError:
            converted = None
        if converted is not None and any(
            (converted / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
        ):
            attempts.append((str(converted), {"local_files_only": True}))
        attempts.append((source.path, {"gguf_file": source.gguf_file, "local_files_only": True}))
    elif source.local:
        attempts.append((source.path, {"local_files_only": True}))
    else:
        # A hub id: only ever the local cache (a shell must not reach out to the hub).
        if not _in_hub_cache(source.path, cache_dir):
            return TokenizerHandle(
                name,
                note=f"tokenizer {name!r} is not in the local Hugging Face cache "
                f"(set {TOKENIZER_ENV} to a tokenizer directory)",
            )
        attempts.append(
            (
                source.path,
                {"cache_dir": cache_dir, "local_files_only": True} if cache_dir else {"local_files_only": True},
            )
        )
    for path, kw in attempts:
        fast = _fast_tokenizer(path, kw)
        if fast is not None:
            return TokenizerHandle(name, fast)
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        return TokenizerHandle(name, note="transformers is not installed")
    hf_logging.set_verbosity_error()
    error: BaseException | None = None
    for path, kw in attempts:
        try:
            tok = AutoTokenizer.from_pretrained(path, **kw)
            return TokenizerHandle(name, tok)
        except Exception as exc:  # noqa: BLE001 - any loading failure falls back to ids
            error = exc
    return TokenizerHandle(
        name, note=f"tokenizer {name!r} could not be loaded: {_first_line(error) if error else 'unknown error'}"
    )


def decode(handle: TokenizerHandle, ids: Sequence[int]) -> str:
    """`tokenizer.decode(ids)`, or the ids as text when there is no tokenizer."""
    if handle.ok:
        try:
            return handle.tokenizer.decode(list(ids))
        except Exception:  # noqa: BLE001 - ids outside the vocabulary (a foreign or corrupt file)
            pass
    return " ".join(str(i) for i in ids)


def runs(mask: Sequence[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal mask values: (start, end, real)."""
    out: list[tuple[int, int, bool]] = []
    start = 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or bool(mask[i]) != bool(mask[start]):
            out.append((start, i, bool(mask[start])))
            start = i
    return out


def segments(handle: TokenizerHandle, ids: Sequence[int], mask: Sequence[bool]) -> list[tuple[str, bool]]:
    """The sequence as (text, real) pieces: real content decoded, masked runs decoded separately.

    A masked run of one repeated token (padding) is shortened to `<piece> ×N`.
    """
    out: list[tuple[str, bool]] = []
    for s, e, real in runs(mask):
        chunk = list(ids[s:e])
        if not real and len(chunk) >= 4 and len(set(chunk)) == 1:
            out.append((f"{decode(handle, chunk[:1])} ×{len(chunk)}", False))
        else:
            out.append((decode(handle, chunk), real))
    return out


def token_pieces(handle: TokenizerHandle, ids: Sequence[int], mask: Sequence[bool]) -> list[tuple[int, str, bool]]:
    """(id, decoded piece, real) for every token."""
    return [(int(i), decode(handle, [int(i)]) if handle.ok else "", bool(m)) for i, m in zip(ids, mask)]
