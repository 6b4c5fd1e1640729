"""The explore commands on a store with planted answers, on LocalStore and on moto's S3 server.

Expected answers come from the planted positions and from brute-force numpy
over every array written (tests/explorefixtures.py), never typed in.
"""

from __future__ import annotations

import io
import json
import pickle
import uuid

import numpy as np
import pytest

from vaultsh.errors import UserError
from vaultsh.explore.grep import grep
from vaultsh.explore.norms import norms
from vaultsh.explore.sae import CheckpointError, load_sae
from vaultsh.explore.saeeval import sae_eval
from vaultsh.explore.top import top
from vaultsh.explore.values import value_fn
from vaultsh.run import LEGACY_OUTLIERS, METADATA, STATISTICS, Run
from vaultsh.shell.app import Shell
from vaultsh.store import LocalStore

from . import explorefixtures as fx
from .saelensfixtures import run_with_saelens

STORES = pytest.mark.parametrize("kind", ["local", "s3"])


@pytest.fixture(scope="module")
def planted(tmp_path_factory, s3_server, s3_admin):
    from vaultsh.store.s3 import S3Store

    local = LocalStore(tmp_path_factory.mktemp("explore") / "vault")
    data = fx.build(local)
    bucket = f"vaultsh-explore-{uuid.uuid4().hex[:8]}"
    s3_admin.create_bucket(Bucket=bucket)
    s3 = S3Store(bucket, prefix="", endpoint_url=s3_server)
    fx.build(s3)
    ckpts = tmp_path_factory.mktemp("ckpts")
    return {
        "local": local,
        "s3": s3,
        "data": data,
        "saelens": fx.write_saelens(ckpts / "saelens"),
        "topk": fx.write_saelens(ckpts / "saelens-topk", "topk"),
        "sparsify": fx.write_sparsify(ckpts / "sparsify"),
        "dir": ckpts,
    }


def flat_real(data):
    """(values [M, D], (file, seq, pos) [M, 3]) of every real token, in file order."""
    idx = np.argwhere(data["mask"])
    return data["states"][data["mask"]], idx


def hook_key():
    return f"{fx.RUN}/{fx.HOOK}"


# ---------------------------------------------------------------------------
# grep
# ---------------------------------------------------------------------------


@STORES
def test_grep_finds_the_phrase_across_tokens_and_skips_the_masked_one(planted, kind):
    store, data = planted[kind], planted["data"]
    r = grep(store, fx.RUN, fx.QUERY, context_tokens=3)
    tok = fx.tokenizer()
    found = sorted((data["keys"].index(m.file), m.sequence, m.start, m.end) for m in r.matches)
    n_phrase = len(data["phrase"])
    # the query starts inside the phrase's first token(s) and ends inside a later one
    assert [(f, s) for f, s, _, _ in found] == [(f, s) for f, s, _ in fx.PHRASE_AT]
    for (f, s, start, end), (_, _, p) in zip(found, fx.PHRASE_AT):
        ids = data["ids"][f, s].tolist()
        assert p <= start < end <= p + n_phrase and end - start >= 2  # spans a token boundary
        assert fx.QUERY in tok.decode(ids[start:end])
        assert fx.QUERY not in tok.decode(ids[start + 1 : end]) and fx.QUERY not in tok.decode(ids[start : end - 1])
    for m in r.matches:
        assert m.text == fx.QUERY and fx.QUERY in m.context.match and m.hook == fx.HOOK
        # provenance of the match's first token: one match is in the packed file's second document
        assert m.source == fx.source_of_token(data["keys"].index(m.file), m.sequence, m.start)
    assert {m.source["source"] for m in r.matches} == {"my_jsonl", "notes"}
    # brute force over every run of real tokens, decoded whole by the tokenizer itself
    expect = 0
    for f in range(fx.N_FILES):
        for s in range(fx.N):
            m, ids = data["mask"][f, s], data["ids"][f, s]
            edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(int), [0]])))
            for a, b in zip(edges[::2], edges[1::2]):
                expect += tok.decode(ids[a:b].tolist(), skip_special_tokens=False).count(fx.QUERY)
    assert len(r.matches) == expect == len(fx.PHRASE_AT)
    # only input_ids and mask were read: headers add a little
    ids_mask = sum(data["ids"][i].nbytes + data["mask"][i].nbytes for i in range(fx.N_FILES))
    assert r.ids_mask_bytes == ids_mask
    assert ids_mask <= r.bytes_read <= 1.2 * ids_mask  # the provenance reads included
    assert r.files == fx.N_FILES and not r.truncated


def test_grep_over_a_prefix_of_runs(tmp_path):
    """A location holding several runs: every run is searched (one hook each), matches name their run."""
    store = LocalStore(tmp_path / "v")
    fx.build(store, run_name="exp/a")
    data = fx.build(store, run_name="exp/b")
    r = grep(store, "exp", fx.QUERY)
    assert sorted((m.run, m.sequence) for m in r.matches) == sorted(
        (run, s) for run in ("exp/a", "exp/b") for _, s, _ in fx.PHRASE_AT
    )
    assert r.files == 2 * fx.N_FILES and r.ids_mask_bytes == 2 * sum(
        data["ids"][i].nbytes + data["mask"][i].nbytes for i in range(fx.N_FILES)
    )
    assert len(grep(store, "exp/b", fx.QUERY).matches) == len(fx.PHRASE_AT)


def test_grep_regex_limit_and_bad_pattern(planted):
    store = planted["local"]
    r = grep(store, fx.RUN, r"zebra\s+cross(ing)?", regex=True, limit=1)
    assert len(r.matches) == 1 and r.truncated
    assert len(grep(store, fx.RUN, "ZEBRA", ignore_case=True).matches) == 3  # the masked copy's first word is real
    with pytest.raises(UserError, match="bad regular expression"):
        grep(store, fx.RUN, "(", regex=True)
    with pytest.raises(UserError, match="no run"):
        grep(store, "nope", "x")


# ---------------------------------------------------------------------------
# top
# ---------------------------------------------------------------------------


def brute_top(data, values: np.ndarray, k: int):
    x, where = flat_real(data)
    order = np.argsort(-values, kind="stable")[:k]
    return [(tuple(where[i]), float(values[i])) for i in order], len(values)


def got(r, data):
    return [((data["keys"].index(t.file), t.sequence, t.position), t.value) for t in r.top]


@STORES
def test_top_dim_equals_brute_force_and_finds_the_planted_row(planted, kind):
    store, data = planted[kind], planted["data"]
    r = top(store, hook_key(), None, value_fn(dim=fx.DIM), k=12, context_tokens=2)
    x, _ = flat_real(data)
    expect, total = brute_top(data, x[:, fx.DIM], 12)
    assert [w for w, _ in got(r, data)] == [tuple(map(int, w)) for w, _ in expect]
    np.testing.assert_allclose([v for _, v in got(r, data)], [v for _, v in expect], rtol=1e-6)
    assert got(r, data)[0][0] == fx.DIM_AT and r.tokens == total == int(data["mask"].sum())
    assert r.top[0].quantile == 1.0 and r.top[1].quantile == pytest.approx((total - 1) / total)
    assert r.top[0].token_id == int(data["ids"][fx.DIM_AT])
    for t in r.top:  # provenance of every token, from its file's source tensors (and segments when packed)
        assert t.source == fx.source_of_token(data["keys"].index(t.file), t.sequence, t.position)
    assert any(t.source["source"] == "my_jsonl" for t in r.top) and any(t.source["source"] == "notes" for t in r.top)
    tok = fx.tokenizer()
    assert r.top[0].context.match == tok.decode([int(data["ids"][fx.DIM_AT])])


def test_top_over_many_files_equals_brute_force_and_samples_are_exact_too(tmp_path):
    """24 small megabatches with random masks: top-k by a dimension and by a direction equals a numpy sort of
    every real token; --files N equals the same sort over the N files the scan reports it read."""
    import torch

    from vaultsh.megabatch import write_megabatch
    from vaultsh.run import CommitRecord, FileRecord, metadata_for

    store = LocalStore(tmp_path / "v")
    run = Run(store, "many")
    n_files, n, t, d = 24, 4, 16, 8
    run.write_metadata("h", metadata_for(batch_size=n, sequence_length=t, d_in=d, hook="h"))
    g = np.random.default_rng(7)
    states = g.standard_normal((n_files, n, t, d)).astype(np.float32)
    mask = g.random((n_files, n, t)) > 0.3
    keys = []
    for i in range(n_files):
        key = run.megabatch_key("h", i % 3, i // 3)
        size = write_megabatch(
            store,
            key,
            torch.from_numpy(states[i]),
            torch.from_numpy(g.integers(0, 1000, (n, t))),
            torch.from_numpy(mask[i]),
        )
        run.commit(
            CommitRecord(
                i % 3, i // 3, i, i + 1, {"h": FileRecord("h", key, size, None, n, n * t, i % 3, i // 3)}, tokens=n * t
            )
        )
        keys.append(key)

    def brute(values, files):
        rows = [(float(values[f][s, p]), keys[f], s, p) for f in files for s, p in zip(*np.nonzero(mask[f]))]
        return sorted(rows, key=lambda r: -r[0])

    v = g.standard_normal(d).astype(np.float32)
    np.save(tmp_path / "v.npy", v)
    for vf, values in ((value_fn(dim=5), states[..., 5]), (value_fn(direction=str(tmp_path / "v.npy")), states @ v)):
        r = top(store, "many/h", None, vf, k=50)
        want = brute(values, range(n_files))
        assert [(t_.file, t_.sequence, t_.position) for t_ in r.top] == [w[1:] for w in want[:50]]
        np.testing.assert_allclose([t_.value for t_ in r.top], [w[0] for w in want[:50]], rtol=1e-5)
        assert r.tokens == len(want) == int(mask.sum())
        for t_, i in zip(r.top, range(50)):
            assert t_.quantile == pytest.approx((len(want) - i) / len(want))
    r = top(store, "many/h", None, value_fn(dim=5), k=10, files=5, seed=0)
    got_files = sorted({keys.index(t_.file) for t_ in r.top})
    from vaultsh.reader import ActivationReader

    sample = [keys.index(f.key) for f in ActivationReader("many/h", store=store, shuffle=True, seed=0).files[:5]]
    assert set(got_files) <= set(sample) and sample != list(range(5)) and r.files == 5
    want = brute(states[..., 5], sample)
    assert [(t_.file, t_.sequence, t_.position) for t_ in r.top] == [w[1:] for w in want[:10]]
    assert r.tokens == len(want)


def test_top_direction_npy_and_safetensors(planted, tmp_path):
    from safetensors.numpy import save_file

    data = planted["data"]
    v = np.random.default_rng(5).standard_normal(fx.D).astype(np.float32)
    np.save(tmp_path / "v.npy", v)
    save_file({"direction": v}, str(tmp_path / "v.safetensors"))
    x, _ = flat_real(data)
    expect, _ = brute_top(data, x @ v, 5)
    for name in ("v.npy", "v.safetensors"):
        r = top(planted["local"], hook_key(), None, value_fn(direction=str(tmp_path / name)), k=5)
        assert [w for w, _ in got(r, data)] == [tuple(map(int, w)) for w, _ in expect]
    np.save(tmp_path / "bad.npy", np.zeros(fx.D + 1, dtype=np.float32))
    with pytest.raises(UserError, match="d_model=16"):
        top(planted["local"], hook_key(), None, value_fn(direction=str(tmp_path / "bad.npy")))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="not a plain .npy"):
        value_fn(direction=str(tmp_path / "obj.npy"))


@STORES
def test_top_sae_feature_saelens_jumprelu(planted, kind):
    store, data = planted[kind], planted["data"]
    r = top(store, fx.RUN, fx.HOOK, value_fn(sae=str(planted["saelens"]), feature=fx.FEATURE), k=6)
    x, _ = flat_real(data)
    vals = fx.np_encode(data["sae"], x, "jumprelu")[:, fx.FEATURE]
    expect, _ = brute_top(data, vals, 6)
    assert got(r, data)[0][0] == fx.SAE_AT
    assert r.top[0].source == fx.source_of_token(*fx.SAE_AT)
    assert fx.SAE_AT[0] == fx.PACKED_FILE and r.top[0].source["token_offset"] == fx.PACK_OFFSET + fx.SAE_AT[2]
    assert [w for w, _ in got(r, data)] == [tuple(map(int, w)) for w, _ in expect]
    np.testing.assert_allclose([v for _, v in got(r, data)], [v for _, v in expect], rtol=1e-5)


def test_top_sample_of_files_and_bad_args(planted):
    r = top(planted["local"], hook_key(), None, value_fn(dim=0), k=3, files=2)
    assert r.files == 2 and len({t.file for t in r.top}) <= 2
    with pytest.raises(UserError, match="out of range"):
        top(planted["local"], hook_key(), None, value_fn(dim=99))
    with pytest.raises(UserError, match="exactly one"):
        value_fn(dim=1, direction="x.npy")
    with pytest.raises(UserError, match="name one hook|no hook"):
        top(planted["local"], fx.RUN, "nope", value_fn(dim=1))


# ---------------------------------------------------------------------------
# SAE checkpoints and sae-eval
# ---------------------------------------------------------------------------


class _Boom:
    """Unpickling this creates a file: proof that nobody unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_checkpoints_are_refused_unopened(tmp_path):
    marker = tmp_path / "unpickled"
    for name in ("sae.pt", "sae_weights.safetensors"):  # a pickle under a safetensors name too
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        (d / name).write_bytes(pickle.dumps(_Boom(str(marker)), protocol=4))
        with pytest.raises(CheckpointError, match="pickle"):
            load_sae(d / name)
        with pytest.raises(CheckpointError, match="pickle"):
            load_sae(d)
    assert not marker.exists()


def test_saelens_and_sparsify_layouts_encode_like_numpy(planted):
    data = planted["data"]
    x = flat_real(data)[0][:200]
    import torch

    for path, arch, weights in (
        (planted["saelens"], "jumprelu", fx.sae_weights()),
        (planted["topk"], "topk", fx.sae_weights()),
        (planted["sparsify"], "topk", fx.sae_weights(2)),
    ):
        sae = load_sae(path)
        assert (sae.d_in, sae.d_sae, sae.architecture) == (fx.D, fx.D_SAE, arch)
        h = sae.encode(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(h, fx.np_encode(weights, x, arch, fx.K_SPARSIFY), rtol=1e-4, atol=1e-5)
    assert load_sae(planted["sparsify"]).layout == "sparsify"
    assert load_sae(planted["saelens"] / "sae_weights.safetensors").layout == "saelens"


@STORES
def test_sae_eval_equals_brute_force(planted, kind):
    store, data = planted[kind], planted["data"]
    n = 700
    r = sae_eval(store, hook_key(), None, str(planted["sparsify"]), tokens=n, dense=0.2)
    x = flat_real(data)[0][:n].astype(np.float64)
    w = {k: v.astype(np.float64) for k, v in fx.sae_weights(2).items()}
    h = fx.np_encode(w, x, "topk", fx.K_SPARSIFY)
    xhat = h @ w["W_dec"] + w["b_dec"]
    fvu = ((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    freq = (h > 0).mean(0)
    assert r.tokens == n
    assert r.l0 == pytest.approx((h > 0).sum(1).mean())
    assert r.fvu == pytest.approx(fvu, rel=1e-4)
    assert (r.dead, r.dense) == (int((freq == 0).sum()), int((freq > 0.2).sum()))
    with pytest.raises(CheckpointError, match="d_in"):
        bad = planted["dir"] / "bad"
        bad.mkdir(exist_ok=True)
        from safetensors.numpy import save_file

        save_file(
            {
                k: np.zeros(
                    (8, 4) if k == "W_enc" else (4, 8) if k == "W_dec" else (4,) if k == "b_enc" else (8,),
                    dtype=np.float32,
                )
                for k in ("W_enc", "b_enc", "W_dec", "b_dec")
            },
            str(bad / "sae_weights.safetensors"),
        )
        sae_eval(store, hook_key(), None, str(bad), tokens=10)


# ---------------------------------------------------------------------------
# checkpoints written by sae-lens itself
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saelens_ckpts(planted, tmp_path_factory):
    """Checkpoints made by sae-lens's own save_model / save_inference_model, and its encode/decode of every
    real token of the planted store."""
    out = tmp_path_factory.mktemp("saelens-ckpts")
    x, _ = flat_real(planted["data"])
    np.save(out / "x.npy", x)
    return out, run_with_saelens("saelens_ckpts.py", out, fx.D, fx.D_SAE, fx.K_SPARSIFY, marker="SAELENS-CKPTS")


def test_checkpoints_saved_by_saelens_encode_and_decode_as_saelens_does(saelens_ckpts):
    import torch

    out, cases = saelens_ckpts
    assert {"standard", "jumprelu-trained", "topk-trained", "topk-rescaled", "layernorm"} <= set(cases)
    x = torch.from_numpy(np.load(out / "x.npy"))
    for name in cases:
        sae = load_sae(out / name)
        want_h, want_xhat = np.load(out / f"{name}.acts.npy"), np.load(out / f"{name}.recon.npy")
        assert (want_h > 0).any(0).sum() > fx.D_SAE // 2, name  # most latents fire somewhere: a real check
        h, x_hat = sae.reconstruct(x)
        np.testing.assert_allclose(h.numpy(), want_h, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(x_hat.numpy(), want_xhat, rtol=1e-4, atol=1e-4, err_msg=name)
        for f in (0, fx.FEATURE, fx.D_SAE - 1):
            np.testing.assert_allclose(sae.feature(x, f).numpy(), want_h[:, f], rtol=1e-4, atol=1e-4, err_msg=name)
    # SAELens 6 trains top-k SAEs with rescale_acts_by_decoder_norm on by default: it changes which latents win
    assert load_sae(out / "topk-trained").rescale_by_dec_norm
    with pytest.raises(CheckpointError, match="expected_average_only_in.*fold"):
        load_sae(out / "expected-average")


@STORES
def test_top_and_sae_eval_with_a_saelens_made_rescaled_topk_checkpoint(planted, saelens_ckpts, kind):
    store, data = planted[kind], planted["data"]
    out, _ = saelens_ckpts
    want_h = np.load(out / "topk-rescaled.acts.npy").astype(np.float64)
    feature = int(np.argmax((want_h > 0).sum(0)))  # the latent that fires most often
    r = top(store, hook_key(), None, value_fn(sae=str(out / "topk-rescaled"), feature=feature), k=8)
    expect, _ = brute_top(data, want_h[:, feature], 8)
    np.testing.assert_allclose([v for _, v in got(r, data)], [v for _, v in expect], rtol=1e-4)
    assert {w for w, _ in got(r, data)} == {tuple(map(int, w)) for w, _ in expect}
    n = 900
    e = sae_eval(store, hook_key(), None, str(out / "topk-rescaled"), tokens=n)
    x = np.load(out / "x.npy")[:n].astype(np.float64)
    xhat = np.load(out / "topk-rescaled.recon.npy")[:n].astype(np.float64)
    h = want_h[:n]
    assert e.l0 == pytest.approx((h > 0).sum(1).mean())
    assert e.fvu == pytest.approx(((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-4)
    assert e.dead == int(((h > 0).sum(0) == 0).sum())


# ---------------------------------------------------------------------------
# norms and its outliers file
# ---------------------------------------------------------------------------


@STORES
def test_norms_find_the_sink_and_write_outliers_json(planted, kind):
    store, data = planted[kind], planted["data"]
    r = norms(store, hook_key(), None, factor=5.0, massive_ratio=10.0)
    x, where = flat_real(data)
    nrm = np.linalg.norm(x.astype(np.float64), axis=1)
    med = np.median(nrm)
    assert r.median_norm == pytest.approx(med, rel=1e-5) and r.tokens == len(nrm)
    for q in ("0.5", "0.9", "0.99", "0.999"):
        assert r.quantiles[q] == pytest.approx(np.quantile(nrm, float(q)), rel=1e-5)
    assert r.quantiles["max"] == pytest.approx(300.0)
    out = [(data["keys"].index(o["file"]), o["sequence"], o["position"]) for o in r.outliers]
    expect = [tuple(map(int, where[i])) for i in np.argsort(-nrm) if nrm[i] >= 5 * med]
    assert out == expect and out[0] == fx.SINK_AT and {fx.DIM_AT, fx.SAE_AT} <= set(out)
    max_abs = np.abs(x).max(0)
    ratio = max_abs / np.median(max_abs)
    assert [d["dim"] for d in r.massive_dims] == [int(j) for j in np.argsort(-max_abs) if ratio[j] >= 10]
    assert r.massive_dims[0]["dim"] == fx.SINK_DIM
    assert r.by_position[0] == pytest.approx(nrm[where[:, 2] == 0].mean(), rel=1e-5)
    okey = Run(store, fx.RUN).outliers_key(fx.HOOK)
    assert r.written == store.child_uri(okey) and okey == f"{fx.RUN}/_vaultsh/outliers/{fx.HOOK}.json"
    doc = json.loads(store.get_bytes(okey))
    assert {"version", "hook", "tokens", "median_norm", "mean_norm", "quantiles", "massive_dims", "outliers"} <= set(
        doc
    )
    assert (
        doc["version"] == 1
        and doc["hook"] == fx.HOOK
        and set(doc["quantiles"]) == {"0.5", "0.9", "0.99", "0.999", "max"}
    )
    assert set(doc["outliers"][0]) == {"file", "sequence", "position", "token_id", "norm"}
    assert set(doc["massive_dims"][0]) == {"dim", "max_abs", "ratio_to_median"}
    assert doc["outliers"][0]["token_id"] == int(data["ids"][fx.SINK_AT])


@STORES
def test_reader_drops_the_outliers_norms_found(planted, kind, tmp_path):
    """`norms` writes the outliers file; the reader's max_norm_factor then drops exactly those tokens."""
    import torch

    from vaultsh.reader import ActivationReader

    data = planted["data"]
    if kind == "local":
        store = LocalStore(tmp_path / "v")  # a fresh copy: no outliers file of another test
        fx.build(store)
    else:
        store = planted["s3"]
    r = norms(store, hook_key(), None, factor=5.0)
    reader = ActivationReader(hook_key(), store=store, tokens=True, batch_size=256, max_norm_factor=5.0)
    assert reader.median_norm == pytest.approx(r.median_norm)
    got = torch.cat([b["states"] for b in reader]).numpy()
    x, where = flat_real(data)
    nrm = np.linalg.norm(x.astype(np.float64), axis=1)
    keep = nrm <= 5.0 * r.median_norm
    np.testing.assert_array_equal(got, x[keep])  # file order, no shuffle: exactly the kept rows
    assert reader.stats.dropped["max_norm"] == r.outliers_total == int((~keep).sum()) >= 3
    assert not any(tuple(map(int, w)) == fx.SINK_AT for w in where[keep])


def test_norms_leaves_the_hook_directory_as_activault_reads_it(tmp_path):
    """Activault's RCache loads every key of a hook directory but metadata.json and statistics.json: norms writes
    outside it, and moves an earlier version's HOOK/_outliers.json out; an Activault-style run (no commit records)
    still lists exactly its megabatches."""
    from vaultsh.reader import S3RCache

    store = LocalStore(tmp_path / "v")
    data = fx.build(store, commit=False)
    store.put_bytes(f"{hook_key()}/{LEGACY_OUTLIERS}", b'{"version": 1, "median_norm": 1.0}')
    assert sorted(f.key for f in Run(store, fx.RUN).committed_files(fx.HOOK)) == sorted(
        data["keys"]
    )  # legacy: not listed
    r = norms(store, hook_key(), None)
    in_hook_dir = {o.key for o in store.iter_objects(f"{hook_key()}/")}
    assert in_hook_dir - {f"{hook_key()}/{METADATA}", f"{hook_key()}/{STATISTICS}"} == set(data["keys"])
    assert store.exists(Run(store, fx.RUN).outliers_key(fx.HOOK)) and r.written
    files = Run(store, fx.RUN).committed_files(fx.HOOK)
    assert sorted(f.key for f in files) == sorted(data["keys"])
    cache = S3RCache(s3_prefix=str(tmp_path / "v" / fx.RUN / fx.HOOK), preserve_file_order=True, return_ids=True)
    assert sum(1 for _ in cache) == fx.N_FILES
    cache.finalize()


# ---------------------------------------------------------------------------
# view --heat and PNGs
# ---------------------------------------------------------------------------


def test_heat_values_and_png_decode(planted, tmp_path):
    from PIL import Image

    from vaultsh.explore.heat import heat

    data = planted["data"]
    f, s, p = fx.SINK_AT
    png = tmp_path / "heat.png"
    r = heat(planted["local"], data["keys"][f], s, value_fn(norm=True), png=str(png))
    np.testing.assert_allclose([t.value for t in r.tokens], np.linalg.norm(data["states"][f, s], axis=1), rtol=1e-5)
    assert r.scale == pytest.approx(300.0)
    assert [t.real for t in r.tokens] == data["mask"][f, s].tolist()
    img = Image.open(png)
    img.load()
    assert img.format == "PNG" and img.size == r.png_size and img.size[0] == 900 and img.size[1] > 40
    colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert (255, 0, 0) in colours  # the sink, the hottest cell
    r2 = heat(planted["local"], data["keys"][2], 3, value_fn(dim=fx.DIM))
    assert r2.signed and r2.tokens[10].value == pytest.approx(50.0)


class CountingStore:
    """A store that counts the bytes of its ranged reads (and refuses whole-object reads)."""

    def __init__(self, store):
        self.store, self.ranged = store, 0

    def get_range(self, key, start, length):
        data = self.store.get_range(key, start, length)
        self.ranged += len(data)
        return data

    def get_bytes(self, key):
        if key.endswith(".safetensors"):
            raise AssertionError(f"read the whole of {key}")
        return self.store.get_bytes(key)

    def __getattr__(self, name):
        return getattr(self.store, name)


@STORES
def test_latest_batch_is_the_newest_commit_and_heat_reads_one_sequence(planted, kind):
    """The dashboard's batch viewer's data: the newest commit record's file of the hook, its ids and mask, and
    one sequence's heat (view --heat's values) from that sequence's rows only."""
    from vaultsh.explore.batch import LatestBatches, newest
    from vaultsh.explore.heat import heat

    data = planted["data"]
    store = CountingStore(planted[kind])
    latest = LatestBatches(Run(store, fx.RUN))
    commits = latest.refresh()
    rec, f = newest(commits, fx.HOOK)
    assert (rec.created, rec.index) == max((c.created, c.index) for c in commits)
    b = latest.load(fx.HOOK)
    n = data["keys"].index(b.key)
    assert b.key == f.key and b.n == fx.N
    assert b.ids == data["ids"][n].tolist() and b.mask == data["mask"][n].tolist()
    assert [s["document_index"] for s in b.sources] == [fx.DOC_BASE * n + s for s in range(fx.N)]
    assert latest.load("no.such.hook") is None
    s = fx.N - 1
    store.ranged = 0
    r = b.heat(s, fx.DIM)
    row_bytes = sum(t.row_bytes() for t in b.header.tensors.values())
    assert 0 < store.ranged <= row_bytes < b.header.file_size // fx.N  # one sequence's rows, nothing more
    want = heat(planted[kind], b.key, s, value_fn(dim=fx.DIM))
    assert [t.value for t in r.tokens] == [t.value for t in want.tokens] and r.colours() == want.colours()
    np.testing.assert_allclose([t.value for t in r.tokens], data["states"][n, s, :, fx.DIM], rtol=1e-6)
    assert b.heat(s).value == "norm"


def test_norms_png_decodes(planted, tmp_path):
    from PIL import Image

    out = tmp_path / "norms.png"
    rc, _, err = sh(planted["local"], f"cd {hook_key()}; norms --no-write --png {out}")
    assert rc == 0, err
    img = Image.open(out)
    img.load()
    assert img.format == "PNG" and img.size[0] == 640


# ---------------------------------------------------------------------------
# the shell and the CLI
# ---------------------------------------------------------------------------


def sh(store, commands: str, json_mode: bool = False):
    out, err = io.StringIO(), io.StringIO()
    rc = Shell(store=store, cwd="", stdout=out, stderr=err, json_mode=json_mode, interactive=False).run_lines(
        [commands]
    )
    return rc, out.getvalue(), err.getvalue()


@STORES
def test_shell_commands(planted, kind):
    store, data = planted[kind], planted["data"]
    rc, out, err = sh(store, f'cd {fx.RUN}; grep "{fx.QUERY}" --context 2 --json')
    assert rc == 0, err
    doc = json.loads(out)
    assert len(doc["matches"]) == 2 and doc["read_ratio"] <= 1.2
    rc, out, err = sh(store, f"cd {fx.RUN}; top {fx.HOOK} --dim {fx.DIM} -k 2 --json")
    assert rc == 0, err
    doc = json.loads(out)
    assert (
        data["keys"].index(doc["top"][0]["file"]),
        doc["top"][0]["sequence"],
        doc["top"][0]["position"],
    ) == fx.DIM_AT
    rc, out, err = sh(store, f"cd {hook_key()}; top --dim {fx.DIM} -k 2")
    assert rc == 0 and "q=1.000000" in out and "seq 3 pos 10" in out
    want = fx.source_of_token(*fx.DIM_AT)
    assert f"seq 3 pos 10 [{want['source']} doc {want['document_index']} @ token {want['token_offset']}]" in out
    rc, out, err = sh(store, f'cd {fx.RUN}; grep "{fx.QUERY}" --context 2')
    lines = [ln for ln in out.splitlines() if "zebra" in ln]
    assert rc == 0 and len(lines) == 2 and all(" [my_jsonl doc " in ln or " [notes doc " in ln for ln in lines), out
    rc, out, err = sh(store, f"cd {hook_key()}; view 0 0 --heat --norm --json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["scale"] == pytest.approx(300.0)
    assert list(doc) == ["file", "sequence", "value", "signed", "scale", "tokens", "png", "png_size"]
    rc, out, err = sh(store, f"cd {hook_key()}; sae-eval . {planted['saelens']} --tokens 100 --json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["tokens"] == 100
    keys = "source layout architecture d_in d_sae k normalize_activations rescale_acts_by_decoder_norm"
    assert list(doc["sae"]) == keys.split()


def test_shell_errors_are_one_line(planted):
    store = planted["local"]
    for cmd, needle in (
        (f"cd {hook_key()}; top --dim 99", "out of range"),
        (f"cd {fx.RUN}; grep ( --regex", "bad regular expression"),
        (f"cd {hook_key()}; top -k", "needs a value"),
        (f"cd {hook_key()}; top --dim x", "not a whole number"),
        (f"cd {hook_key()}; top --sae /nonexistent --feature 1", "no such SAE checkpoint"),
    ):
        rc, out, err = sh(store, cmd)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (cmd, err)


def test_a_file_truncated_after_listing_is_one_line_for_every_command(tmp_path, capsys):
    """A megabatch shorter than its commit record and header say (cut after the listing): each explore command
    names the file in one line (grep read short ranges into a numpy reshape error before)."""
    from vaultsh.cli import main

    store = LocalStore(tmp_path / "v")
    key = fx.build(store)["keys"][1]
    path = tmp_path / "v" / key
    path.write_bytes(path.read_bytes()[:-100])  # the mask's last bytes go
    hook = f"{tmp_path / 'v'}/{fx.RUN}/{fx.HOOK}"
    for argv in (
        ["grep", f"{tmp_path / 'v'}/{fx.RUN}", fx.QUERY],
        ["top", hook, "--dim", str(fx.DIM)],
        ["norms", hook, "--no-write"],
        ["view", str(path), "0", "--heat", "--norm"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0] and "truncated" in err[0], (argv, err)


def test_cli_grep_top_norms(planted, tmp_path, capsys):
    from vaultsh.cli import main

    root = planted["local"].root if hasattr(planted["local"], "root") else None
    base = str(root) if root else None
    assert base is not None
    assert main(["grep", f"{base}/{fx.RUN}", fx.QUERY, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["matches"]) == 2
    keys = planted["data"]["keys"]
    for m in doc["matches"]:
        assert m["source"] == fx.source_of_token(keys.index(m["file"]), m["sequence"], m["positions"][0])
    assert main(["top", f"{base}/{fx.RUN}/{fx.HOOK}", "--dim", str(fx.DIM), "-k", "1", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["top"][0]
    assert first["value"] == pytest.approx(50.0) and first["source"] == fx.source_of_token(*fx.DIM_AT)
    assert main(["norms", f"{base}/{fx.RUN}/{fx.HOOK}", "--no-write"]) == 0
    assert "outliers (norm >=" in capsys.readouterr().out
    assert main(["top", f"{base}/{fx.RUN}/{fx.HOOK}", "--sae", str(tmp_path / "x.pt"), "--feature", "0"]) == 2
    assert "no such SAE checkpoint" in capsys.readouterr().err
    (tmp_path / "x.pt").write_bytes(b"\x80\x04N.")
    assert main(["sae-eval", f"{base}/{fx.RUN}/{fx.HOOK}", str(tmp_path / "x.pt")]) == 2
    assert "pickle" in capsys.readouterr().err
    key = planted["data"]["keys"][0]
    assert main(["view", f"{base}/{key}", "0", "--heat", "--dim", "11", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"][0]["value"] == pytest.approx(300.0)


def test_cli_every_command_on_s3(planted, s3_env, tmp_path, capsys):
    """The five CLI commands on s3:// URIs (the loopback server), --json, against the planted answers."""
    from PIL import Image

    from vaultsh.cli import main

    data, base = planted["data"], f"s3://{planted['s3'].bucket}"
    keys = data["keys"]
    assert main(["grep", f"{base}/{fx.RUN}", fx.QUERY, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted((keys.index(m["file"]), m["sequence"]) for m in doc["matches"]) == [
        (f, s) for f, s, _ in fx.PHRASE_AT
    ]
    assert doc["read_ratio"] <= 1.2
    assert (
        main(
            [
                "top",
                f"{base}/{fx.RUN}",
                "--hook",
                fx.HOOK,
                "--sae",
                str(planted["saelens"]),
                "--feature",
                str(fx.FEATURE),
                "-k",
                "1",
                "--json",
            ]
        )
        == 0
    )
    t = json.loads(capsys.readouterr().out)["top"][0]
    assert (keys.index(t["file"]), t["sequence"], t["position"]) == fx.SAE_AT
    assert main(["sae-eval", f"{base}/{fx.RUN}/{fx.HOOK}", str(planted["sparsify"]), "--tokens", "50", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 50
    png = tmp_path / "h.png"
    f, s, p = fx.DIM_AT
    assert main(["view", f"{base}/{keys[f]}", str(s), "--heat", "--dim", str(fx.DIM), "--png", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"][p]["value"] == pytest.approx(50.0)
    img = Image.open(png)
    img.load()
    assert img.format == "PNG" and img.size[0] == 900
    assert main(["norms", f"{base}/{fx.RUN}/{fx.HOOK}", "--no-write", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (
        keys.index(doc["outliers"][0]["file"]),
        doc["outliers"][0]["sequence"],
        doc["outliers"][0]["position"],
    ) == fx.SINK_AT
    assert main(["top", f"{base}/{fx.RUN}/{fx.HOOK}", "--dim", "1", "-k", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-k 0" in err[0]


def test_long_scans_report_progress(planted):
    """Each scan calls its progress callback (the shell's and the CLI's bar) up to (total, total)."""
    store = planted["local"]
    calls = {}
    for name, run in (
        ("grep", lambda cb: grep(store, fx.RUN, "zzz-nowhere", progress=cb)),
        ("top", lambda cb: top(store, hook_key(), None, value_fn(dim=0), progress=cb)),
        ("norms", lambda cb: norms(store, hook_key(), None, write=False, progress=cb)),
        ("sae-eval", lambda cb: sae_eval(store, hook_key(), None, str(planted["saelens"]), tokens=500, progress=cb)),
    ):
        seen: list = []
        run(lambda done, total, seen=seen: seen.append((done, total)))
        calls[name] = seen
    for name in ("grep", "top", "norms"):
        assert calls[name] == [(i, fx.N_FILES) for i in range(1, fx.N_FILES + 1)], name
    assert calls["sae-eval"][-1] == (500, 500)


def test_registry_options_take_values():
    from vaultsh.shell.registry import REGISTRY, UsageError

    cmd = REGISTRY.get("grep")
    a = REGISTRY.parse(cmd, ["-n", "3", "--context=2", "--regex", "a b"])
    assert (a.n, a.context, a.regex, a.pattern, a.hook, a.i) == ("3", "2", True, "a b", None, False)
    with pytest.raises(UsageError, match="needs a value"):
        REGISTRY.parse(cmd, ["x", "--hook"])
    assert "[-n N]" in cmd.syntax
