"""RunningStats against numpy: chunked updates, merge trees, masks, dtypes, round trips."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import vaultsh.stats as stats_mod
from vaultsh.errors import FormatError
from vaultsh.stats import RunningStats, merge_all

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-9


def reference(x: np.ndarray):
    x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    return x.mean(axis=0), x.var(axis=0), float(np.linalg.norm(x, axis=1).mean())


def assert_matches(s: RunningStats, x: np.ndarray, rtol: float = RTOL):
    x2 = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    mean, var, norm = reference(x2)
    scale = float(np.abs(x2).max()) + 1.0
    assert s.count == x2.shape[0]
    np.testing.assert_allclose(s.mean, mean, rtol=rtol, atol=rtol * scale * 1e-3)
    np.testing.assert_allclose(s.var, var, rtol=rtol, atol=rtol * scale * scale * 1e-3)
    np.testing.assert_allclose(s.std, np.sqrt(var), rtol=rtol, atol=rtol * scale * 1e-1)
    np.testing.assert_allclose(s.mean_norm, norm, rtol=rtol, atol=rtol * scale * 1e-3)


@st.composite
def data_and_splits(draw, max_rows=60, max_d=6):
    d = draw(st.integers(1, max_d))
    n = draw(st.integers(1, max_rows))
    x = draw(arrays(np.float64, (n, d), elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)))
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=6))))
    bounds = [0, *cuts, n]
    chunks = [x[a:b] for a, b in zip(bounds, bounds[1:])]
    return x, chunks


def random_tree_merge(items: list[RunningStats], rnd) -> RunningStats:
    items = list(items)
    while len(items) > 1:
        i = rnd.randrange(len(items))
        a = items.pop(i)
        j = rnd.randrange(len(items))
        b = items.pop(j)
        items.append(a.merge(b) if rnd.random() < 0.5 else b.merge(a))
    return items[0]


@SETTINGS
@given(data_and_splits(), st.randoms(use_true_random=False))
def test_chunked_updates_and_random_merge_tree_match_numpy(xs, rnd):
    x, chunks = xs
    d = x.shape[1]
    # one object, sequential updates (empty chunks are no-ops)
    seq = RunningStats(d)
    for c in chunks:
        seq.update(c)
    assert_matches(seq, x)
    # one object per chunk, merged in a random tree
    parts = [RunningStats(d).update(c) for c in chunks]
    assert_matches(random_tree_merge(parts, rnd), x)
    # merge_all in a shuffled order
    rnd.shuffle(parts)
    assert_matches(merge_all(parts), x)


@SETTINGS
@given(data_and_splits(max_rows=40), st.integers(1, 12))
def test_multi_chunk_reduction_inside_one_update(xs, chunk_elems):
    """Force the per-update chunking (normally ~4M elements) to exercise the multi-way combine."""
    x, _ = xs
    old = stats_mod._CHUNK_ELEMENTS
    stats_mod._CHUNK_ELEMENTS = chunk_elems
    try:
        assert_matches(RunningStats.from_batch(x), x)
        assert_matches(RunningStats.from_batch(torch.from_numpy(x)), x)
        n, mean, m2, norm_sum = stats_mod._moments_torch_device(torch.from_numpy(x))
        s = RunningStats(x.shape[1], n, mean, m2, norm_sum)
        assert_matches(s, x)
    finally:
        stats_mod._CHUNK_ELEMENTS = old


@SETTINGS
@given(data_and_splits(max_rows=30), st.data())
def test_masked_tokens_are_excluded(xs, data):
    x, _ = xs
    n, d = x.shape
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    s = RunningStats(d).update(x, mask)
    if not mask.any():
        assert s.count == 0 and s == RunningStats(d)
        return
    assert_matches(s, x[mask])
    # torch tensors with a torch mask, and a numpy mask on a torch tensor
    assert_matches(RunningStats(d).update(torch.from_numpy(x), torch.from_numpy(mask)), x[mask])
    assert_matches(RunningStats(d).update(torch.from_numpy(x), mask), x[mask])


def test_three_dim_input_with_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4))
    mask = rng.random((3, 5)) > 0.4
    s = RunningStats.from_batch(x, mask)
    assert_matches(s, x[mask])
    s2 = RunningStats.from_batch(torch.from_numpy(x), torch.from_numpy(mask))
    np.testing.assert_allclose(s2.mean, s.mean, rtol=1e-12)
    np.testing.assert_allclose(s2.m2, s.m2, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_torch_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(4, 16, 8, generator=g) * 3 + 2).to(dtype)
    exact = t.to(torch.float64).numpy()
    assert_matches(RunningStats.from_batch(t), exact)
    n, mean, m2, ns = stats_mod._moments_torch_device(t.reshape(-1, 8))
    assert_matches(RunningStats(8, n, mean, m2, ns), exact)


def test_float16_numpy_input():
    x = (np.random.default_rng(2).normal(size=(50, 6)) * 10).astype(np.float16)
    assert_matches(RunningStats.from_batch(x), x.astype(np.float64))


def test_inputs_are_not_modified():
    x = np.random.default_rng(3).normal(size=(20, 3))
    before = x.copy()
    RunningStats.from_batch(x)
    np.testing.assert_array_equal(x, before)
    t = torch.from_numpy(x.copy())
    RunningStats.from_batch(t)
    stats_mod._moments_torch_device(t)
    np.testing.assert_array_equal(t.numpy(), before)


def test_large_offset_stays_accurate_where_naive_fails():
    rng = np.random.default_rng(4)
    x = 1e6 + rng.normal(scale=1e-2, size=(20_000, 4))
    true_var = x.var(axis=0)  # numpy's two-pass variance
    naive = (x * x).mean(axis=0) - x.mean(axis=0) ** 2
    assert np.max(np.abs(naive / true_var - 1)) > 1e-2  # the naive formula breaks down
    # streamed in uneven batches and merged
    s = RunningStats(4)
    parts = []
    for i, c in enumerate(np.array_split(x, 37)):
        (s.update(c) if i % 2 else parts.append(RunningStats.from_batch(c)))
    s = merge_all([s, *parts])
    np.testing.assert_allclose(s.var, true_var, rtol=1e-6)
    np.testing.assert_allclose(s.mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(s.mean_norm, np.linalg.norm(x, axis=1).mean(), rtol=1e-12)


@SETTINGS
@given(data_and_splits(max_rows=30), st.randoms(use_true_random=False))
def test_merge_associative_and_order_independent(xs, rnd):
    x, chunks = xs
    d = x.shape[1]
    while len(chunks) < 3:
        chunks.append(x[:0])
    a, b, c = (RunningStats(d).update(ch) for ch in (chunks[0], chunks[1], np.concatenate(chunks[2:])))
    left = a.merge(b).merge(c)
    right = a.merge(b.merge(c))
    other = c.merge(a).merge(b)
    for s in (right, other):
        assert s.count == left.count
        scale = float(np.abs(x).max()) + 1.0
        np.testing.assert_allclose(s.mean, left.mean, rtol=RTOL, atol=RTOL * scale * 1e-3)
        np.testing.assert_allclose(s.m2, left.m2, rtol=RTOL, atol=RTOL * scale * scale * x.shape[0] * 1e-3)
        np.testing.assert_allclose(s.norm_sum, left.norm_sum, rtol=RTOL)


def test_merge_is_pure_and_merge_inplace_updates():
    x = np.random.default_rng(5).normal(size=(10, 3))
    a, b = RunningStats.from_batch(x[:4]), RunningStats.from_batch(x[4:])
    a0, b0 = a.copy(), b.copy()
    m = a.merge(b)
    assert a == a0 and b == b0
    assert (a + b) == m
    assert a.merge_(b) is a and a == m


@SETTINGS
@given(data_and_splits(max_rows=30))
def test_json_and_bytes_round_trips_are_exact(xs):
    x, chunks = xs
    s = RunningStats(x.shape[1])
    for c in chunks:
        s.update(c)
    doc = json.loads(json.dumps(s.to_activault_json()))
    assert RunningStats.from_activault_json(doc) == s
    assert RunningStats.from_bytes(s.to_bytes()) == s


def test_activault_json_fields():
    s = RunningStats.from_batch(np.arange(12, dtype=np.float64).reshape(4, 3))
    doc = s.to_activault_json()
    for k in ("mean", "std", "norm", "M2", "count", "d_model"):
        assert k in doc
    assert doc["count"] == 4 and doc["d_model"] == 3
    assert isinstance(doc["norm"], float) and len(doc["mean"]) == len(doc["std"]) == len(doc["M2"]) == 3
    np.testing.assert_allclose(doc["std"], np.arange(12.0).reshape(4, 3).std(axis=0))


def test_activault_file_without_count_infers_it():
    x = np.random.default_rng(6).normal(size=(40, 5))
    s = RunningStats.from_batch(x)
    doc = {k: v for k, v in s.to_activault_json().items() if k in ("mean", "std", "norm", "M2")}
    back = RunningStats.from_activault_json(doc)
    assert back.count == 40
    np.testing.assert_allclose(back.mean_norm, s.mean_norm, rtol=1e-12)
    assert RunningStats.from_activault_json(doc, count=7).count == 7
    with pytest.raises(FormatError):
        RunningStats.from_activault_json({"mean": [0.0, 1.0]})


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"std": [1.0]},
        {"mean": "nope", "count": 1},
        {"mean": [1.0, 2.0], "M2": [1.0], "count": 3},
        {"mean": [1.0], "M2": [1.0], "count": -1},
        {"mean": [1.0], "M2": [1.0], "count": True},
        {"mean": [1.0], "M2": [1.0], "count": 2, "norm": "big"},
    ],
)
def test_malformed_statistics_json_is_format_error(doc):
    with pytest.raises(FormatError):
        RunningStats.from_activault_json(doc)


def test_malformed_bytes_is_format_error():
    with pytest.raises(FormatError):
        RunningStats.from_bytes(b"not safetensors")
    from safetensors.numpy import save

    with pytest.raises(FormatError):
        RunningStats.from_bytes(save({"mean": np.zeros(3)}))


def test_empty_and_mismatched():
    s = RunningStats(3)
    s.update(np.zeros((0, 3)))
    s.update(np.ones((2, 3)), np.zeros(2, dtype=bool))
    s.update(torch.ones(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool))
    assert s == RunningStats(3) and s.mean_norm == 0.0
    np.testing.assert_array_equal(s.std, np.zeros(3))
    with pytest.raises(ValueError):
        s.update(np.ones((2, 4)))
    with pytest.raises(ValueError):
        s.update(np.ones((2, 3)), np.ones(3, dtype=bool))
    with pytest.raises(ValueError):
        s.merge(RunningStats(4))
    with pytest.raises(ValueError):
        merge_all([])
    assert merge_all([], d=3) == RunningStats(3)
    with pytest.raises(ValueError):
        RunningStats(3, mean=np.zeros(4))


def test_core_modules_do_not_import_torch_or_tui():
    code = (
        "import sys, vaultsh.stats, vaultsh.run\n"
        "bad = [m for m in ('torch', 'textual', 'prompt_toolkit') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
