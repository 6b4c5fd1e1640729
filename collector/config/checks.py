"""Checks of a loaded config against its environment: the model's facts and installed packages.

`validate_against_model` checks context length and hook layers against
`ModelFacts` (collector/config/model_facts.py) and resolves the hooks;
`check_model_packages` refuses model options whose optional package is missing.
"""

from __future__ import annotations

from typing import Any

from collector.config.errors import fmt_value, join_errors
from collector.config.model_facts import ModelFacts
from collector.config.schema import CollectConfig, ModelConfig
from collector.layers import HookSpec, expand_hooks
from vaultsh.errors import ConfigError

# --------------------------------------------------------------------------- #
# Optional packages a model option needs
# --------------------------------------------------------------------------- #

# kwarg -> (does this value need the package?, module to import, what to pip install)
_KWARG_PACKAGES: dict[str, tuple[Any, str, str]] = {
    "load_in_8bit": (bool, "bitsandbytes", "bitsandbytes"),
    "load_in_4bit": (bool, "bitsandbytes", "bitsandbytes"),
    "attn_implementation": (lambda v: v == "flash_attention_2", "flash_attn", "flash-attn"),
    "device_map": (lambda v: v is not None, "accelerate", "accelerate"),
}


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(model: ModelConfig, section: str = "transformer_config") -> list[str]:
    """One message per `kwargs` option whose package is not installed (nothing is imported)."""
    kwargs = getattr(model, "kwargs", None) or {}
    problems = []
    for key, (needs, module, pip_name) in _KWARG_PACKAGES.items():
        value = kwargs.get(key)
        if key in kwargs and needs(value) and not _installed(module):
            problems.append(
                f"{section}.kwargs.{key}: {fmt_value(value)} needs the package {module}, "
                f"which is not installed (pip install {pip_name}, or remove the option)"
            )
    return problems


def check_model_packages(cfg: CollectConfig) -> None:
    """Refuse, before any worker starts, model options whose optional package is missing."""
    problems = missing_packages(cfg.model, cfg.field_label("model"))
    if problems:
        raise join_errors(cfg.source, problems)


# --------------------------------------------------------------------------- #
# Config x model
# --------------------------------------------------------------------------- #


def validate_against_model(cfg: CollectConfig, facts: ModelFacts) -> list[HookSpec]:
    """Check `cfg` against the model's facts; return the resolved hooks.

    Errors: seq_length beyond the model's context, unknown hook names,
    layer numbers beyond the model's layer count (naming the closest valid).
    """
    errors: list[str] = []
    if facts.max_context is not None and cfg.data.seq_length > facts.max_context:
        errors.append(
            f"{cfg.field_label('data.seq_length')}: {cfg.data.seq_length} exceeds the model's context "
            f"of {facts.max_context}"
        )
    specs: list[HookSpec] = []
    try:
        fields = {h: cfg.hook_field(h) for h in cfg.upload.hooks}
        specs = expand_hooks(cfg.upload.hooks, facts.n_layers, fields)
    except ConfigError as e:
        errors.append(str(e))
    if errors:
        raise join_errors(cfg.source, errors)
    return specs
