"""The worker with labelled data, generation mode and out-of-memory halving (tiny Llama, real tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import collector.capture as layers
from collector.config import load_config
from collector.data import BatchStream
from collector.generation import ChunkRunner, decode_label, label_tensors
from collector.worker import run_worker
from vaultsh.events import EventSink
from vaultsh.megabatch import read_megabatch
from vaultsh.run import Run
from vaultsh.store import LocalStore

from .modelfixtures import make_tiny_llama_dir

HOOKS = ["residuals_0", "residuals_2"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    recs = [
        {"prompt": f"How do I {verb} the {noun}?", "category": cat, "score": i, "source": f"s{i % 3}"}
        for i, (verb, noun, cat) in enumerate(
            [
                ("open", "door", "harmless"),
                ("pick", "lock", "crime"),
                ("bake", "bread", "harmless"),
                ("hack", "server", "crime"),
                ("paint", "fence", "harmless"),
                ("steal", "car", "crime"),
                ("fold", "shirt", "harmless"),
                ("forge", "cheque", "crime"),
            ]
        )
    ]
    p = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p, recs


def make_cfg(tiny_dir, uri, data=None, inference=None, bpu=2):
    raw = {
        "run_name": "tiny.labelled",
        "transformer_config": {"model_name": str(tiny_dir), "dtype": "float32"},
        "data_config": {"n_batches": 3, "seq_length": 24, "batch_size": 2, "seed": 5, **(data or {})},
        "upload_config": {"batches_per_upload": bpu, "hooks": HOOKS},
        "storage": {"uri": str(uri)},
    }
    if inference is not None:
        raw["inference"] = inference
    return load_config(raw)


def collect(cfg):
    events = []
    result = run_worker(cfg, 0, sink=EventSink(0, callback=events.append))
    return result, events


def stored(uri, cfg, hook):
    store = LocalStore(uri)
    run = Run(store, cfg.run_name)
    return store, run, [read_megabatch(store, f.key) for f in run.committed_files(hook)]


def test_labels_round_trip_to_stored_megabatches(tiny_dir, tok, prompts, tmp_path):
    path, recs = prompts
    cfg = make_cfg(
        tiny_dir, tmp_path, data={"path": str(path), "label_columns": ["score", "source"], "clean_added_tokens": True}
    )
    result, _ = collect(cfg)
    assert result["status"] == "complete" and result["batches"] == 3
    _, _, mbs = stored(tmp_path, cfg, "residuals_2")
    assert [mb.states.shape[0] for mb in mbs] == [4, 2]
    expected = [b for b in BatchStream(cfg.data, tok)]
    rows = [(doc, {k: v[i] for k, v in b.labels.items()}) for b in expected for i, doc in enumerate(b.documents)]
    got = []
    for mb in mbs:
        assert sorted(mb.labels) == ["category", "score", "source"]
        vocab = json.loads(mb.header.metadata["label_values"])
        assert mb.labels["score"].dtype == torch.int64
        cats = decode_label(mb.labels["category"], vocab["category"])
        srcs = decode_label(mb.labels["source"], vocab["source"])
        got += [{"category": c, "score": int(s), "source": r} for c, s, r in zip(cats, mb.labels["score"], srcs)]
    assert got == [lab for _, lab in rows]
    by_prompt = {r["prompt"]: r for r in recs}
    for doc, lab in rows:  # and they are the labels of the record each row came from
        r = by_prompt[doc.text]
        assert lab == {"category": r["category"], "score": r["score"], "source": r["source"]}


def test_generation_stores_prompt_plus_generated_with_mask(tiny_dir, tok, prompts, tmp_path):
    path, recs = prompts
    cfg = make_cfg(
        tiny_dir,
        tmp_path,
        data={"path": str(path), "chat": True, "seq_length": 48},
        inference={"max_new_tokens": 6, "save_activations": True},
    )
    result, _ = collect(cfg)
    assert result["status"] == "complete"
    store, run, mbs = stored(tmp_path, cfg, "residuals_2")
    prompt_batches = list(BatchStream(cfg.data, tok, max_new_tokens=6))
    assert prompt_batches[0].input_ids.shape[1] == 48 - 6  # prompts leave room for the continuation
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.cat([mb.input_ids for mb in mbs])
    mask = torch.cat([mb.mask for mb in mbs])
    gen = torch.cat([mb.labels["generated"] for mb in mbs])
    plen = torch.cat([mb.labels["prompt_length"] for mb in mbs])
    states = torch.cat([mb.states for mb in mbs])
    assert gen.dtype == torch.bool and gen.shape == ids.shape == (6, 48)
    texts = []
    for g in range(len(mbs)):
        key = f"{run.internal_prefix}generations/w0000/{g:07d}.jsonl"
        texts += [json.loads(line) for line in store.get_bytes(key).decode().splitlines()]
    assert len(texts) == 6
    row = 0
    for b in prompt_batches:
        for i in range(b.input_ids.shape[0]):
            n = int(b.attention_mask[i].sum())
            prompt = b.input_ids[i, :n]
            assert int(plen[row]) == n and torch.equal(ids[row, :n], prompt)
            assert tok.decode(prompt).rstrip().endswith("<|im_start|>assistant")  # rendered for generation
            ref = model.generate(
                prompt[None],
                attention_mask=torch.ones(1, n, dtype=torch.long),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )[0, n:].tolist()
            if tok.eos_token_id in ref:
                ref = ref[: ref.index(tok.eos_token_id) + 1]
            m = n + len(ref)
            assert ids[row, n:m].tolist() == ref, "stored continuation is not the model's greedy one"
            assert gen[row].nonzero().flatten().tolist() == list(range(n, m))  # exactly the generated span
            assert not mask[row, m:].any() and mask[row, n:m].all() == (tok.eos_token_id not in ref)
            assert texts[row]["generation"] == tok.decode(ref, skip_special_tokens=True)
            assert texts[row]["category"] == b.labels["category"][i]
            if row == 0:  # activations are those of one forward pass over prompt + generated
                with torch.no_grad():
                    hs = model(ids[row, :m][None], output_hidden_states=True).hidden_states
                torch.testing.assert_close(states[row, :m], hs[2][0], rtol=1e-4, atol=1e-4)
            row += 1


def test_generation_only_stores_text(tiny_dir, prompts, tmp_path):
    path, _ = prompts
    cfg = make_cfg(
        tiny_dir, tmp_path, data={"path": str(path)}, inference={"max_new_tokens": 3, "save_activations": False}, bpu=1
    )
    result, _ = collect(cfg)
    assert result["status"] == "complete" and result["megabatches"] == 3
    store = LocalStore(tmp_path)
    run = Run(store, cfg.run_name)
    keys = sorted(o.key for o in store.iter_objects(cfg.run_name + "/"))
    assert not any(k.startswith(f"{cfg.run_name}/residuals") for k in keys)  # no activations
    gens = [k for k in keys if "/generations/" in k]
    assert len(gens) == 3 and len(run.iter_commits()) == 3
    rec = json.loads(store.get_bytes(gens[0]).decode().splitlines()[0])
    assert {"prompt", "generation", "category", "generated_tokens"} <= set(rec)


def test_chunk_runner_halves_on_oom():
    seen = []

    def fn(s, e):
        seen.append(e - s)
        if e - s > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return list(range(s, e))

    halved = []
    r = ChunkRunner(8, auto=True, on_halve=lambda a, b: halved.append((a, b)))
    out = r.map(10, fn)
    assert [x for part in out for x in part] == list(range(10))
    assert halved == [(8, 4), (4, 2)] and r.chunk == 2 and seen[:3] == [8, 4, 2]
    with pytest.raises(torch.OutOfMemoryError):
        ChunkRunner(8, auto=False).map(10, fn)
    with pytest.raises(ValueError):  # other errors are not swallowed
        ChunkRunner(8, auto=True).map(10, lambda s, e: (_ for _ in ()).throw(ValueError("bad")))


def test_simulated_oom_halves_the_batch_and_carries_on(tiny_dir, prompts, tmp_path, monkeypatch):
    path, _ = prompts
    data = {"path": str(path), "batch_size": 4, "n_batches": 2}
    ref_cfg = make_cfg(tiny_dir, tmp_path / "ref", data=data)
    collect(ref_cfg)
    real_run = layers.ActivationCapture.run
    sizes = []

    def tight_memory(self, **inputs):
        sizes.append(int(inputs["input_ids"].shape[0]))
        if inputs["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_run(self, **inputs)

    monkeypatch.setattr(layers.ActivationCapture, "run", tight_memory)
    cfg = make_cfg(tiny_dir, tmp_path / "oom", data=data, inference={"auto_find_batch_size": True})
    result, events = collect(cfg)
    assert result["status"] == "complete" and result["batches"] == 2
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert warnings == [
        "out of memory with a forward batch of 4: continuing with 2",
        "out of memory with a forward batch of 2: continuing with 1",
    ]
    # the halved size stays for the next batch; the one-sequence forward after the first batch is the self-check
    assert sizes == [4, 2, 1, 1, 1, 1] + [1] + [1] * 4
    for hook in HOOKS:
        _, _, a = stored(tmp_path / "ref", ref_cfg, hook)
        _, _, b = stored(tmp_path / "oom", cfg, hook)
        for x, y in zip(a, b):
            assert torch.equal(x.input_ids, y.input_ids)
            torch.testing.assert_close(x.states, y.states, rtol=1e-5, atol=1e-5)
    strict = make_cfg(tiny_dir, tmp_path / "strict", data=data)
    with pytest.raises(torch.OutOfMemoryError):
        collect(strict)


def test_label_tensors_types():
    t, v = label_tensors(
        {"b": [True, False], "i": [3, 4], "f": [0.5, None], "s": ["x", None], "c": ["b", "a"]}, {"c": ["b", "a", "z"]}
    )
    assert t["b"].dtype == torch.bool and t["i"].tolist() == [3, 4]
    assert t["f"].dtype == torch.float64 and torch.isnan(t["f"][1])
    assert t["s"].tolist() == [0, -1] and v["s"] == ["x"]
    assert t["c"].tolist() == [0, 1] and v["c"] == ["b", "a", "z"]
