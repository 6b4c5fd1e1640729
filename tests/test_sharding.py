"""Exact sharding: K workers get disjoint, complete shares of the global batch stream.

Property tests over the batch plan and over real batches (a text file with
documents of every length, so `skip_cache` and running out of data are
exercised), then a real K=3 run of the tiny model against a single-worker run.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.config import load_config
from collector.data import BatchStream, DataSpec
from collector.worker import run_worker, worker_batches
from vaultsh.events import EventSink
from vaultsh.finalize import finalize
from vaultsh.megabatch import read_megabatch
from vaultsh.run import Run
from vaultsh.store import LocalStore

from .modelfixtures import TOKENIZER_DIR

WORDS = "the activation of a residual stream is stored in megabatch files on a bucket".split()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """60 documents of 1..40 words: with seq_length 24 some are too long for skip_cache."""
    rng = random.Random(5)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) + f" doc{i}." for i in range(60)]
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


@settings(max_examples=200, deadline=None)
@given(k=st.integers(1, 8), n_batches=st.integers(0, 500), start=st.integers(0, 500), data=st.data())
def test_batch_plan_is_disjoint_and_complete(tokenizer, k, n_batches, start, data):
    start = min(start, n_batches)
    spec = DataSpec(data_key="pydoc", seq_length=8, batch_size=2, n_batches=n_batches, start_batch=start)
    shares = [list(BatchStream(spec, tokenizer, worker=w, num_workers=k).batch_indices()) for w in range(k)]
    flat = [b for s in shares for b in s]
    assert len(flat) == len(set(flat)), "two workers share a batch"
    assert sorted(flat) == list(range(start, n_batches)), "some batch belongs to no worker"
    for w, share in enumerate(shares):
        assert all(b % k == w for b in share)
        assert share == sorted(share)
    # The worker's own count (progress totals, resume) agrees with the stream's plan.
    w = data.draw(st.integers(0, k - 1))
    cfg = load_config(
        {
            "run_name": "plan",
            "num_runs": k if n_batches >= k else 1,
            "transformer_config": {"model_name": "x"},
            "data_config": {
                "data_key": "pydoc",
                "n_batches": max(n_batches, 1),
                "seq_length": 8,
                "batch_size": 2,
                "start_batch": min(start, max(n_batches, 1)),
            },
            "upload_config": {"batches_per_upload": 1, "hooks": ["residuals_0"]},
        }
    )
    kk, w = cfg.num_runs, min(w, cfg.num_runs - 1)
    stream = BatchStream(cfg.data, tokenizer, worker=w, num_workers=kk)
    assert worker_batches(cfg, w) == stream.planned_batches


def _batches(spec, tokenizer, w, k, path):
    stream = BatchStream(spec, tokenizer, worker=w, num_workers=k, base_dir=path.parent)
    return {b.index: b for b in stream}, stream


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 8),
    n_batches=st.integers(1, 40),
    batch_size=st.integers(1, 3),
    start=st.integers(0, 5),
    skip_cache=st.booleans(),
    seed=st.integers(0, 3),
)
def test_union_of_worker_streams_equals_single_stream(
    tokenizer, text_file, k, n_batches, batch_size, start, skip_cache, seed
):
    spec = DataSpec(
        data_key=f"file:{text_file}",
        seq_length=24,
        batch_size=batch_size,
        n_batches=n_batches,
        start_batch=min(start, n_batches),
        seed=seed,
        skip_cache=skip_cache,
    )
    single, s1 = _batches(spec, tokenizer, 0, 1, text_file)
    union: dict[int, object] = {}
    for w in range(k):
        mine, stream = _batches(spec, tokenizer, w, k, text_file)
        assert not set(mine) & set(union), "two workers produced the same global batch"
        assert all(b % k == w for b in mine)
        # A worker whose share reaches past the end of the data sees the same end as a single worker;
        # one whose last batch comes before it never looks further.
        plan = stream.batch_indices()
        reaches_end = s1.exhausted and len(plan) > 0 and plan[-1] >= s1.available_batches
        assert stream.exhausted == reaches_end
        if reaches_end:
            assert stream.available_batches == s1.available_batches
        union.update(mine)
    assert sorted(union) == sorted(single)
    for b, batch in single.items():
        assert torch.equal(union[b].input_ids, batch.input_ids)
        assert torch.equal(union[b].mask, batch.mask)
        assert union[b].doc_index == batch.doc_index
    if s1.exhausted:
        assert sorted(single) == list(range(spec.start_batch, s1.available_batches))
    else:
        assert sorted(single) == list(range(spec.start_batch, n_batches))


# -- the real thing: K=3 workers of the tiny model vs one worker --------------


def _cfg(tiny_dir, uri, num_runs):
    return load_config(
        {
            "run_name": "shard.pydoc",
            "num_runs": num_runs,
            "transformer_config": {"model_name": str(tiny_dir), "dtype": "float32"},
            "data_config": {"data_key": "pydoc", "n_batches": 7, "seq_length": 24, "batch_size": 2, "seed": 11},
            "upload_config": {"batches_per_upload": 2, "hooks": ["residuals_2", "attention_1"]},
            "storage": {"uri": str(uri)},
        }
    )


def _by_batch(store, run, hook, bpu=2):
    """global batch index -> (input_ids, mask, states) rows of that batch, from the committed files."""
    out = {}
    for c in run.iter_commits():
        mb = read_megabatch(store, c.files[hook].key)
        # A worker's megabatch holds its own batches batch_start, batch_start + K, ... in order.
        k = run.read_cfg()["num_runs"]
        for j, b in enumerate(range(c.batch_start, c.batch_end, k)):
            rows = slice(2 * j, 2 * j + 2)
            assert b not in out, f"batch {b} stored twice"
            out[b] = (mb.input_ids[rows], mb.mask[rows], mb.states[rows])
    return out


def test_three_workers_union_equals_single_worker_run(tiny_dir, tmp_path):
    single_cfg = _cfg(tiny_dir, tmp_path / "one", 1)
    run_worker(single_cfg, 0, sink=EventSink(0))
    sharded_cfg = _cfg(tiny_dir, tmp_path / "three", 3)
    results = [run_worker(sharded_cfg, w, sink=EventSink(w)) for w in range(3)]
    assert [r["batches"] for r in results] == [3, 2, 2]  # 0,3,6 / 1,4 / 2,5
    one, three = LocalStore(tmp_path / "one"), LocalStore(tmp_path / "three")
    run1, run3 = Run(one, "shard.pydoc"), Run(three, "shard.pydoc")
    for hook in ("residuals_2", "attention_1"):
        a, b = _by_batch(one, run1, hook), _by_batch(three, run3, hook)
        assert sorted(a) == sorted(b) == list(range(7))
        for i in range(7):
            assert torch.equal(a[i][0], b[i][0]), f"batch {i}: different sequences"
            assert torch.equal(a[i][1], b[i][1])
            torch.testing.assert_close(a[i][2], b[i][2], rtol=1e-5, atol=1e-5)
    finalize(run3)
    for hook in ("residuals_2", "attention_1"):
        s1, s3 = run1.read_statistics(hook), run3.read_statistics(hook)
        assert s1.count == s3.count
        np.testing.assert_allclose(s1.mean, s3.mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s1.std, s3.std, rtol=1e-5, atol=1e-7)
