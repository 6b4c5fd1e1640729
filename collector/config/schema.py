"""The normalised, validated config: `CollectConfig` and its sections (pydantic models).

Field types carry their own checks (positive ints that refuse booleans, dtype
aliases, devices, memory sizes, run names, store URIs), so a validation error
names the field and the allowed values. The input forms that load into these
models are in collector/config/forms.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr

from collector.config.errors import field_error
from collector.config.paths import DEFAULT_STORE, check_bucket_name, check_uri
from vaultsh.dtypes import float_name

# --------------------------------------------------------------------------- #
# Field types
# --------------------------------------------------------------------------- #


def no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise field_error("is not an integer (write a number)")
    return v


_MODEL_DTYPES = ("float16", "bfloat16", "float32")  # what DType and StorageDType below allow (besides "auto")


def _dtype_alias(v: Any) -> Any:
    """A spelling of an allowed dtype ("bf16", "torch.half", "FP32") as its name; anything else as written."""
    if isinstance(v, str):
        key = v.strip().lower()
        if key == "auto":
            return key
        name = float_name(key)
        return name if name in _MODEL_DTYPES else v
    return v


def _check_run_name(v: str) -> str:
    s = v.strip()
    if not s:
        raise field_error("is not allowed (run_name must not be empty)")
    if "/" in s or "\\" in s:
        raise field_error("is not allowed (run_name is a directory name: no '/' or '\\')")
    if ".." in s:
        raise field_error("is not allowed (run_name is a directory name: no '..')")
    if s == "." or s.startswith("."):
        raise field_error("is not allowed (run_name must not start with '.')")
    if any(ord(c) < 32 or c == "\x7f" for c in s):
        raise field_error("is not allowed (run_name must not contain control characters)")
    if s != v:
        raise field_error("is not allowed (run_name must not start or end with spaces)")
    return s


_DEVICE_RX = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _check_device(v: str) -> str:
    s = v.strip().lower()
    if not _DEVICE_RX.match(s):
        raise field_error("is not allowed (must be 'auto', 'cuda', 'cpu' or 'cuda:N')")
    return s


_MEM_RX = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)
_MEM_UNITS = {u.upper(): u for u in ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")}


def _check_memory(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, str):
        raise field_error("is not a memory size (write e.g. '55GB', '80GiB' or '500MB')")
    m = _MEM_RX.match(v)
    if not m or float(m.group(1)) <= 0:
        raise field_error("is not a memory size (write e.g. '55GB', '80GiB' or '500MB')")
    return f"{m.group(1)}{_MEM_UNITS[m.group(2).upper()]}"


def _check_nonempty(v: str) -> str:
    if not v.strip():
        raise field_error("is not allowed (must not be empty)")
    return v.strip()


PosInt = Annotated[int, BeforeValidator(no_bool), Field(ge=1)]
NonNegInt = Annotated[int, BeforeValidator(no_bool), Field(ge=0)]
AnyInt = Annotated[int, BeforeValidator(no_bool)]
NonEmptyStr = Annotated[str, AfterValidator(_check_nonempty)]
RunName = Annotated[str, AfterValidator(_check_run_name)]
DType = Annotated[Literal["float16", "bfloat16", "float32", "auto"], BeforeValidator(_dtype_alias)]
StorageDType = Annotated[Literal["float16", "bfloat16", "float32"], BeforeValidator(_dtype_alias)]
Device = Annotated[str, AfterValidator(_check_device)]
MemorySize = Annotated[str | None, BeforeValidator(_check_memory)]
Uri = Annotated[str, AfterValidator(check_uri)]
BucketName = Annotated[str | None, AfterValidator(check_bucket_name)]


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


# --------------------------------------------------------------------------- #
# The normalised config
# --------------------------------------------------------------------------- #


class ModelConfig(StrictModel):
    """Which model, how to load it. `kwargs` go to `from_pretrained` unchanged."""

    name: NonEmptyStr
    dtype: DType = "float16"
    device: Device = "auto"
    cache_dir: str | None = None
    max_per_device_memory: MemorySize = None
    trust_remote_code: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict)


def _check_sample(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise field_error("is not a number (write a count such as 500 or a fraction such as 0.25)")
    if isinstance(v, float) and v.is_integer() and v > 1:
        v = int(v)
    if isinstance(v, int):
        if v < 1:
            raise field_error("is not allowed (a count must be >= 1)")
        return v
    if not 0 < v <= 1:
        raise field_error("is not allowed (a fraction must be in (0, 1]; a count must be a whole number)")
    return v


LocalFormat = Literal["json", "jsonl", "csv", "text", "parquet"]
Weight = Annotated[float, BeforeValidator(no_bool), Field(gt=0)]


class DatasetEntry(StrictModel):
    """One entry of `data.datasets` (the LM-training `dataset_config` form).

    Exactly one of `text_field` / `text_template` (checked in `load_config`).
    `path` is a Hugging Face hub id or a local file/directory; `format` forces
    a local file format (otherwise inferred from the file name).
    """

    name: NonEmptyStr
    path: NonEmptyStr
    subset: str | None = None
    split: str = "train"
    streaming: bool = False
    weight: Weight = 1.0
    text_field: str | None = None
    text_template: str | None = None
    format: LocalFormat | None = None
    chat: bool | None = None


class DataConfig(StrictModel):
    """Activault's `data_config`, field for field, plus data sources and input shaping.

    Exactly one source: `data_key` (registry/file/hub key), `datasets` (weighted
    list), `data_mixes` + `mix` (a named mix in a file) or `path` (labelled
    collection). See docs/data.md.
    """

    data_key: NonEmptyStr | None = None
    n_batches: PosInt
    seq_length: Annotated[int, BeforeValidator(no_bool), Field(ge=2)]
    batch_size: PosInt
    seed: AnyInt = 42
    skip_cache: bool = False
    start_batch: NonNegInt = 0
    clean_added_tokens: bool = False
    clean_default_system_prompt: bool = False
    bucket_name: BucketName = None
    # sources other than data_key
    datasets: list[DatasetEntry] | None = None
    data_mixes: NonEmptyStr | None = None
    mix: NonEmptyStr | None = None
    stopping_strategy: Literal["first_exhausted", "all_exhausted"] = "first_exhausted"
    path: NonEmptyStr | None = None
    subset: str | None = None
    split: str = "train"
    text_field: str | None = None
    text_template: str | None = None
    chat: bool | None = None
    # labelled collection
    categories: list[str] = Field(default_factory=list)
    category_field: NonEmptyStr | None = None
    category_balance_strategy: Literal["use_all", "equalize"] = "use_all"
    label_columns: list[str] = Field(default_factory=list)
    # input shaping
    shuffle: bool = True
    filter: str | None = None
    sample: Annotated[int | float | None, BeforeValidator(_check_sample)] = None
    max_samples: PosInt | None = None
    sort_by_length: bool = False
    reversed: bool = False
    packing: bool = False
    # feed the exact sequences of an earlier run (collector/reuse.py)
    reuse_sequences_from: NonEmptyStr | None = None


class InferenceConfig(StrictModel):
    """The refusal-circuit collector's `inference:` section: generation and batch sizing."""

    batch_size: PosInt | None = None
    max_new_tokens: NonNegInt = 0
    save_activations: bool = True
    auto_find_batch_size: bool = False
    do_sample: bool = False
    temperature: Annotated[float, BeforeValidator(no_bool), Field(gt=0)] = 1.0
    top_p: Annotated[float, BeforeValidator(no_bool), Field(gt=0, le=1)] = 1.0


class UploadConfig(StrictModel):
    """Activault's `upload_config` plus the upload queue's knobs.

    `hooks` are kept as written (expansions such as `all` are resolved by
    `validate_against_model`, which knows the layer count).
    """

    batches_per_upload: PosInt = 8
    hooks: Annotated[list[str], Field(min_length=1)]
    upload_workers: PosInt = 4
    max_queued_megabatches: PosInt = 2


class StorageConfig(StrictModel):
    """Where and how megabatches are written."""

    uri: Uri = DEFAULT_STORE
    format: Literal["safetensors", "pt"] = "safetensors"
    dtype: StorageDType | None = None


class SlurmConfig(StrictModel):
    """`slurm:` defaults for `vaultsh launch slurm` (its flags override them); the collector ignores it.

    Values are checked for Slurm syntax by the launcher (vaultsh/launch/slurm.py).
    """

    partition: NonEmptyStr | None = None
    account: NonEmptyStr | None = None
    qos: NonEmptyStr | None = None
    constraint: NonEmptyStr | None = None
    time: NonEmptyStr | None = None
    gpus: NonNegInt | None = None
    cpus: PosInt | None = None
    mem: NonEmptyStr | None = None
    sbatch: list[NonEmptyStr] = Field(default_factory=list)  # more #SBATCH options, e.g. "--exclusive"
    setup: NonEmptyStr | None = None  # one shell line before the worker: module load ..., source venv/bin/activate


class CollectConfig(StrictModel):
    """A validated collection config (see the module docstring for the input forms)."""

    run_name: RunName
    num_runs: PosInt = 1
    model: ModelConfig
    data: DataConfig
    upload: UploadConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    slurm: SlurmConfig | None = None

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

    def set_origin(self, source: str, fields: dict[str, str], hook_fields: dict[str, str], warnings: list[str]) -> None:
        """Where this config came from and how the user spelled its fields and hooks (`forms` sets it on loading)."""
        self._source = source
        self._fields = fields
        self._hook_fields = hook_fields
        self._warnings = warnings

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
