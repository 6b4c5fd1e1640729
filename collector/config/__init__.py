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
    (see collector/config/forms.py and docs/data.md).

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

Layout (each file one job; this package re-exports the public names):

- ``schema.py``: the normalised config (`CollectConfig` and its sections);
- ``forms.py``: the input forms above and their migration (`load_config`);
- ``datacheck.py``: checks of the data section (sources, mixes, labels, shaping);
- ``paths.py``: store URIs and where the data goes;
- ``errors.py``: error messages naming the field as written;
- ``model_facts.py``: `ModelFacts` from a model's config or GGUF header (shared with `vaultsh plan`);
- ``checks.py``: a loaded config against the model's facts and the installed packages.
"""

from __future__ import annotations

from collector.config.checks import check_model_packages, missing_packages, validate_against_model
from collector.config.errors import fmt_value, join_errors, one_error
from collector.config.forms import load_config
from collector.config.model_facts import (
    ModelFacts,
    int_attr,
    locate_gguf,
    read_gguf_header,
    read_gguf_metadata,
    read_model_facts,
    resolve_pkg,
    text_config,
)
from collector.config.paths import DEFAULT_STORE, STORE_ENV, resolve_storage_uri, storage_uri_for_bucket
from collector.config.schema import (
    CollectConfig,
    DataConfig,
    DatasetEntry,
    InferenceConfig,
    ModelConfig,
    SlurmConfig,
    StorageConfig,
    UploadConfig,
)

__all__ = [
    "CollectConfig",
    "ModelConfig",
    "DataConfig",
    "DatasetEntry",
    "InferenceConfig",
    "UploadConfig",
    "StorageConfig",
    "SlurmConfig",
    "ModelFacts",
    "load_config",
    "read_model_facts",
    "validate_against_model",
    "check_model_packages",
    "missing_packages",
    "storage_uri_for_bucket",
    "resolve_storage_uri",
    "locate_gguf",
    "resolve_pkg",
    "read_gguf_header",
    "read_gguf_metadata",
    "int_attr",
    "text_config",
    "fmt_value",
    "one_error",
    "join_errors",
    "STORE_ENV",
    "DEFAULT_STORE",
]
