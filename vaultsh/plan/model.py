"""What the plan needs to know about a model, read without its weights.

`read_model_shape(model_cfg, overrides)` returns a `ModelShape`: layer count,
widths, heads, vocabulary and the exact parameter count per decoder layer and
outside the layers. Sources, best first:

- a GGUF file: its header (metadata and the tensor table: exact counts, nothing
  dequantized);
- a model directory, or a hub id already in the local HF cache: its
  config.json, and the model built on torch's ``meta`` device (no memory, no
  weights read) to count parameters exactly for any architecture transformers
  knows;
- explicit overrides (``--n-layers``, ``--d-model``, ...) when the model cannot
  be read here (a hub id that is not cached: the plan never goes online). The
  parameter count is then a Llama-style formula and says so.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from collector.config.model_facts import (
    D_MODEL_ATTRS,
    MAX_CONTEXT_ATTRS,
    N_LAYERS_ATTRS,
    gguf_int,
    int_attr,
    locate_gguf,
    read_gguf_header,
    resolve_pkg,
    text_config,
)
from vaultsh.dtypes import FLOAT_NAMES
from vaultsh.errors import ConfigError

__all__ = ["ModelShape", "read_model_shape"]


@dataclass
class ModelShape:
    """Architecture facts and parameter counts of a model (no weights)."""

    name: str
    n_layers: int
    d_model: int
    d_mlp: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    max_context: int | None = None
    model_type: str = "unknown"
    config_dtype: str | None = None  # the dtype the checkpoint declares (for dtype: auto)
    #: parameters of each decoder layer (len == n_layers)
    layer_params: list[int] = field(default_factory=list)
    #: parameters outside the decoder layers (embeddings, final norm, untied LM head)
    other_params: int = 0
    #: parameters the forward pass needs before layer 0 (the input embeddings)
    embed_params: int = 0
    source: str = ""
    exact_params: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return self.other_params + sum(self.layer_params)

    def params_through(self, layer: int) -> int:
        """Parameters the forward pass uses up to and including decoder layer `layer`."""
        return self.embed_params + sum(self.layer_params[: layer + 1])

    @property
    def kv_dim(self) -> int:
        if self.n_heads and self.n_kv_heads:
            return self.d_model * self.n_kv_heads // self.n_heads
        return self.d_model

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = self.params
        per = set(self.layer_params)
        d["layer_params"] = self.layer_params[0] if len(per) == 1 else self.layer_params
        return d


# --------------------------------------------------------------------------- #
# GGUF: metadata and tensor table
# --------------------------------------------------------------------------- #


def read_gguf_tables(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(scalar/string metadata, {tensor name: shape}) of a GGUF file, from the collector's reader."""
    return read_gguf_header(path, tensors=True)


def _shape_from_gguf(name: str, path: Path) -> ModelShape:
    try:
        meta, tensors = read_gguf_tables(path)
    except (OSError, struct.error) as e:
        raise ConfigError(f"model {name!r}: cannot read the GGUF header of {str(path)!r}: {e}") from None
    arch = str(meta.get("general.architecture", ""))

    def get(key: str) -> int | None:
        return gguf_int(meta, arch, key)

    n_layers, d_model = get("block_count"), get("embedding_length")
    if not n_layers or not d_model:
        raise ConfigError(f"model {name!r}: GGUF header lacks {arch}.block_count/{arch}.embedding_length")
    layer_params = [0] * n_layers
    other = embed = 0
    for tname, dims in tensors.items():
        n = math.prod(dims)
        parts = tname.split(".")
        if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < n_layers:
            layer_params[int(parts[1])] += n
        else:
            other += n
            if tname.startswith("token_embd"):
                embed += n
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or getattr(tokens, "length", None)
    return ModelShape(
        name=name,
        n_layers=n_layers,
        d_model=d_model,
        d_mlp=get("feed_forward_length"),
        n_heads=get("attention.head_count"),
        n_kv_heads=get("attention.head_count_kv") or get("attention.head_count"),
        vocab_size=int(vocab) if vocab else None,
        max_context=get("context_length"),
        model_type=arch or "unknown",
        config_dtype="float32",  # the collector dequantizes GGUF weights to float32
        layer_params=layer_params,
        other_params=other,
        embed_params=embed,
        source=f"GGUF header of {path.name}",
    )


# --------------------------------------------------------------------------- #
# Hugging Face config (local directory or the local cache)
# --------------------------------------------------------------------------- #


@contextmanager
def _forced_offline() -> Iterator[None]:
    """The plan never reaches a hub: reads use the local files/cache only."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hf_config(model_cfg: Any, local: Path | None) -> Any:
    from transformers import AutoConfig

    kw: dict[str, Any] = {"trust_remote_code": bool(model_cfg.trust_remote_code), "local_files_only": True}
    if model_cfg.cache_dir:
        kw["cache_dir"] = model_cfg.cache_dir
    for k in ("revision", "subfolder"):
        if k in model_cfg.kwargs:
            kw[k] = model_cfg.kwargs[k]
    return AutoConfig.from_pretrained(str(local) if local else model_cfg.name, **kw)


def _count_on_meta(config: Any) -> tuple[list[int], int, int]:
    """(params per decoder layer, params outside them, input-embedding params), exactly, on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from collector.capture import find_decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = find_decoder_layers(model)
    seen: set[int] = set()
    layer_params = []
    for layer in layers:
        n = 0
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        layer_params.append(n)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    emb = model.get_input_embeddings()
    embed = sum(p.numel() for p in emb.parameters()) if emb is not None else 0
    return layer_params, total - sum(layer_params), embed


def _shape_from_hf(model_cfg: Any, config: Any, where: str) -> ModelShape:
    text = text_config(config)
    n_layers = int_attr(text, *N_LAYERS_ATTRS)
    d_model = int_attr(text, *D_MODEL_ATTRS)
    if not n_layers or not d_model:
        raise ConfigError(f"model {model_cfg.name!r}: its config has no layer count or hidden size")
    dt = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or getattr(config, "torch_dtype", None)
    dt_name = str(dt).replace("torch.", "") if dt is not None else None
    shape = ModelShape(
        name=model_cfg.name,
        n_layers=n_layers,
        d_model=d_model,
        d_mlp=int_attr(text, "intermediate_size", "n_inner", "ffn_dim", "d_ff"),
        n_heads=int_attr(text, "num_attention_heads", "n_head", "num_heads"),
        n_kv_heads=int_attr(text, "num_key_value_heads", "num_kv_heads")
        or int_attr(text, "num_attention_heads", "n_head"),
        vocab_size=int_attr(text, "vocab_size") or int_attr(config, "vocab_size"),
        # as validation reads it, except `seq_length` (which some configs use for the training length)
        max_context=int_attr(text, *(a for a in MAX_CONTEXT_ATTRS if a != "seq_length")),
        model_type=str(getattr(text, "model_type", "") or "unknown"),
        config_dtype=dt_name if dt_name in FLOAT_NAMES else None,
        source=where,
    )
    try:
        shape.layer_params, shape.other_params, shape.embed_params = _count_on_meta(config)
    except Exception as e:  # an architecture transformers cannot build here: fall back to the formula
        _formula_params(shape)
        shape.notes.append(f"parameters from a Llama-style formula ({type(e).__name__} building the model on meta)")
    return shape


# --------------------------------------------------------------------------- #
# Formula (overrides only)
# --------------------------------------------------------------------------- #


def _formula_params(shape: ModelShape, tied: bool = False) -> None:
    """Llama-style counts: attention q,k,v,o + gated MLP + 2 norms per layer; embeddings (+ LM head)."""
    D = shape.d_model
    I = shape.d_mlp or 4 * D
    kv = shape.kv_dim
    per_layer = 2 * D * D + 2 * D * kv + 3 * D * I + 2 * D
    V = shape.vocab_size or 0
    shape.layer_params = [per_layer] * shape.n_layers
    shape.embed_params = V * D
    shape.other_params = V * D * (1 if tied else 2) + D
    shape.exact_params = False


def _apply_overrides(shape: ModelShape, overrides: Mapping[str, int | None]) -> ModelShape:
    # ModelShape's int fields by name (n_layers, d_model, ...): Any, as replace() cannot tell which they are
    o: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None and k != "params"}
    if not o and overrides.get("params") is None:
        return shape
    changed_arch = any(getattr(shape, k) != v for k, v in o.items())
    shape = replace(shape, **o, notes=list(shape.notes))
    if changed_arch:
        _formula_params(shape)
        shape.notes.append("parameters from a Llama-style formula over the overridden sizes")
    total = overrides.get("params")
    if total is not None:
        # scale the per-layer/other split to the given total
        old = shape.params or 1
        shape.layer_params = [round(p * total / old) for p in shape.layer_params]
        shape.other_params = total - sum(shape.layer_params)
        shape.embed_params = min(shape.embed_params, shape.other_params)
        shape.exact_params = False
        shape.notes.append(f"total parameters given: {total:,}")
    shape.source += " + overrides (" + ", ".join(f"{k}={v}" for k, v in overrides.items() if v is not None) + ")"
    return shape


def _in_hf_cache(model_cfg: Any) -> bool:
    """Whether the hub id's config.json is in the local cache (cheap: no transformers import)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(
            model_cfg.name, "config.json", cache_dir=model_cfg.cache_dir, revision=model_cfg.kwargs.get("revision")
        )
    except Exception:
        return False
    return isinstance(got, str) and Path(got).is_file()


def read_model_shape(model_cfg: Any, overrides: Mapping[str, int | None] | None = None) -> ModelShape:
    """The ModelShape of the config's model, offline and without weights.

    Raises ConfigError naming the model and the overrides to give when it
    cannot be read here and the overrides do not suffice (n_layers and
    d_model at least).
    """
    overrides = dict(overrides or {})
    name = model_cfg.name
    try:
        resolved = resolve_pkg(name)
        gg = locate_gguf(resolved, model_cfg.kwargs)
    except ConfigError:
        gg, resolved = None, name
        if not (overrides.get("n_layers") and overrides.get("d_model")):
            raise
    if gg is not None:
        path = gg[0] / gg[1]
        if not path.is_file():
            raise ConfigError(f"model {name!r}: GGUF file {str(path)!r} does not exist")
        return _apply_overrides(_shape_from_gguf(name, path), overrides)

    p = Path(resolved).expanduser()
    if p.is_file() and p.name == "config.json":
        p = p.parent
    local = p if (p / "config.json").is_file() else None
    reason = ""
    if local is None and (p.exists() or resolved.startswith((".", "/", "~"))):
        reason = "no such model directory or .gguf file" if not p.exists() else "no config.json and no .gguf file"
    elif local is None and not _in_hf_cache(model_cfg):
        reason = "not found locally (the plan reads the local HF cache only, never the hub)"
    else:
        try:
            with _forced_offline():
                config = _hf_config(model_cfg, local)
            where = f"{local / 'config.json'}" if local else "config.json in the local HF cache"
            return _apply_overrides(_shape_from_hf(model_cfg, config, where), overrides)
        except ConfigError:
            raise
        except Exception as e:  # OSError / ValueError from transformers: not here
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            reason = "not found locally (the plan reads the local HF cache only, never the hub)"
            if local is not None:
                reason = f"cannot read its config: {first[:200]}"
    n_layers, d_model = overrides.get("n_layers"), overrides.get("d_model")
    if not n_layers or not d_model:
        raise ConfigError(
            f"model {name!r}: cannot read the model's facts here: {reason}; "
            "give them with --n-layers and --d-model (and --d-mlp, --n-heads, --n-kv-heads, --vocab-size, "
            "--params for the memory estimate)"
        )
    shape = ModelShape(name=name, n_layers=n_layers, d_model=d_model, source="overrides")
    shape.notes.append(f"model facts not read ({reason}): from the command line")
    for k in ("d_mlp", "n_heads", "n_kv_heads", "vocab_size", "max_context"):
        if overrides.get(k):
            setattr(shape, k, overrides[k])
    _formula_params(shape)
    if overrides.get("params"):
        return _apply_overrides(shape, {"params": overrides["params"]})
    missing = [k for k in ("d_mlp", "vocab_size") if not overrides.get(k)]
    if missing:
        shape.notes.append(
            "parameter count is a rough Llama-style estimate (missing "
            + ", ".join("--" + m.replace("_", "-") for m in missing)
            + ")"
        )
    return shape


def read_hf_config(model_cfg: Any) -> Any:
    """The Hugging Face config of the config's model, offline and without weights (GGUF: from its header).

    Raises ConfigError naming the model when it cannot be read here.
    """
    name = model_cfg.name
    resolved = resolve_pkg(name)
    gg = locate_gguf(resolved, model_cfg.kwargs)
    try:
        with _forced_offline():
            if gg is not None:
                from transformers import AutoConfig

                from collector.model import ModelSource, gguf_cache_dir

                if not (gg[0] / gg[1]).is_file():
                    raise ConfigError(f"model {name!r}: GGUF file {str(gg[0] / gg[1])!r} does not exist")
                converted = gguf_cache_dir(ModelSource(str(gg[0]), gg[1], True))
                if (converted / "config.json").is_file():  # the collector's converted copy: no GGUF parse
                    return AutoConfig.from_pretrained(str(converted))
                return AutoConfig.from_pretrained(str(gg[0]), gguf_file=gg[1])
            p = Path(resolved).expanduser()
            if p.is_file() and p.name == "config.json":
                p = p.parent
            local = p if (p / "config.json").is_file() else None
            if local is None and (p.exists() or resolved.startswith((".", "/", "~"))):
                raise ConfigError(f"model {name!r}: no such model directory, config.json or .gguf file")
            return _hf_config(model_cfg, local)
    except ConfigError:
        raise
    except Exception as e:  # OSError / ValueError from transformers
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"model {name!r}: cannot read its config here (local files and the HF cache only): {first[:200]}"
        ) from None
