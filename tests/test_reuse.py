"""`data.reuse_sequences_from`: a second model fed exactly the first run's stored sequences."""

from __future__ import annotations

import pytest
import torch

from collector.config import load_config
from collector.worker import run_worker
from vaultsh import megabatch as mbf
from vaultsh.errors import ConfigError, UserError
from vaultsh.events import EventSink
from vaultsh.run import Run
from vaultsh.store import LocalStore

from .familyfixtures import build_or_skip, tokenizer

HOOKS = ["residuals_1", "mlp_1"]
DATA = {"n_batches": 10, "seq_length": 24, "batch_size": 2, "seed": 11, "clean_added_tokens": True}
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Documents of many lengths: some rows are padded, some cut at seq_length."""
    import json
    import random

    rng = random.Random(5)
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))}) for _ in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny random Qwen2 (another family than the tiny Llama) with the same real tokenizer."""
    tok = tokenizer()
    model = build_or_skip("qwen2", len(tok), seed=4)
    d = tmp_path_factory.mktemp("qwen") / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def raw_cfg(model_dir, uri, name, **data):
    return {
        "run_name": name,
        "num_runs": 2,
        "transformer_config": {"model_name": str(model_dir), "dtype": "float32"},
        "data_config": data,
        "upload_config": {"batches_per_upload": 2, "hooks": HOOKS},
        "storage": {"uri": str(uri)},
    }


def collect_all(raw) -> Run:
    cfg = load_config(raw)
    for w in range(cfg.num_runs):
        assert run_worker(cfg, w, sink=EventSink(w))["status"] == "complete"
    store = LocalStore(raw["storage"]["uri"])
    return Run(store, cfg.run_name)


@pytest.fixture(scope="module")
def first(tiny_dir, tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("vault")
    return collect_all(raw_cfg(tiny_dir, root, "llama.docs", data_key=str(docs), **DATA))


def _reuse_data(first_run, **extra):
    d = {k: DATA[k] for k in ("n_batches", "seq_length", "batch_size")}
    return {**d, "reuse_sequences_from": first_run.uri, **extra}


def _files(run, hook):
    return {(f.worker, f.index): f for f in run.committed_files(hook)}


def _first_attention(first_run, worker):
    """The attention masks the first run fed, batch by batch (its own BatchStream, not the stored files)."""
    from collector.data import BatchStream
    from collector.model import load_model_and_tokenizer

    cfg = load_config(first_run.read_cfg()["config"])
    _, tok, _ = load_model_and_tokenizer(cfg.model)
    return {b.index: b.attention_mask for b in BatchStream(cfg.data, tok, worker=worker, num_workers=cfg.num_runs)}


def test_second_model_stores_the_first_runs_sequences_file_by_file(first, qwen_dir, tmp_path):
    from collector.model import load_model_and_tokenizer

    raw = raw_cfg(qwen_dir, tmp_path / "b", "qwen.reuse", **_reuse_data(first))
    second = collect_all(raw)
    model, _, _ = load_model_and_tokenizer(load_config(raw).model)
    padded = 0
    for hook in HOOKS:
        a, b = _files(first, hook), _files(second, hook)
        assert sorted(a) == sorted(b) and len(a) >= 4
        for k in a:
            ma = mbf.read_megabatch(first.store, a[k].key)
            mb = mbf.read_megabatch(second.store, b[k].key)
            assert b[k].name == a[k].name
            assert torch.equal(mb.input_ids, ma.input_ids), f"{b[k].key}: other sequences than {a[k].key}"
            assert torch.equal(mb.mask, ma.mask)
            assert torch.equal(mb.source, ma.source)
            for key in ("batch_start", "batch_end", "worker", "megabatch"):
                assert mb.header.metadata[key] == ma.header.metadata[key]
            assert not torch.allclose(mb.states, ma.states, atol=1e-2)  # a different model
            if hook != "residuals_1":
                continue
            # independent: the second model on the first run's tokens with the first run's own attention masks
            att_of = _first_attention(first, k[0])
            c = first.iter_commits(worker=k[0])[k[1]]
            att = torch.cat([att_of[i] for i in range(c.batch_start, c.batch_end, 2)])
            padded += int((att == 0).any(dim=1).sum())
            with torch.inference_mode():
                want = model(input_ids=ma.input_ids, attention_mask=att, output_hidden_states=True).hidden_states[1]
            assert torch.allclose(mb.states, want, atol=1e-5, rtol=1e-5), b[k].key
    assert padded > 0  # the check covered padded rows
    assert second.read_metadata(HOOKS[0])["sources"] == first.read_metadata(HOOKS[0])["sources"]


def test_resumed_reuse_run_continues_at_the_same_files(first, qwen_dir, tmp_path, monkeypatch):
    from collector.worker import StopFlag, Worker

    raw = raw_cfg(qwen_dir, tmp_path / "b", "qwen.reuse", **_reuse_data(first))
    cfg = load_config(raw)
    stop = StopFlag()
    flush = Worker._flush

    def flush_then_stop(self, mb):  # a stop asked as the first megabatch is queued: deterministic under load
        flush(self, mb)
        stop.set()

    with monkeypatch.context() as m:
        m.setattr(Worker, "_flush", flush_then_stop)
        r = run_worker(cfg, 1, sink=EventSink(1), stop=stop)
    assert r["status"] == "stopped" and r["megabatches"] == 1 < len(first.committed_indices(1))
    assert run_worker(cfg, 1, sink=EventSink(1))["status"] == "complete"
    run = Run(LocalStore(tmp_path / "b"), "qwen.reuse")
    a = _files(first, HOOKS[0])
    b = _files(run, HOOKS[0])
    assert sorted(b) == sorted(k for k in a if k[0] == 1)
    for k in b:
        ma, mb = (mbf.read_megabatch(r.store, f[k].key) for r, f in ((first, a), (run, b)))
        assert torch.equal(mb.input_ids, ma.input_ids) and torch.equal(mb.source, ma.source)


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def test_a_different_tokenizer_is_refused(first, tmp_path):
    tok = tokenizer()
    tok.add_tokens(["<zebra-token>"])  # one more token: another vocabulary
    model = build_or_skip("qwen2", len(tok), seed=4)
    d = tmp_path / "other"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg = load_config(raw_cfg(d, tmp_path / "b", "qwen.other", **_reuse_data(first)))
    with pytest.raises(UserError, match=r"was tokenized with a different tokenizer \(vocabulary fingerprint"):
        run_worker(cfg, 0, sink=EventSink(0))
    assert _tree(tmp_path / "b" / "qwen.other") == []  # nothing stored


def test_a_missing_or_incomplete_first_run_is_refused(first, qwen_dir, tmp_path):
    cfg = load_config(
        raw_cfg(
            qwen_dir, tmp_path / "b", "q1", **_reuse_data(first) | {"reuse_sequences_from": str(tmp_path / "nowhere")}
        )
    )
    with pytest.raises(UserError, match=r"data.reuse_sequences_from: .*nowhere: no such directory"):
        run_worker(cfg, 0, sink=EventSink(0))
    # this run asks for more batches than the first stored
    cfg = load_config(raw_cfg(qwen_dir, tmp_path / "b", "q2", **_reuse_data(first, n_batches=14)))
    with pytest.raises(
        UserError, match=r"incomplete: worker 0 committed global batches up to 8, this run needs up to 12"
    ):
        run_worker(cfg, 0, sink=EventSink(0))
    cfg = load_config(raw_cfg(qwen_dir, tmp_path / "b", "q3", **_reuse_data(first) | {"batch_size": 4}))
    with pytest.raises(ConfigError, match=r"data.batch_size is 2 there and 4 here"):
        run_worker(cfg, 0, sink=EventSink(0))
    assert _tree(tmp_path / "b") == []


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"packing": True}, r"data_config.packing: does not apply with data_config.reuse_sequences_from"),
        ({"data_key": "pydoc"}, r"give one data source, not data_key and reuse_sequences_from"),
    ],
)
def test_config_refuses_shaping_fields_with_reuse(qwen_dir, tmp_path, extra, message):
    reuse = dict(n_batches=4, seq_length=8, batch_size=2, reuse_sequences_from=str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        load_config(raw_cfg(qwen_dir, tmp_path, "q", **reuse, **extra))
