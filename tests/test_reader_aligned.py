"""Aligned reads across hooks and runs, token filters, normalization and the trainer adapters.

Synthetic runs are written through the real writers with planted relations
between hooks (hook B = 2 * hook A[:, :6] + 1, and hook A's last feature = the
token id / 1024), so any misalignment of rows, ids or files shows as a broken
relation. A run collected by the real worker from a tiny Llama checks the
transcoder pair (hook_mlp_in, hook_mlp_out) against the model itself.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from vaultsh.errors import UserError
from vaultsh.megabatch import read_megabatch, write_megabatch
from vaultsh.reader import ActivationReader
from vaultsh.reader.filters import AlignmentError
from vaultsh.run import CommitRecord, FileRecord, Run, metadata_for
from vaultsh.stats import RunningStats
from vaultsh.store import LocalStore

A, B = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"
N, T, DA, DB = 4, 8, 16, 6
ID_SCALE = 1024.0  # hook A's last feature is the token id / 1024 (exact in float32)


def relate(a: torch.Tensor) -> torch.Tensor:
    """Hook B's states from hook A's: any row mix-up between the hooks breaks this."""
    return 2 * a[..., :DB] + 1


def make_aligned_run(store, name="pair", workers=2, files_per_worker=3, seed=0, other=None, flip=None):
    """A run with hooks A and B over the same tokens, `workers` x `files_per_worker` megabatches.

    other: a function of hook A's states giving a second run's states (same ids/mask); flip:
    (worker, index, seq, pos) where hook B's file gets a different input id.
    Returns {(worker, index): (states_a, ids, mask)}.
    """
    run = Run(store, name)
    for hook, d in ((A, DA), (B, DB)):
        run.write_metadata(
            hook, metadata_for(batch_size=2, sequence_length=T, d_in=d, batches_per_file=N // 2, hook=hook)
        )
    g = torch.Generator().manual_seed(seed)
    stats = {A: RunningStats(DA), B: RunningStats(DB)}
    planted = {}
    for w in range(workers):
        for i in range(files_per_worker):
            ids = torch.randint(10, 5000, (N, T), generator=g)
            mask = torch.rand(N, T, generator=g) > 0.25
            mask[:, 0] = False
            a = torch.randn(N, T, DA, generator=g) * 2 + 0.5
            a[..., -1] = ids.float() / ID_SCALE
            if other is not None:
                a = other(a, ids)
            files = {}
            for hook, x in ((A, a), (B, relate(a))):
                hid = ids.clone()
                if flip is not None and hook == B and flip[:2] == (w, i):
                    hid[flip[2], flip[3]] += 1
                key = run.megabatch_key(hook, w, i)
                size = write_megabatch(store, key, x, hid, mask, metadata={"hook": hook})
                sha = hashlib.sha256(store.get_bytes(key)).hexdigest()
                files[hook] = FileRecord(hook, key, size, sha, N, int(mask.sum()), w, i)
                stats[hook].update(x, mask)
            run.commit(
                CommitRecord(
                    worker=w, index=i, batch_start=2 * i, batch_end=2 * i + 2, files=files, tokens=int(mask.sum())
                )
            )
            planted[(w, i)] = (a, ids, mask)
    for hook, st in stats.items():
        run.write_statistics(hook, st)
    return planted


def token_pairs(store, **kw) -> ActivationReader:
    """A token-mode reader of both hooks of the run make_aligned_run planted in `store`."""
    return ActivationReader("pair", hooks=[A, B], store=store, tokens=True, **kw)


def check_pairs(states: dict, ids: torch.Tensor | None = None) -> None:
    a, b = states[A], states[B]
    assert a.shape[0] == b.shape[0] and a.shape[-1] == DA and b.shape[-1] == DB
    assert torch.equal(b, relate(a)), "rows of the two hooks are not the same tokens"
    if ids is not None:
        assert torch.equal(ids, (a[..., -1] * ID_SCALE).long()), "input_ids do not go with the states"


def rows_of_a(batches) -> torch.Tensor:
    """Hook A's rows of every token batch, each batch checked by check_pairs (with its input_ids)."""
    rows = []
    for batch in batches:
        check_pairs(batch["states"], batch["input_ids"])
        rows.append(batch["states"][A])
    return torch.cat(rows)


def unmasked_a(planted) -> torch.Tensor:
    return torch.cat([a[m] for a, _, m in planted.values()])


def sorted_rows(x: torch.Tensor) -> np.ndarray:
    arr = x.double().numpy()
    return arr[np.lexsort(arr.T[::-1])]


# -- aligned hooks ---------------------------------------------------------------------------
def test_megabatch_mode_delivers_both_hooks_of_the_same_megabatch(store):
    planted = make_aligned_run(store)
    r = ActivationReader("pair", hooks=[A, B], store=store, shuffle=True, seed=3)
    seen = []
    for mb in r:
        assert set(mb["states"]) == {A, B}
        check_pairs(mb["states"])
        match = [k for k, (a, ids, m) in planted.items() if torch.equal(mb["input_ids"], ids)]
        assert len(match) == 1
        a, ids, m = planted[match[0]]
        assert torch.equal(mb["states"][A], a) and torch.equal(mb["mask"], m)
        seen.append(match[0])
    assert sorted(seen) == sorted(planted) and seen != sorted(planted)  # shuffled, each once
    assert r.hooks == [A, B]
    assert [r.hook_metadata(h)["d_in"] for h in r.hooks] == [DA, DB] and r.hook_metadata() == r.metadata
    with pytest.raises(UserError, match="hook 'x' is not read here"):
        r.hook_metadata("x")


@pytest.mark.parametrize("shuffle_buffer", [0, 3])
def test_token_mode_keeps_hooks_aligned_through_shuffles(store, shuffle_buffer):
    planted = make_aligned_run(store)
    r = token_pairs(store, batch_size=7, shuffle=True, shuffle_buffer=shuffle_buffer, seed=1)
    got = rows_of_a(r)
    np.testing.assert_array_equal(sorted_rows(got), sorted_rows(unmasked_a(planted)))
    assert r.stats.dropped["masked"] == sum(int((~m).sum()) for _, _, m in planted.values())


def test_dataloader_workers_and_shards_keep_pairs_and_cover_every_token(local_store):
    planted = make_aligned_run(local_store, workers=2, files_per_worker=4)
    ds = token_pairs(local_store, batch_size=16, shuffle=True, shuffle_buffer=2).as_dataset()
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    np.testing.assert_array_equal(sorted_rows(rows_of_a(loader)), sorted_rows(unmasked_a(planted)))
    shards = [token_pairs(local_store).shard(rank, 3) for rank in range(3)]
    parts = torch.cat([rows_of_a(r) for r in shards])
    np.testing.assert_array_equal(sorted_rows(parts), sorted_rows(unmasked_a(planted)))


def test_one_fetch_per_megabatch_for_every_hook(local_store):
    make_aligned_run(local_store)
    r = ActivationReader("pair", hooks=[A, B], store=local_store)
    list(r)
    total = sum(f.stat().st_size for f in (local_store.root / "pair").rglob("*.safetensors"))
    assert r.stats.files_read == 6 and r.stats.bytes_downloaded == total


def test_hooks_whose_input_ids_disagree_are_refused_with_the_file_and_position(store):
    make_aligned_run(store, flip=(1, 2, 3, 5))
    r = ActivationReader("pair", hooks=[A, B], store=store, on_error="skip")
    with pytest.raises(AlignmentError, match=r"w0001.*00002.*input_ids differ .* sequence 3, position 5"):
        list(r)


def test_bad_hook_lists_are_one_line_errors(local_store, tmp_path):
    make_aligned_run(local_store)
    with pytest.raises(UserError, match="names a hook twice"):
        ActivationReader("pair", hooks=[A, A], store=local_store)
    with pytest.raises(UserError, match="no such hook|no hook"):
        ActivationReader("pair", hooks=[A, "blocks.9.hook_resid_post"], store=local_store)
    with pytest.raises(UserError, match="no hook 'nope' in this run; hooks there: .*hook_mlp_in"):
        ActivationReader(str(local_store.root / "pair"), hooks=[A, "nope"])
    with pytest.raises(UserError, match="ActivationReader.zip"):
        ActivationReader(["pair", "pair"], hooks=[A], store=local_store)


# -- two runs ---------------------------------------------------------------------------------
def test_zip_of_two_runs_over_the_same_data(store):
    make_aligned_run(store, "base", seed=5)
    make_aligned_run(store, "chat", seed=5, other=lambda a, ids: torch.cat([-a[..., :-1], a[..., -1:]], -1))
    r = ActivationReader.zip(
        "base", "chat", hooks=[A, B], store=store, tokens=True, batch_size=9, shuffle=True, shuffle_buffer=2
    )
    n = 0
    for batch in r:
        base, chat = batch["states"]
        check_pairs(base, batch["input_ids"])
        check_pairs(chat, batch["input_ids"])
        assert torch.equal(chat[A][:, :-1], -base[A][:, :-1])
        n += base[A].shape[0]
    assert n == r.stats.tokens > 0


def test_zip_across_stores_local_and_s3(local_store, s3_store, s3_env):
    make_aligned_run(local_store, "base", seed=2)
    make_aligned_run(s3_store, "chat", seed=2, other=lambda a, ids: a * 1)
    r = ActivationReader.zip(str(local_store.root / "base"), "s3://" + s3_store.bucket + "/chat", hooks=[B])
    for mb in r:
        base, chat = mb["states"]
        assert torch.equal(base[B], chat[B])


def test_zip_of_runs_over_different_data_is_refused(store):
    make_aligned_run(store, "base", seed=5)
    make_aligned_run(store, "other", seed=6)
    r = ActivationReader.zip("base", "other", hooks=[A], store=store)
    with pytest.raises(
        AlignmentError,
        match=r"other/blocks.1.hook_mlp_in/.*w0000.*00000.*differ from .*base.*"
        r"sequence 0, position 0",
    ):
        next(iter(r))


def test_zip_with_a_shorter_run_reads_what_both_have_and_says_so(local_store):
    make_aligned_run(local_store, "base", workers=1, files_per_worker=3, seed=4)
    make_aligned_run(local_store, "short", workers=1, files_per_worker=2, seed=4)
    with pytest.warns(UserWarning, match="reading the 2 megabatch"):
        r = ActivationReader.zip("base", "short", hooks=[A], store=local_store)
    assert len(list(r)) == 2


# -- filters ----------------------------------------------------------------------------------
def test_filters_drop_exactly_the_planted_tokens_in_every_hook(store):
    planted = make_aligned_run(store, workers=1, files_per_worker=3)
    special = 4242
    # plant: one huge-norm token in hook A and the special id, in a rewritten first megabatch
    a, ids, mask = planted[(0, 0)]
    run = Run(store, "pair")
    ids = ids.clone()
    ids[1, 4] = special
    a = a.clone()
    a[..., -1] = ids.float() / ID_SCALE
    a[2, 6, :-1] = 500.0
    mask = mask.clone()
    mask[1, 4] = mask[2, 6] = True
    for hook, x in ((A, a), (B, relate(a))):
        key = run.megabatch_key(hook, 0, 0)
        write_megabatch(store, key, x, ids, mask, metadata={"hook": hook})
    recs = {}
    for c in run.iter_commits():
        if c.index == 0:
            for hook in (A, B):
                f = c.files[hook]
                size = store.head(f.key).size
                sha = hashlib.sha256(store.get_bytes(f.key)).hexdigest()
                recs[hook] = FileRecord(hook, f.key, size, sha, N, int(mask.sum()), 0, 0)
            run.commit(CommitRecord(worker=0, index=0, batch_start=0, batch_end=2, files=recs, tokens=int(mask.sum())))
    planted[(0, 0)] = (a, ids, mask)
    r = token_pairs(store, batch_size=5, skip_positions=2, exclude_token_ids=[special], max_norm_factor=20)
    got = rows_of_a(r)
    # brute force over the planted files
    want, n_skip, n_excl = [], 0, 0
    med = r.median_norm
    for x, i, m in planted.values():
        keep = m.clone()
        n_skip += int(keep[:, :2].sum())
        keep[:, :2] = False
        n_excl += int((keep & (i == special)).sum())
        keep &= i != special
        norms = torch.linalg.vector_norm(x, dim=-1)
        keep &= norms <= 20 * med
        want.append(x[keep])
    want = torch.cat(want)
    np.testing.assert_array_equal(sorted_rows(got), sorted_rows(want))
    assert not (got[:, :-1] == 500.0).all(-1).any(), "the outlier token came through"
    assert (got[:, -1] * ID_SCALE != special).all()
    d = r.stats.dropped
    assert d["skip_positions"] == n_skip and d["exclude_token_ids"] == n_excl == 1 and d["max_norm"] == 1
    # the median comes from statistics.json (mean norm) without an outliers file, else from the one `norms` wrote
    # (an earlier version's HOOK/_outliers.json is read when there is no other)
    st = run.read_statistics(A)
    assert med == pytest.approx(st.mean_norm)
    store.put_bytes(run.legacy_outliers_key(A), json.dumps({"version": 1, "median_norm": 9.0}).encode())
    assert token_pairs(store, max_norm_factor=2.0).median_norm == 9.0
    store.put_bytes(run.outliers_key(A), json.dumps({"version": 1, "median_norm": 3.5}).encode())
    r2 = token_pairs(store, max_norm_factor=2.0)
    assert r2.median_norm == 3.5
    for batch in r2:
        assert (torch.linalg.vector_norm(batch["states"][A], dim=-1) <= 7.0).all()


def test_filters_in_megabatch_mode_clear_the_mask(local_store):
    planted = make_aligned_run(local_store, workers=1, files_per_worker=2)
    r = ActivationReader("pair", hooks=[A, B], store=local_store, skip_positions=3)
    for mb in r:
        _, _, m = next(v for v in planted.values() if torch.equal(v[1], mb["input_ids"]))
        want = m.clone()
        want[:, :3] = False
        assert torch.equal(mb["mask"], want)


def test_bad_filter_arguments_are_one_line_errors(local_store):
    make_aligned_run(local_store, workers=1, files_per_worker=1)
    for kw, msg in (
        (dict(skip_positions=-1), "skip_positions"),
        (dict(max_norm_factor=0), "max_norm_factor"),
        (dict(exclude_token_ids=["a"]), "exclude_token_ids"),
        (dict(max_norm_factor=3, norm_hook="x"), "norm_hook='x' is not one of"),
        (dict(norm_hook=A), "give max_norm_factor"),
    ):
        with pytest.raises(UserError, match=msg):
            ActivationReader("pair", hooks=[A, B], store=local_store, **kw)


# -- normalization ----------------------------------------------------------------------------
def test_mean_norm_sqrt_d_factor_equals_numpy_over_the_stored_tokens(local_store):
    planted = make_aligned_run(local_store)
    r = token_pairs(local_store, normalize="mean_norm_sqrt_d", batch_size=1 << 20)
    rows_a = unmasked_a(planted).double().numpy()
    rows_b = relate(unmasked_a(planted)).double().numpy()
    fa = math.sqrt(DA) / np.linalg.norm(rows_a, axis=1).mean()
    fb = math.sqrt(DB) / np.linalg.norm(rows_b, axis=1).mean()
    assert r.normalization_factor[A] == pytest.approx(fa, rel=1e-6)
    assert r.normalization_factor[B] == pytest.approx(fb, rel=1e-6)
    (batch,) = list(r)
    for hook, d in ((A, DA), (B, DB)):
        mean_norm = torch.linalg.vector_norm(batch["states"][hook].double(), dim=-1).mean().item()
        assert mean_norm == pytest.approx(math.sqrt(d), rel=1e-5)
    assert ActivationReader("pair", hooks=[A], store=local_store, normalize="none").normalization_factor is None
    # standardize: a per-feature factor 1/std (population), the shift the mean, both from numpy over the stored tokens
    st = token_pairs(local_store, normalize="standardize", batch_size=1 << 20)
    for hook, rows in ((A, rows_a), (B, rows_b)):
        np.testing.assert_allclose(st.normalization_factor[hook].numpy(), 1 / rows.std(axis=0), rtol=1e-6)
    (batch,) = list(st)
    z = batch["states"][A].double().numpy()
    np.testing.assert_allclose(z, (rows_a - rows_a.mean(0)) / rows_a.std(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="normalize='sqrt'"):
        ActivationReader("pair", hooks=[A], store=local_store, normalize="sqrt")


# -- adapters ---------------------------------------------------------------------------------
def test_data_provider_is_an_endless_iterator_of_bare_tensors(local_store):
    planted = make_aligned_run(local_store, workers=1, files_per_worker=2)
    total = sum(int(m.sum()) for _, _, m in planted.values())
    r = ActivationReader("pair/" + A, store=local_store, tokens=True, batch_size=4, shuffle=True)
    per_pass = math.ceil(total / 4)
    provider = r.as_data_provider()
    got = [next(provider) for _ in range(3 * per_pass + 1)]  # past the end of several passes
    assert all(isinstance(x, torch.Tensor) and x.shape[1] == DA for x in got)
    assert r.epoch == 3
    one = list(ActivationReader("pair/" + A, store=local_store, tokens=True, batch_size=4).as_data_provider(1))
    assert sum(x.shape[0] for x in one) == total
    pairs = token_pairs(local_store).as_data_provider(epochs=1)
    for states in pairs:
        check_pairs(states)
    with pytest.raises(UserError, match="tokens=True"):
        ActivationReader("pair/" + A, store=local_store).as_data_provider()


def test_iterable_dataset_view_of_bare_tensors_splits_files_across_workers(local_store):
    """`as_dataset(states_only=True)`: a torch IterableDataset of bare [batch, d] tensors (dictionary_learning,
    custom loops); two DataLoader workers together deliver every unmasked token exactly once."""
    planted = make_aligned_run(local_store, workers=2, files_per_worker=3)
    ds = ActivationReader("pair/" + A, store=local_store, tokens=True, batch_size=5, shuffle=True).as_dataset(
        states_only=True
    )
    assert isinstance(ds, torch.utils.data.IterableDataset)
    got = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    assert all(isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == DA for x in got)
    np.testing.assert_array_equal(sorted_rows(torch.cat(got)), sorted_rows(unmasked_a(planted)))
    pairs = token_pairs(local_store).as_dataset(states_only=True)
    for states in pairs:
        check_pairs(states)


# -- a real collector run: the transcoder pair against the model ------------------------------
@pytest.fixture(scope="module")
def collected_pair(tmp_path_factory):
    pytest.importorskip("transformers")
    from .modelfixtures import collect_tiny_run

    tiny, root, result = collect_tiny_run(
        tmp_path_factory,
        "pair",
        {"data_key": "pydoc", "n_batches": 4, "seq_length": 32, "batch_size": 2, "seed": 3},
        {"batches_per_upload": 2, "hooks": ["blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]},
    )
    assert result["status"] == "complete"
    return tiny, root


def test_transcoder_pairs_from_a_real_run_match_the_model(collected_pair):
    from transformers import AutoModelForCausalLM

    tiny, root = collected_pair
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    layer = model.model.layers[1]
    r = ActivationReader(str(root / "pair"), hooks=[A, B], tokens=True, batch_size=50, shuffle=True, shuffle_buffer=2)
    n = 0
    with torch.no_grad():
        for batch in r:
            x, y = batch["states"][A], batch["states"][B]
            torch.testing.assert_close(layer.mlp(layer.post_attention_layernorm(x)), y, rtol=1e-4, atol=1e-5)
            n += x.shape[0]
    assert n == r.stats.tokens > 0


def test_s3rcache_reads_aligned_hooks_with_one_shuffle(s3_server, s3_bucket, monkeypatch):
    """Activault's API with hooks=: each item a dict hook -> [N, T, D], tokens shuffled alike in every hook."""
    from vaultsh.reader import S3RCache
    from vaultsh.store.s3 import S3Store

    writer = S3Store(s3_bucket, endpoint_url=s3_server)
    planted = make_aligned_run(writer, workers=1, files_per_worker=3)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    cache = S3RCache.from_credentials(
        "testing", "testing", s3_prefix="pair", bucket_name=s3_bucket, hooks=[A, B], concurrency=4
    )
    out = list(cache)
    cache.finalize()
    assert len(out) == 3
    originals = [a for a, _, _ in planted.values()]
    for item in out:
        check_pairs(item)
        flat = item[A].reshape(-1, DA)
        match = [a for a in originals if np.array_equal(sorted_rows(a.reshape(-1, DA)), sorted_rows(flat))]
        assert len(match) == 1 and not torch.equal(match[0], item[A])  # the same tokens, shuffled


def test_return_source_gives_each_sequence_and_token_its_provenance(collected_pair):
    """Megabatch mode: the stored `source` rows as written; token mode: the same per token, plus its position."""
    _, root = collected_pair
    store = LocalStore(root)
    run = Run(store, "pair")
    meta = run.read_metadata(A)
    assert meta["sources"], "the collector records its source names"
    by_key = {}
    for mb in ActivationReader(str(root / "pair"), hooks=[A, B], return_source=True, return_file=True):
        stored = read_megabatch(store, mb["file"].split(str(root) + "/", 1)[-1])
        assert stored.source is not None and torch.equal(mb["source"], stored.source.long())
        assert (mb["source"][:, 0] >= 0).all() and (mb["source"][:, 0] < len(meta["sources"])).all()
        for n in range(mb["source"].shape[0]):
            for t in range(mb["input_ids"].shape[1]):
                by_key[(*mb["source"][n].tolist(), t)] = int(mb["input_ids"][n, t])
    r = ActivationReader(
        str(root / "pair"), hooks=[A, B], tokens=True, batch_size=13, shuffle=True, shuffle_buffer=2, return_source=True
    )
    n = 0
    for batch in r:
        src, ids = batch["source"], batch["input_ids"]
        assert src.shape == (ids.shape[0], 4)
        for row, tok in zip(src.tolist(), ids.tolist()):
            assert by_key[tuple(row)] == tok  # the token at that sequence's position
        n += ids.shape[0]
    assert n == r.stats.tokens > 0


# -- two tiny models over the same data: reuse_sequences_from, then zip -----------------------
@pytest.fixture(scope="module")
def two_models(tiny_dir, tmp_path_factory):
    """A tiny Llama run, a tiny Qwen2 run fed its stored sequences (`reuse_sequences_from`), and a Qwen2 run
    over other data (another seed)."""
    pytest.importorskip("transformers")
    from collector.config import load_config
    from collector.worker import run_worker
    from vaultsh.events import EventSink

    from .familyfixtures import build_or_skip, tokenizer

    tok = tokenizer()
    qwen = tmp_path_factory.mktemp("qwen") / "model"
    build_or_skip("qwen2", len(tok), seed=4).save_pretrained(qwen)
    tok.save_pretrained(qwen)
    root = tmp_path_factory.mktemp("zipvault")
    data = {"n_batches": 6, "seq_length": 16, "batch_size": 2}

    def collect(name, model, **extra):
        cfg = load_config(
            {
                "run_name": name,
                "num_runs": 1,
                "transformer_config": {"model_name": str(model), "dtype": "float32"},
                "data_config": {**data, **extra},
                "upload_config": {"batches_per_upload": 2, "hooks": ["residuals_1"]},
                "storage": {"uri": str(root)},
            }
        )
        assert run_worker(cfg, 0, sink=EventSink(0, callback=lambda e: None))["status"] == "complete"

    collect("llama", tiny_dir, data_key="pydoc", seed=3)
    collect("qwen", qwen, reuse_sequences_from=str(root / "llama"))
    collect("qwen.other", qwen, data_key="pydoc", seed=9)
    return root


def test_zip_of_two_models_over_the_same_sequences_pairs_every_token(two_models):
    root = two_models
    store = LocalStore(root)
    stored = {
        run: {f.name: read_megabatch(store, f.key) for f in Run(store, run).committed_files("residuals_1")}
        for run in ("llama", "qwen")
    }
    assert sorted(stored["llama"]) == sorted(stored["qwen"]) and len(stored["llama"]) == 3
    z = ActivationReader.zip(
        str(root / "llama"), str(root / "qwen"), hooks=["residuals_1"], return_file=True, shuffle=True, seed=2
    )
    seen = []
    for mb in z:
        llama, qwen = mb["states"]
        name = mb["file"].rsplit("/", 1)[-1]
        a, b = stored["llama"][name], stored["qwen"][name]
        assert torch.equal(mb["input_ids"], a.input_ids) and torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(llama["residuals_1"], a.states) and torch.equal(qwen["residuals_1"], b.states)
        assert not torch.allclose(a.states, b.states, atol=1e-2)  # two different models
        seen.append(name)
    assert sorted(seen) == sorted(stored["llama"])
    n = sum(int(m.mask.sum()) for m in stored["llama"].values())
    tz = ActivationReader.zip(
        str(root / "llama"),
        str(root / "qwen"),
        hooks=["residuals_1"],
        tokens=True,
        batch_size=7,
        shuffle=True,
        shuffle_buffer=2,
    )
    assert sum(batch["states"][0]["residuals_1"].shape[0] for batch in tz) == n == tz.stats.tokens


def test_zip_with_a_run_over_other_data_names_the_file_and_position(two_models):
    root = two_models
    store = LocalStore(root)
    first = Run(store, "llama").committed_files("residuals_1")[0]
    other = read_megabatch(store, Run(store, "qwen.other").committed_files("residuals_1")[0].key)
    diff = (read_megabatch(store, first.key).input_ids != other.input_ids).nonzero()[0].tolist()
    z = ActivationReader.zip(str(root / "llama"), str(root / "qwen.other"), hooks=["residuals_1"])
    with pytest.raises(
        AlignmentError,
        match=rf"qwen\.other/residuals_1/{first.name}: input_ids differ from "
        rf".*llama/residuals_1/{first.name} at sequence {diff[0]}, "
        rf"position {diff[1]}",
    ):
        next(iter(z))
