"""The collection worker end to end on a tiny random Llama with the real tokenizer."""

from __future__ import annotations

import collections
import hashlib
import threading
import time

import numpy as np
import pytest
import torch

from collector.config import load_config
from collector.uploader import UploadFailed
from collector.worker import StopFlag, run_worker
from vaultsh.errors import StoreError
from vaultsh.events import EventSink
from vaultsh.megabatch import read_header, read_megabatch
from vaultsh.run import CommitRecord, Run
from vaultsh.store import LocalStore

from .modelfixtures import TINY_D_MODEL, make_tiny_llama_dir

HOOKS = ["residuals_0", "blocks.1.hook_resid_post", "mlp_2"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


def make_cfg(tiny_dir, uri, **over):
    data = {
        "data_key": "pydoc",
        "n_batches": 6,
        "seq_length": 32,
        "batch_size": 2,
        "seed": 7,
        "clean_added_tokens": True,
    }
    data.update(over.pop("data", {}))
    raw = {
        "run_name": over.pop("run_name", "tiny.pydoc"),
        "num_runs": over.pop("num_runs", 1),
        "transformer_config": {"model_name": str(tiny_dir), "dtype": "float32"},
        "data_config": data,
        "upload_config": {
            "batches_per_upload": over.pop("bpu", 2),
            "hooks": over.pop("hooks", HOOKS),
            "max_queued_megabatches": over.pop("max_queued", 2),
        },
        "storage": {"uri": str(uri), **over.pop("storage", {})},
    }
    assert not over, over
    return load_config(raw)


class Events(list):
    def types(self):
        return [e["type"] for e in self]


def collect(cfg, worker=0, store=None, stop=None, on_event=None):
    events = Events()

    def cb(e):
        events.append(e)
        if on_event:
            on_event(e)

    result = run_worker(cfg, worker, sink=EventSink(worker, callback=cb), stop=stop, store=store)
    return result, events


def all_sequences(store, run, hook):
    """(input_ids, mask, states) of every committed megabatch of `hook`, in commit order."""
    ids, masks, states = [], [], []
    for f in run.committed_files(hook):
        mb = read_megabatch(store, f.key)
        ids.append(mb.input_ids)
        masks.append(mb.mask)
        states.append(mb.states)
    return torch.cat(ids), torch.cat(masks), torch.cat(states)


@pytest.fixture(scope="module")
def single_run(tiny_dir, tmp_path_factory):
    """One complete uninterrupted run, shared by the read-only checks below."""
    root = tmp_path_factory.mktemp("vault")
    cfg = make_cfg(tiny_dir, root)
    result, events = collect(cfg)
    store = LocalStore(root)
    return cfg, store, Run(store, cfg.run_name), result, events


def test_run_commits_every_megabatch_with_metadata(single_run):
    cfg, store, run, result, events = single_run
    assert result["status"] == "complete"
    assert result["batches"] == 6 and result["megabatches"] == 3
    commits = run.iter_commits()
    assert [c.index for c in commits] == [0, 1, 2]
    assert [(c.batch_start, c.batch_end) for c in commits] == [(0, 2), (2, 4), (4, 6)]
    for hook in HOOKS:
        files = run.committed_files(hook)
        assert len(files) == 3
        h = read_header(store, files[0].key)
        assert (h.n_sequences, h.seq_len, h.d_model) == (4, 32, TINY_D_MODEL)
        assert h.hook == hook
        meta = run.read_metadata(hook)
        assert meta["shape"] == [4, 32, TINY_D_MODEL] and meta["batches_per_file"] == 2
        assert meta["d_in"] == TINY_D_MODEL and meta["dtype"] == "torch.float32"
    cfg_json = run.read_cfg()
    assert cfg_json["model"]["n_layers"] == 4 and "residuals_0" in cfg_json["hooks"]
    # Events tell the whole story in order.
    types = events.types()
    assert types[0] == "start" and types[-1] == "done" and types.count("committed") == 3
    assert events[-1]["status"] == "complete"


def test_model_loaded_event_says_size_dtype_and_device(single_run, tiny_dir):
    from transformers import AutoModelForCausalLM

    *_, events = single_run
    loaded = next(e for e in events if e["type"] == "loading" and e["what"] == "data")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype="float32")
    n = sum(p.numel() for p in model.parameters())
    assert (loaded["model_params"], loaded["model_bytes"]) == (n, 4 * n)
    assert (loaded["dtype"], loaded["device"]) == ("float32", "cuda" if torch.cuda.is_available() else "cpu")


def test_commit_records_match_stored_bytes(single_run):
    cfg, store, run, *_ = single_run
    for c in run.iter_commits():
        for _hook, f in c.files.items():
            data = store.get_bytes(f.key)
            assert len(data) == f.size
            assert hashlib.sha256(data).hexdigest() == f.sha256


def test_statistics_equal_numpy_over_stored_files(single_run):
    cfg, store, run, *_ = single_run
    for hook in HOOKS:
        ids, mask, states = all_sequences(store, run, hook)
        x = states.double().reshape(-1, TINY_D_MODEL)[mask.reshape(-1)].numpy()
        stats = run.read_statistics(hook)
        assert stats.count == x.shape[0] == int(mask.sum())
        np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats.std, x.std(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats.mean_norm, np.linalg.norm(x, axis=1).mean(), rtol=1e-6)


def test_stored_states_equal_hidden_states(single_run, tiny_dir):
    """residuals_L == HF hidden_states[L]; resid_post L == hidden_states[L+1]."""
    from transformers import AutoModelForCausalLM

    cfg, store, run, *_ = single_run
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    f0 = run.committed_files("residuals_0")[0]
    f1 = run.committed_files("blocks.1.hook_resid_post")[0]
    mb0, mb1 = read_megabatch(store, f0.key), read_megabatch(store, f1.key)
    attn = (mb0.input_ids != model.config.pad_token_id).long()
    # Rows are right-padded, so the attention mask is a prefix; rebuild it from the stored mask's span.
    with torch.no_grad():
        out = model(input_ids=mb0.input_ids, attention_mask=torch.ones_like(attn), output_hidden_states=True)
    # Compare on the unpadded prefix of each row (padding positions differ only by what they attend to).
    for i in range(mb0.input_ids.shape[0]):
        n = int(attn[i].sum())
        torch.testing.assert_close(mb0.states[i, :n], out.hidden_states[0][i, :n])
        torch.testing.assert_close(mb1.states[i, :n], out.hidden_states[2][i, :n], rtol=1e-4, atol=1e-4)


def test_masks_exclude_padding_and_special_tokens(single_run, tiny_dir):
    from transformers import AutoTokenizer

    cfg, store, run, *_ = single_run
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids, mask, _ = all_sequences(store, run, "residuals_0")
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    assert not mask[torch.isin(ids, special)].any()
    assert mask.any()


def test_deterministic_given_seed(single_run, tiny_dir, tmp_path):
    cfg, store, run, *_ = single_run
    cfg2 = make_cfg(tiny_dir, tmp_path)
    collect(cfg2)
    store2 = LocalStore(tmp_path)
    ids_a, _, states_a = all_sequences(store, run, "mlp_2")
    ids_b, _, states_b = all_sequences(store2, Run(store2, cfg2.run_name), "mlp_2")
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(states_a, states_b)


def test_stop_then_resume_equals_uninterrupted_run(single_run, tiny_dir, tmp_path):
    cfg, store, run, *_ = single_run
    cfg2 = make_cfg(tiny_dir, tmp_path)
    stop = StopFlag()
    result, events = collect(cfg2, stop=stop, on_event=lambda e: stop.set() if e["type"] == "progress" else None)
    assert result["status"] == "stopped"
    assert 1 <= result["megabatches"] < 3
    # the stop is announced once, naming the megabatch it finishes (the last one committed), before "done"
    types = events.types()
    assert types.count("stopping") == 1 and types.index("stopping") < types.index("done")
    stopping = events[types.index("stopping")]
    assert (
        stopping["megabatch"] == result["megabatches"] - 1 and 1 <= stopping["filled"] <= stopping["batches_per_upload"]
    )
    store2 = LocalStore(tmp_path)
    run2 = Run(store2, cfg2.run_name)
    # The stopped run is consistent: every commit's files exist, statistics.json covers the committed tokens.
    first = run2.iter_commits()
    assert run2.read_statistics("mlp_2").count == sum(c.tokens for c in first)
    result2, events2 = collect(cfg2)
    assert "resume" in events2.types()
    assert result2["status"] == "complete" and result2["megabatches"] == 3
    for hook in HOOKS:
        ids_a, _, states_a = all_sequences(store, run, hook)
        ids_b, _, states_b = all_sequences(store2, run2, hook)
        assert torch.equal(ids_a, ids_b), "resumed run differs from the uninterrupted one"
        torch.testing.assert_close(states_a, states_b)
        assert run.read_statistics(hook).count == run2.read_statistics(hook).count
        np.testing.assert_allclose(run.read_statistics(hook).mean, run2.read_statistics(hook).mean, rtol=1e-9)
    # Nothing duplicated: exactly three files per hook.
    assert len(list(store2.iter_objects(f"{cfg2.run_name}/mlp_2/"))) == 3 + 2  # + metadata.json, statistics.json


def test_rerun_of_a_complete_run_adds_nothing(single_run):
    cfg, store, run, *_ = single_run
    before = sorted(o.key for o in store.iter_objects(cfg.run_name + "/"))
    result, events = collect(cfg)
    assert result["status"] == "complete" and result["megabatches"] == 3
    assert sorted(o.key for o in store.iter_objects(cfg.run_name + "/")) == before


def test_changed_config_under_existing_run_is_refused(single_run, tiny_dir):
    from vaultsh.errors import ConfigError

    cfg, store, run, *_ = single_run
    changed = make_cfg(tiny_dir, store.root, data={"seq_length": 16})
    with pytest.raises(ConfigError, match="seq_length: 32 -> 16"):
        collect(changed)


def test_two_workers_union_equals_single_worker(single_run, tiny_dir, tmp_path):
    cfg, store, run, *_ = single_run
    cfg2 = make_cfg(tiny_dir, tmp_path, num_runs=2, bpu=1)
    for w in (0, 1):
        collect(cfg2, worker=w)
    store2 = LocalStore(tmp_path)
    run2 = Run(store2, cfg2.run_name)
    by_batch = {}
    for c in run2.iter_commits():
        mb = read_megabatch(store2, c.files["residuals_0"].key)
        assert c.batch_start % 2 == c.worker  # worker i gets global batches i, i+2, ...
        by_batch[c.batch_start] = mb.input_ids
    assert sorted(by_batch) == list(range(6))
    ids_single, _, _ = all_sequences(store, run, "residuals_0")
    assert torch.equal(torch.cat([by_batch[b] for b in range(6)]), ids_single)
    # Statistics merged across both workers equal the single-worker run's.
    a, b = run.read_statistics("mlp_2"), run2.read_statistics("mlp_2")
    assert a.count == b.count
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6, atol=1e-9)


def test_pt_format_is_activault_readable(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path, storage={"format": "pt"}, data={"n_batches": 5})
    result, events = collect(cfg)
    assert any("dropping the last 1 batch" in e.get("message", "") for e in events)
    store = LocalStore(tmp_path)
    run = Run(store, cfg.run_name)
    files = run.committed_files("residuals_0")
    assert len(files) == 2 and all(f.key.endswith(".saved.pt") for f in files)
    sizes = {store.head(f.key).size for f in files}
    assert len(sizes) == 1  # Activault reads exactly bytes_per_file of every file
    obj = torch.load(store.root / files[0].key, weights_only=True)
    assert set(obj) == {"states", "input_ids", "tensor_bytes"}
    assert obj["states"].shape == (4, 32, TINY_D_MODEL)


class SlowStore(LocalStore):
    """A LocalStore whose megabatch uploads take a while and are counted."""

    def __init__(self, root, delay):
        super().__init__(root)
        self.delay = delay
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def put_stream(self, key, writer):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            return super().put_stream(key, writer)
        finally:
            with self.lock:
                self.active -= 1


def test_slow_store_applies_backpressure(tiny_dir, tmp_path):
    """With a slow store the loop waits: queued uploads never exceed the configured bound."""
    cfg = make_cfg(tiny_dir, tmp_path, bpu=1, max_queued=1, data={"n_batches": 8})
    store = SlowStore(tmp_path, delay=0.3)
    result, events = collect(cfg, store=store)
    assert result["status"] == "complete" and result["megabatches"] == 8
    bound = cfg.upload.max_queued_megabatches * (len(HOOKS) + 1)
    queued = [e["queued"] for e in events if e["type"] == "upload"]
    assert queued and max(queued) <= bound
    assert store.max_active <= bound


class BrokenStore(LocalStore):
    """Every megabatch upload fails with a transient error; `tries` counts the attempts per key."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.tries = collections.Counter()

    def put_stream(self, key, writer):
        self.tries[key] += 1
        raise StoreError(f"cannot reach store for {key}: connection reset", retryable=True)


def test_persistent_upload_failure_fails_the_worker_without_commit(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path, bpu=1)
    store = BrokenStore(tmp_path)
    events = Events()
    with pytest.raises(UploadFailed, match="failed after 4 attempts"):
        run_worker(cfg, 0, sink=EventSink(0, callback=events.append), store=store)
    # Bounded: no key is tried more than the uploader's 4 attempts (a hang is pytest-timeout's to catch).
    assert store.tries and max(store.tries.values()) == 4, store.tries
    assert "error" in events.types() and events[-1]["type"] == "done" and events[-1]["status"] == "failed"
    assert any(e["type"] == "warning" and "retrying" in e["message"] for e in events)
    assert Run(store, cfg.run_name).iter_commits() == []


def test_s3_fault_mid_upload_is_retried(tiny_dir, s3_server, s3_bucket):
    """503s and a connection reset through a real HTTP proxy in front of the S3 server."""
    from vaultsh.store.s3 import S3Store
    from vaultsh.testing.faultproxy import FaultProxy

    with FaultProxy(s3_server) as proxy:
        store = S3Store(s3_bucket, endpoint_url=proxy.url, max_attempts=2)
        # Faults hit megabatch uploads only (the client's and the uploader's retries share the
        # work); then a connection reset mid-body.
        proxy.fail_next(3, method="PUT", mode="503", path_contains=".safetensors")
        proxy.fail_next(1, method="PUT", mode="reset", path_contains=".safetensors")
        cfg = make_cfg(tiny_dir, f"s3://{s3_bucket}", data={"n_batches": 4})
        result, events = collect(cfg, store=store)
        assert proxy.faults_injected == 4
    assert result["status"] == "complete" and result["megabatches"] == 2
    store = S3Store(s3_bucket, endpoint_url=s3_server)
    run = Run(store, cfg.run_name)
    for c in run.iter_commits():
        for f in c.files.values():
            assert hashlib.sha256(store.get_bytes(f.key)).hexdigest() == f.sha256


def test_worker_writes_commit_chunks_that_readers_use(tiny_dir, tmp_path, monkeypatch):
    """Every COMMIT_CHUNK-th commit, the worker stores the last COMMIT_CHUNK records as one chunk."""
    import collector.worker as worker_mod

    monkeypatch.setattr(worker_mod, "COMMIT_CHUNK", 2)
    cfg = make_cfg(tiny_dir, tmp_path)
    result, _ = collect(cfg)
    assert result["megabatches"] == 3
    store = LocalStore(tmp_path)
    run = Run(store, cfg.run_name)
    chunks = [o.key for o in store.iter_objects(run.commit_chunks_prefix())]
    assert chunks == [run.commit_chunk_key(0, 1)]  # records 0-1; record 2 starts the next chunk
    plain = [run.read_commit((c.worker, c.index, run.commit_key(c.worker, c.index))) for c in run.iter_commits()]
    reads: list[str] = []
    real = run.read_commit
    run.read_commit = lambda t: (reads.append(t[2]), real(t))[1]
    assert run.iter_commits() == plain and reads == [run.commit_key(0, 2)]


def test_commit_chunks_skip_a_chunk_a_resumed_worker_started_inside(monkeypatch):
    import collector.worker as worker_mod
    from vaultsh.errors import StoreError

    monkeypatch.setattr(worker_mod, "COMMIT_CHUNK", 4)

    class FakeRun:
        def __init__(self, fail=False):
            self.chunks, self.fail = [], fail

        def write_commit_chunk(self, records):
            if self.fail:
                raise StoreError("S3 could not upload s3://b/r/_vaultsh/commit-chunks/w0000/0000003.json: SlowDown")
            self.chunks.append([r.index for r in records])

    def feed(run, indices, sink=None):
        chunk: list = []
        for i in indices:
            worker_mod.chunk_commits(run, CommitRecord(0, i, i, i + 1, {}), chunk, sink)

    run = FakeRun()
    feed(run, range(10))
    assert run.chunks == [[0, 1, 2, 3], [4, 5, 6, 7]]
    run = FakeRun()
    feed(run, range(5, 12))  # resumed at megabatch 5: 4-7 is incomplete here, 8-11 is whole
    assert run.chunks == [[8, 9, 10, 11]]
    events = []
    feed(FakeRun(fail=True), range(4), sink=EventSink(0, callback=events.append))
    assert [e["type"] for e in events] == ["warning"] and "commit chunk 3" in events[0]["message"]


def test_sites_of_other_widths_store_their_shape_meaning_and_the_self_check(tiny_dir, tmp_path):
    """Per-head, MLP-width and module-path hooks next to residual ones: each file, stats and metadata
    hold the site's own width; TransformerLens hooks record the self-check."""
    from transformers import AutoModelForCausalLM

    from collector.capture import ActivationCapture
    from collector.layers import expand_hooks

    hooks = [
        "blocks.1.attn.hook_z",
        "blocks.1.attn.hook_k",
        "blocks.2.mlp.hook_post",
        "blocks.2.hook_resid_mid",
        "module:model.layers.*.mlp.up_proj",
    ]
    cfg = make_cfg(tiny_dir, tmp_path, hooks=hooks, data={"n_batches": 2})
    result, events = collect(cfg)
    assert result["status"] == "complete"
    store = LocalStore(tmp_path)
    run = Run(store, cfg.run_name)
    d_mlp, heads, kv, d_head = 2 * TINY_D_MODEL, 4, 2, TINY_D_MODEL // 4
    widths = {
        "blocks.1.attn.hook_z": heads * d_head,
        "blocks.1.attn.hook_k": kv * d_head,
        "blocks.2.mlp.hook_post": d_mlp,
        "blocks.2.hook_resid_mid": TINY_D_MODEL,
    }
    widths.update({f"module:model.layers.{i}.mlp.up_proj": d_mlp for i in range(4)})
    assert sorted(run.read_cfg()["hooks"]) == sorted(widths)  # the module glob expanded against the model
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    for hook, w in widths.items():
        meta = run.read_metadata(hook)
        assert meta["d_in"] == w and meta["shape"] == [4, 32, w]
        f = run.committed_files(hook)[0]
        mb = read_megabatch(store, f.key)
        assert mb.states.shape == (4, 32, w)
        assert run.read_statistics(hook).d == w
        if hook.startswith("module:"):
            assert meta["vocabulary"] == "module" and "self_check" not in meta
            continue
        assert meta["vocabulary"] == "transformerlens" and meta["family"] == "llama"
        check = meta["self_check"]
        assert check["block"] == "sequential" and check["layers"] == [1, 2] and check["max_rel_error"] < 1e-5
        # the stored values are the capture's on the same tokens
        with ActivationCapture(model, expand_hooks([hook], 4)) as cap:
            want = cap.run(input_ids=mb.input_ids, attention_mask=(mb.input_ids != model.config.pad_token_id).long())
        real = mb.mask
        torch.testing.assert_close(mb.states[real], want[hook][real], rtol=1e-4, atol=1e-4)
    z = run.read_metadata("blocks.1.attn.hook_z")
    assert z["axes"] == ["batch", "pos", "head", "d_head"] and z["per_token_shape"] == [heads, d_head]
    assert run.read_metadata("blocks.1.attn.hook_k")["per_token_shape"] == [kv, d_head]


def test_a_site_the_family_lacks_stops_before_anything_is_stored(tiny_dir, tmp_path):
    from vaultsh.errors import ConfigError

    cfg = make_cfg(tiny_dir, tmp_path, hooks=["blocks.1.hook_resid_post", "module:model.layers.1.mlp.nothing"])
    with pytest.raises(ConfigError, match=r"'module:model.layers.1.mlp.nothing' names no module .*closest"):
        collect(cfg)
    assert not list(LocalStore(tmp_path).iter_objects(""))


def test_lm_training_dataset_config_collects_and_warns_about_its_tokenizer(tiny_dir, tmp_path):
    import json

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"alpha document {i}"}) + "\n" for i in range(40)))
    raw = {
        "run_name": "lm.form",
        "transformer_config": {"model_name": str(tiny_dir), "dtype": "float32"},
        "data_config": {"n_batches": 2, "batch_size": 2},
        "dataset_config": {
            "datasets": [{"name": "a", "path": str(tmp_path / "a.jsonl"), "text_field": "text"}],
            "tokenizer_name": "gpt2",
            "max_seq_length": 16,
        },
        "upload_config": {"batches_per_upload": 2, "hooks": ["residuals_1"]},
        "storage": {"uri": str(tmp_path / "vault")},
    }
    result, events = collect(load_config(raw))
    assert result["status"] == "complete" and result["megabatches"] == 1
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert any(m.startswith("dataset_config.tokenizer_name: 'gpt2' is not the model's tokenizer") for m in warnings)
    run = Run(LocalStore(tmp_path / "vault"), "lm.form")
    assert (
        json.loads(LocalStore(tmp_path / "vault").get_bytes(run.metadata_key("residuals_1")))["sequence_length"] == 16
    )
