"""The input forms of a config and their migration to `CollectConfig`: `load_config`.

Activault's schema, the refusal-circuit collector's `model:` section, the
LM-training guide's `dataset_config:`/`data_mixes:` blocks and our own
normalised form (the module docstring of `collector.config` shows them) are
validated first as written, so errors carry the user's spelling, then mapped
onto the normalised schema (collector/config/schema.py).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError

from collector.config.datacheck import check_data_section
from collector.config.errors import SECTIONS, fmt_value, join_errors, one_error, validation_error
from collector.config.paths import resolve_storage_uri
from collector.config.schema import (
    CollectConfig,
    DataConfig,
    DatasetEntry,
    Device,
    DType,
    InferenceConfig,
    MemorySize,
    ModelConfig,
    NonEmptyStr,
    PosInt,
    RunName,
    SlurmConfig,
    StorageConfig,
    StorageDType,
    StrictModel,
    UploadConfig,
    Uri,
    no_bool,
)
from collector.layers import check_hook_syntax
from vaultsh.errors import ConfigError

# --------------------------------------------------------------------------- #
# Input forms (validated first, so errors carry the user's spelling)
# --------------------------------------------------------------------------- #

_HookList = Annotated[list[str], Field(min_length=0)]


class _TransformerConfigIn(StrictModel):
    model_name: NonEmptyStr
    dtype: DType = "float16"
    device: Device = "auto"
    cache_dir: str | None = None
    max_per_device_memory: MemorySize = None
    trust_remote_code: bool | None = None
    kwargs: dict[str, Any] | None = None


class _ModelSectionIn(StrictModel):
    name: NonEmptyStr
    dtype: DType | None = None
    torch_dtype: DType | None = None
    device: Device = "auto"
    cache_dir: str | None = None
    max_per_device_memory: MemorySize = None
    trust_remote_code: bool | None = None
    kwargs: dict[str, Any] | None = None
    activation_layers: _HookList | None = None


class _UploadIn(StrictModel):
    batches_per_upload: PosInt = 8
    hooks: _HookList | None = None
    upload_workers: PosInt = 4
    max_queued_megabatches: PosInt = 2


def _storage_shorthand(v: Any) -> Any:
    return {"uri": v} if isinstance(v, str) else v


class _StorageIn(StrictModel):
    uri: Uri | None = None
    format: Literal["safetensors", "pt"] = "safetensors"
    dtype: StorageDType | None = None


class _DatasetConfigIn(StrictModel):
    """The LM-training config guide's `dataset_config:` block: the datasets, tokenizer and length."""

    datasets: Annotated[list[DatasetEntry], Field(min_length=1)]
    tokenizer_name: NonEmptyStr | None = None
    max_seq_length: Annotated[int, BeforeValidator(no_bool), Field(ge=2)] | None = None


class _MixIn(StrictModel):
    """One named mix of the LM-training guide's `data_mixes:` block."""

    name: str | None = None
    datasets: Annotated[list[DatasetEntry], Field(min_length=1)]


class _RawConfig(StrictModel):
    run_name: RunName
    num_runs: PosInt = 1
    transformer_config: _TransformerConfigIn | None = None
    model: _ModelSectionIn | None = None
    data_config: DataConfig | None = None
    data: DataConfig | None = None
    dataset_config: _DatasetConfigIn | None = None
    data_mixes: dict[str, _MixIn] | None = None
    upload_config: _UploadIn | None = None
    upload: _UploadIn | None = None
    storage: Annotated[_StorageIn | None, BeforeValidator(_storage_shorthand)] = None
    activation_layers: _HookList | None = None
    inference: InferenceConfig | None = None
    plan: dict[str, Any] | None = None  # prices etc. for `vaultsh plan`; the collector ignores it
    slurm: SlurmConfig | None = None


# Keys that belong somewhere else (for "did you mean" across sections).
SECTIONS.update(
    {
        "transformer_config": _TransformerConfigIn,
        "model": _ModelSectionIn,
        "data_config": DataConfig,
        "upload_config": _UploadIn,
        "storage": _StorageIn,
        "inference": InferenceConfig,
        "slurm": SlurmConfig,
    }
)

# kwargs that collide with fields: the loader passes these itself.
_KWARGS_OWNED = {
    "torch_dtype": "dtype",
    "dtype": "dtype",
    "cache_dir": "cache_dir",
    "max_memory": "max_per_device_memory",
}


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
        raise ConfigError(
            f"{label}: the file is empty (expected run_name, transformer_config, data_config, upload_config)"
        )
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


def _inline_mix(mixes: dict[str, _MixIn], chosen: str | None, label: str) -> tuple[str | None, str, list]:
    """(error or None, where the datasets were written, entries) of the top-level `data_mixes:` block."""
    names = ", ".join(mixes) or "none"
    if chosen is None and len(mixes) != 1:
        return f"data_mixes: holds {len(mixes)} mixes ({names}); pick one with {label}.mix", "data_mixes", []
    name = chosen if chosen is not None else next(iter(mixes))
    if name not in mixes:
        return f"{label}.mix: {name!r} is not in data_mixes (available: {names})", "data_mixes", []
    return None, f"data_mixes.{name}.datasets", mixes[name].datasets


def _lm_training_datasets(
    raw: _RawConfig, data_cfg: DataConfig, fields: dict[str, str]
) -> tuple[list[str], DataConfig]:
    """The LM-training guide's `dataset_config:` / `data_mixes:` blocks as `data_config.datasets`."""
    label = fields["data"]
    picked: list[tuple[str, list]] = []
    errors: list[str] = []
    update: dict[str, Any] = {}
    if raw.dataset_config is not None:
        picked.append(("dataset_config.datasets", raw.dataset_config.datasets))
        n = raw.dataset_config.max_seq_length
        if n is not None and n != data_cfg.seq_length:
            errors.append(
                f"dataset_config.max_seq_length: {n} contradicts {label}.seq_length "
                f"{data_cfg.seq_length}; write one of them"
            )
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


def _same_source(a: str, b: str, base_dir: Path | None) -> bool:
    """Whether two model/tokenizer names mean the same thing (equal, or the same local directory)."""
    if a.strip() == b.strip():
        return True
    paths = [
        Path(x).expanduser() if Path(x).expanduser().is_absolute() or base_dir is None else base_dir / x for x in (a, b)
    ]
    return all(p.exists() for p in paths) and paths[0].resolve() == paths[1].resolve()


def _tokenizer_warning(raw: _RawConfig, model_name: str, base_dir: Path | None) -> str | None:
    tok = raw.dataset_config.tokenizer_name if raw.dataset_config is not None else None
    if tok is None or _same_source(tok, model_name, base_dir):
        return None
    return (
        f"dataset_config.tokenizer_name: {tok!r} is not the model's tokenizer ({model_name!r}); "
        "the text is tokenized with the model's own tokenizer"
    )


def _model_section(given: _TransformerConfigIn | _ModelSectionIn, name: str, dtype: str) -> dict[str, Any]:
    """The normalised model section from either input form: the fields it spells as ModelConfig does, as given,
    then the name and the dtype (the forms spell them differently) and a copy of the kwargs ({} when not given)."""
    alike = ModelConfig.model_fields.keys() & type(given).model_fields.keys()
    loading = given.model_dump(include=alike, exclude={"kwargs"})
    return {**loading, "name": name, "dtype": dtype, "kwargs": dict(given.kwargs or {})}


def load_config(source: str | os.PathLike | Mapping[str, Any], *, name: str | None = None) -> CollectConfig:
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
            f"{label}: the top level is {fmt_value(data)}, not a mapping "
            "(expected run_name, transformer_config, data_config, upload_config)"
        )
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{label}: key {fmt_value(bad_keys[0])} is not a string")

    _inference_batch_size_into_data(data)
    seq_from_dataset_config = _seq_length_from_dataset_config(data)
    try:
        raw = _RawConfig.model_validate(data)
    except ValidationError as e:
        raise validation_error(label, _RawConfig, e) from None
    base_dir = Path(os.fspath(source)).expanduser().resolve().parent if not isinstance(source, Mapping) else None

    errors: list[str] = []
    fields: dict[str, str] = {}

    # ---- model --------------------------------------------------------------
    model: dict[str, Any] | None = None
    model_section = None
    if raw.transformer_config is not None and raw.model is not None:
        errors.append("transformer_config and model both describe the model; keep one")
    elif raw.transformer_config is not None:
        tc = raw.transformer_config
        model_section = "transformer_config"
        fields.update({"model": "transformer_config", "model.name": "transformer_config.model_name"})
        model = _model_section(tc, tc.model_name, tc.dtype)
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
        model = _model_section(m, m.name, dtype or "float16")
    else:
        errors.append("the model is missing: write transformer_config.model_name (or model.name)")

    if model is not None:
        kw = model["kwargs"]
        if "trust_remote_code" in kw:
            val = kw.pop("trust_remote_code")
            if not isinstance(val, bool):
                errors.append(
                    f"{model_section}.kwargs.trust_remote_code: {fmt_value(val)} is not a boolean (write true or false)"
                )
            elif model["trust_remote_code"] is not None and model["trust_remote_code"] != val:
                errors.append(
                    f"{model_section}.kwargs.trust_remote_code: {fmt_value(val)} contradicts "
                    f"{model_section}.trust_remote_code; write one of them"
                )
            else:
                model["trust_remote_code"] = val
        for k, owner in _KWARGS_OWNED.items():
            if k in kw:
                errors.append(f"{model_section}.kwargs.{k}: is set by vaultsh; write {model_section}.{owner} instead")
        if model["trust_remote_code"] is None:
            model["trust_remote_code"] = False

    # ---- data ---------------------------------------------------------------
    data_cfg: DataConfig | None = None
    if raw.data_config is not None and raw.data is not None:
        errors.append("data_config and data are both given; keep one")
    elif raw.data_config is not None:
        data_cfg = raw.data_config
        fields["data"] = "data_config"
    elif raw.data is not None:
        data_cfg = raw.data
        fields["data"] = "data"
    elif raw.dataset_config is not None or raw.data_mixes is not None:
        errors.append(
            "data_config: required but missing (n_batches and batch_size; the datasets come from "
            f"{'dataset_config' if raw.dataset_config is not None else 'data_mixes'})"
        )
    else:
        errors.append("data_config: required but missing (data_key, n_batches, seq_length, batch_size)")
    if data_cfg is not None:
        if seq_from_dataset_config:
            fields["data.seq_length"] = "dataset_config.max_seq_length"
        lm_errors, data_cfg = _lm_training_datasets(raw, data_cfg, fields)
        errors.extend(lm_errors)

    # ---- upload + hooks -----------------------------------------------------
    upload_in: _UploadIn | None = None
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
    sources: list[tuple[str, list[str] | None]] = [
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
        fmt = raw.storage.format if raw.storage is not None else "safetensors"
        data_errors, data_cfg = check_data_section(
            data_cfg, fields["data"], base_dir, inference, fmt, datasets_label=fields.get("data.datasets")
        )
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
    fields["storage"] = "storage"
    uri, uri_field, uri_error = resolve_storage_uri(
        st.uri, data_cfg.bucket_name if data_cfg is not None else None, fields.get("data", "data_config")
    )
    if uri_field is not None:
        fields["storage.uri"] = uri_field
    if uri_error is not None:
        errors.append(uri_error)

    if errors:
        raise join_errors(label, errors)
    assert data_cfg is not None and uri is not None  # without either there was an error above

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
        msgs = [one_error(CollectConfig, err) for err in e.errors()]
        raise join_errors(label, msgs) from None
    cfg.set_origin(label, fields, hook_fields, [w for w in (_tokenizer_warning(raw, cfg.model.name, base_dir),) if w])
    return cfg
