"""Config error messages: one line per problem, naming the field as the user spelled it.

`one_error` turns a pydantic error into ``field: value is not allowed (...)``
with "did you mean" hints for unknown keys; `join_errors` makes the single
`ConfigError` a loader raises (first problem first, with a count of the rest).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from vaultsh.errors import ConfigError


def field_error(msg: str, **ctx: Any) -> PydanticCustomError:
    """A validation error whose message follows the value: '<value> <msg>'."""
    return PydanticCustomError("vaultsh", msg, ctx or None)


def fmt_value(v: Any) -> str:
    if isinstance(v, str):
        s = repr(v)
    elif isinstance(v, bool):
        s = "true" if v else "false"
    elif v is None:
        s = "null"
    elif isinstance(v, (dict, list, tuple)):
        s = repr(v)
    else:
        s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        got = _unwrap_model(arg)
        if got is not None:
            return got
    return None


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        sub = _unwrap_model(field.annotation)
        if sub is None:
            return None
        cls = sub
    return cls


# Top-level sections of the refusal-circuit collector that have no meaning here.
_FOREIGN_SECTIONS = {
    "output": "write storage.uri (or data_config.bucket_name) instead",
    # the LM-training guide's other sections: only its dataset_config / data_mixes concern collection
    "model_config": "describe the model with transformer_config.model_name",
    "train_config": "training settings have no meaning for collection; remove the section",
    "eval_config": "evaluation settings have no meaning for collection; remove the section",
    "wandb_config": "Weights & Biases settings have no meaning for collection; remove the section",
}

# The sections a misplaced key may belong in ({section as written: its model}),
# for "'x' belongs in data_config"; collector/config/forms.py fills it in.
SECTIONS: dict[str, type[BaseModel]] = {}


def _unknown_key_message(root: type[BaseModel], loc: tuple) -> str:
    key = str(loc[-1])
    parent = _model_at(root, loc[:-1])
    allowed = list(parent.model_fields) if parent is not None else []
    where = _loc_str(loc)
    msg = f"{where}: unknown key"
    near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if len(loc) == 1 and key in _FOREIGN_SECTIONS:
        msg += f"; {_FOREIGN_SECTIONS[key]}"
    elif near:
        msg += f"; did you mean {near[0]!r}?"
    else:
        homes = [name for name, sec in SECTIONS.items() if key in sec.model_fields and name != _loc_str(loc[:-1])]
        if homes and len(loc) >= 1:
            msg += f"; {key!r} belongs in {' or '.join(homes)}"
    if allowed:
        msg += f" (allowed: {', '.join(allowed)})"
    return msg


def one_error(root: type[BaseModel], e: Mapping[str, Any]) -> str:
    loc = tuple(e.get("loc", ()))
    path = _loc_str(loc) or "config"
    t = e.get("type", "")
    v = e.get("input")
    ctx = e.get("ctx") or {}
    if t == "extra_forbidden":
        return _unknown_key_message(root, loc)
    if t == "missing":
        return f"{path}: required but missing"
    val = fmt_value(v)
    if t == "vaultsh":
        return f"{path}: {val} {e.get('msg', '')}"
    if t in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[t]
        bound = ctx.get(
            {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}[t]
        )
        return f"{path}: {val} is not allowed (must be {op} {bound})"
    if t == "literal_error":
        return f"{path}: {val} is not allowed (must be one of {ctx.get('expected', '')})"
    if t in ("int_parsing", "int_type"):
        return f"{path}: {val} is not an integer"
    if t == "int_from_float":
        return f"{path}: {val} is not a whole number"
    if t in ("bool_parsing", "bool_type"):
        return f"{path}: {val} is not a boolean (write true or false)"
    if t == "string_type":
        return f"{path}: {val} is not a string (quote it in YAML)"
    if t == "too_short":
        return f"{path}: {val} is not allowed (must not be empty)"
    if t == "list_type":
        return f"{path}: {val} is not a list (write a YAML list, e.g. [a, b])"
    if t in ("dict_type", "model_type", "model_attributes_type"):
        sub = _model_at(root, loc)
        keys = f" with keys {', '.join(sub.model_fields)}" if sub is not None else ""
        return f"{path}: {val} is not a mapping (expected a section{keys})"
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{path}: {val}: {msg}"


def join_errors(source: str, messages: list[str]) -> ConfigError:
    first = f"{source}: {messages[0]}"
    if len(messages) > 1:
        first += f" (and {len(messages) - 1} more)"
        rest = "".join(f"\n  {source}: {m}" for m in messages[1:])
        return ConfigError(first + rest)
    return ConfigError(first)


def validation_error(source: str, root: type[BaseModel], exc: ValidationError) -> ConfigError:
    return join_errors(source, [one_error(root, e) for e in exc.errors()])
