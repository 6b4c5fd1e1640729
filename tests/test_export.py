"""`vaultsh export`: sharded Parquet that `datasets` loads back equal to the megabatches.

Runs are written with vaultsh.run / vaultsh.megabatch directly (what the
collector writes: committed safetensors megabatches), on a LocalStore and on
the loopback moto S3 server; the exports go to a local directory or to an S3
prefix and are read back with `datasets.load_dataset("parquet", ...)`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vaultsh.cli import main  # noqa: E402
from vaultsh.errors import UserError  # noqa: E402
from vaultsh.export import MANIFEST, ExportOptions, export  # noqa: E402
from vaultsh.export import core as export_core  # noqa: E402
from vaultsh.export.shuffle import allocate  # noqa: E402
from vaultsh.megabatch import read_megabatch, write_megabatch  # noqa: E402
from vaultsh.run import CommitRecord, FileRecord, Run, metadata_for  # noqa: E402
from vaultsh.store import LocalStore, open_store  # noqa: E402

RUN = "run1"
HOOK = "residuals_2"
N, T, D = 3, 6, 8
N_FILES = 5


def write_run(store, dtype=torch.bfloat16, n_files=N_FILES, uncommitted=0, labels=True, run=RUN, hook=HOOK, seed=0):
    """A committed run; returns the written megabatches' tensors in commit order."""
    r = Run(store, run)
    r.write_metadata(
        hook,
        metadata_for(
            batch_size=N,
            sequence_length=T,
            d_in=D,
            batches_per_file=1,
            dtype=dtype,
            hook=hook,
            site="resid_pre",
            layer=2,
            model="tiny-llama",
        ),
    )
    r.write_cfg({"model_name": "tiny-llama"})
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_files + uncommitted):
        states = (torch.randn(N, T, D, generator=g) * 3).to(dtype)
        ids = torch.randint(0, 49152, (N, T), generator=g)
        mask = torch.rand(N, T, generator=g) > 0.25
        mask[:, 0] = False  # BOS
        labs = (
            {"source": torch.arange(N) + 100 * i, "score": torch.rand(N, 2, generator=g).to(torch.bfloat16)}
            if labels
            else None
        )
        key = r.megabatch_key(hook, 0, i)
        size = write_megabatch(store, key, states, ids, mask, labels=labs, metadata={"hook": hook})
        if i < n_files:
            real = int(mask.sum())  # what the collector records: unmasked tokens
            r.commit(
                CommitRecord(0, i, i, i + 1, {hook: FileRecord(hook, key, size, None, N, real, 0, i)}, tokens=real)
            )
            out.append(read_megabatch(store, key))
    return out


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(store for writing the run, URI of its root, URI for the export's OUT)."""
    if request.param == "local":
        store = LocalStore(tmp_path / "vault")
        return store, str(tmp_path / "vault"), str(tmp_path / "out")
    request.getfixturevalue("s3_env")
    store = request.getfixturevalue("s3_store")
    return store, store.uri, f"{store.uri}/exports/x"


def local_copy(out_uri: str, dest: Path) -> Path:
    """OUT as a local directory (downloaded when it is an S3 prefix)."""
    if not out_uri.startswith("s3://"):
        return Path(out_uri)
    store = open_store(out_uri)
    dest.mkdir(parents=True, exist_ok=True)
    for o in store.iter_objects(""):
        store.get_file(o.key, dest / o.key)
    return dest


def load(out_dir: Path, tmp_path: Path):
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=f"{out_dir}/*.parquet", split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    return Loaded(ds)


class Loaded(dict):
    """A loaded split as numpy columns (`datasets` numpy format), plus its features."""

    def __init__(self, ds):
        super().__init__(ds.with_format("numpy")[:])
        self.features = ds.features
        self.column_names = ds.column_names
        self.n = len(ds)

    def __len__(self) -> int:
        return self.n


def parquet_names(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.glob("*.parquet"))


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["export", *map(str, argv), "-q"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# -- round trips ---------------------------------------------------------------
def test_sequences_round_trip_bf16_with_labels(where, tmp_path):
    store, root, out = where
    mbs = write_run(store)
    res = export(f"{root}/{RUN}/{HOOK}", out, ExportOptions(batches_per_shard=2))
    assert (res.shards_total, res.shards_written, res.complete) == (3, 3, True)
    local = local_copy(out, tmp_path / "dl")
    assert parquet_names(local) == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    ds = load(local, tmp_path)
    assert len(ds) == N_FILES * N
    assert str(ds.features["states"].feature.feature.dtype) == "float32"  # bf16 widened, exactly
    states, ids, mask = ds["states"], ds["input_ids"], ds["mask"]
    mb, seq = ds["megabatch"], ds["sequence"]
    for row in range(len(ds)):
        m = mbs[mb[row]]
        s = seq[row]
        assert np.array_equal(states[row], m.states[s].float().numpy())
        assert np.array_equal(ids[row], m.input_ids[s].numpy())
        assert np.array_equal(mask[row], m.mask[s].numpy())
        assert ds["label_source"][row] == m.labels["source"][s].item()
        assert np.array_equal(ds["label_score"][row], m.labels["score"][s].float().numpy())
    # in order: megabatch by megabatch
    assert list(mb) == [i for i in range(N_FILES) for _ in range(N)]
    card = (local / "README.md").read_text()
    for needle in (
        "tiny-llama",
        HOOK,
        f"d_model {D}, sequence length {T}",
        f"{N_FILES * N:,} in 3 of 3 shards",
        "widened exactly from the run's bfloat16",
        "split: train",
    ):
        assert needle in card


def test_tokens_round_trip_float32(tmp_path):
    store = LocalStore(tmp_path / "vault")
    mbs = write_run(store, dtype=torch.float32)
    out = tmp_path / "out"
    export(str(tmp_path / "vault" / RUN / HOOK), str(out), ExportOptions(mode="tokens", batches_per_shard=3))
    ds = load(out, tmp_path)
    real = sum(int(m.mask.sum()) for m in mbs)
    assert len(ds) == real
    states, ids, pos, mb, seq = ds["states"], ds["input_ids"], ds["position"], ds["megabatch"], ds["sequence"]
    assert states.shape == (real, D) and states.dtype == np.float32
    want_keys = [(i, s, t) for i, m in enumerate(mbs) for s in range(N) for t in range(T) if m.mask[s, t]]
    assert list(zip(mb.tolist(), seq.tolist(), pos.tolist())) == want_keys
    for row, (i, s, t) in enumerate(want_keys):
        assert np.array_equal(states[row], mbs[i].states[s, t].numpy())
        assert ids[row] == mbs[i].input_ids[s, t].item()
        assert ds["label_source"][row] == mbs[i].labels["source"][s].item()
    # the card's YAML names the shards: load_dataset(OUT) works too
    import datasets

    ds2 = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf2"))
    assert len(ds2) == real
    card = (out / "README.md").read_text()
    assert f"{real:,} unmasked tokens" in card and "one row per unmasked token" in card


def test_bf16_as_raw_bits_and_float16(tmp_path):
    store = LocalStore(tmp_path / "vault")
    mbs = write_run(store, labels=False)
    src = str(tmp_path / "vault" / RUN / HOOK)
    export(src, str(tmp_path / "bits"), ExportOptions(dtype="bfloat16", batches_per_shard=10))
    ds = load(tmp_path / "bits", tmp_path)
    assert str(ds.features["states"].feature.feature.dtype) == "uint16"
    bits = np.asarray(ds["states"], dtype=np.uint16)  # datasets' numpy format widens ints to int64
    want = torch.cat([m.states for m in mbs]).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bits, want)
    # the documented cast gives the bf16 values back exactly
    f32 = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(f32, torch.cat([m.states for m in mbs]).float().numpy())
    import pyarrow.parquet as pq

    field = pq.read_schema(next((tmp_path / "bits").glob("*.parquet"))).field("states")
    assert field.metadata[b"vaultsh.dtype"] == b"bfloat16"
    assert "raw uint16 bits" in (tmp_path / "bits" / "README.md").read_text()

    export(src, str(tmp_path / "half"), ExportOptions(dtype="float16", batches_per_shard=10))
    ds = load(tmp_path / "half", tmp_path)
    got = np.asarray(ds["states"], dtype=np.float32)
    assert np.array_equal(got, torch.cat([m.states for m in mbs]).half().float().numpy())


def test_label_columns_selected(tmp_path):
    store = LocalStore(tmp_path / "vault")
    write_run(store, n_files=2)
    export(str(tmp_path / "vault" / RUN / HOOK), str(tmp_path / "out"), ExportOptions(label_columns=("source",)))
    ds = load(tmp_path / "out", tmp_path)
    assert "label_source" in ds.column_names and "label_score" not in ds.column_names
    export(str(tmp_path / "vault" / RUN / HOOK), str(tmp_path / "none"), ExportOptions(label_columns=()))
    assert not [c for c in load(tmp_path / "none", tmp_path).column_names if c.startswith("label_")]


def test_activault_pt_run_without_commit_records(tmp_path):
    store = LocalStore(tmp_path / "vault")
    r = Run(store, "old")
    r.write_metadata(
        HOOK, metadata_for(batch_size=N, sequence_length=T, d_in=D, dtype=torch.float16, hook=HOOK, format="pt")
    )
    g = torch.Generator().manual_seed(1)
    want = []
    for j in range(2):
        s = torch.randn(N, T, D, generator=g).half()
        ids = torch.randint(0, 1000, (N, T), generator=g)
        write_megabatch(store, f"old/{HOOK}/0a1b2c3d--{j}_0.saved.pt", s, ids, fmt="pt")
        want.append((s, ids))
    export(str(tmp_path / "vault" / "old" / HOOK), str(tmp_path / "out"), ExportOptions())
    ds = load(tmp_path / "out", tmp_path)
    assert str(ds.features["states"].feature.feature.dtype) == "float16"
    assert np.array_equal(np.asarray(ds["states"], dtype=np.float32), torch.cat([s for s, _ in want]).float().numpy())
    assert np.array_equal(ds["input_ids"], torch.cat([i for _, i in want]).numpy())
    assert ds["mask"].all()


# -- shards, resume, growth ----------------------------------------------------
def test_max_shards_then_finish(tmp_path, capsys):
    store = LocalStore(tmp_path / "vault")
    write_run(store)
    src, out = tmp_path / "vault" / RUN / HOOK, tmp_path / "out"
    rc, stdout, _ = cli(capsys, src, out, "--batches-per-shard", 2, "--max-shards", 2)
    assert rc == 0
    assert parquet_names(out) == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet"]
    assert "1 shard(s) left" in stdout
    assert len(load(out, tmp_path)) == 4 * N
    assert "in 2 of 3 shards" in (out / "README.md").read_text()
    rc, stdout, _ = cli(capsys, src, out, "--batches-per-shard", 2)
    assert rc == 0 and "resumed: wrote 1 shard(s)" in stdout and "(3 of 3 shards done)" in stdout
    ds = load(out, tmp_path / "again")
    keys = Counter(zip(ds["megabatch"].tolist(), ds["sequence"].tolist()))
    assert len(keys) == N_FILES * N and set(keys.values()) == {1}


class _Boom(KeyboardInterrupt):
    pass


def _interrupt_after(mp: pytest.MonkeyPatch, n_loads: int):
    """Make the n-th megabatch load raise, as if the user pressed Ctrl-C there."""
    real = export_core.load
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n_loads:
            raise _Boom()
        return real(*a, **kw)

    mp.setattr(export_core, "load", flaky)
    return calls


def test_resume_after_interrupt_has_no_duplicates(where, tmp_path):
    store, root, out = where
    write_run(store)
    src = f"{root}/{RUN}/{HOOK}"
    opts = ExportOptions(mode="tokens", batches_per_shard=2)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        _interrupt_after(mp, 4)  # shard 0 (files 0, 1) done, shard 1 half-written
        export(src, out, opts, workers=1)
    outs = open_store(out)
    names = sorted(o.key for o in outs.iter_objects(""))
    assert "train-00000-of-00003.parquet" in names and "train-00001-of-00003.parquet" not in names
    assert not [n for n in names if "tmp" in n or n.startswith(".")]  # no half-written shard left behind
    manifest = json.loads(outs.get_bytes(MANIFEST))
    assert list(manifest["finished"]) == ["train-00000-of-00003.parquet"]
    res = export(src, out, opts, workers=1)
    assert res.resumed and res.shards_written == 2 and res.complete
    ds = load(local_copy(out, tmp_path / "dl"), tmp_path)
    keys = Counter(zip(ds["megabatch"].tolist(), ds["sequence"].tolist(), ds["position"].tolist()))
    assert set(keys.values()) == {1}
    mbs = [read_megabatch(store, Run(store, RUN).megabatch_key(HOOK, 0, i)) for i in range(N_FILES)]
    assert len(keys) == sum(int(m.mask.sum()) for m in mbs)


def test_growing_run_exports_committed_only_and_says_so(tmp_path, capsys):
    store = LocalStore(tmp_path / "vault")
    write_run(store, n_files=3, uncommitted=2)
    src, out = tmp_path / "vault" / RUN / HOOK, tmp_path / "out"
    rc, stdout, stderr = cli(capsys, src, out)
    assert rc == 0
    assert "still being written: 2 uncommitted file(s)" in stderr and "exporting the 3 committed" in stderr
    assert len(load(out, tmp_path)) == 3 * N
    # two more get committed; the finished export stays as planned and says why
    r = Run(store, RUN)
    for i in (3, 4):
        key = r.megabatch_key(HOOK, 0, i)
        r.commit(
            CommitRecord(0, i, i, i + 1, {HOOK: FileRecord(HOOK, key, store.head(key).size, None, N, N * T, 0, i)})
        )
    rc, stdout, stderr = cli(capsys, src, out)
    assert rc == 0 and "2 megabatch(es) committed since this export started are not part of it" in stderr
    assert len(load(out, tmp_path / "b")) == 3 * N


# -- shuffle -------------------------------------------------------------------
def test_global_shuffle_is_a_permutation(tmp_path):
    store = LocalStore(tmp_path / "vault")
    mbs = write_run(store, n_files=6)
    src = str(tmp_path / "vault" / RUN / HOOK)
    export(src, str(tmp_path / "a"), ExportOptions(mode="tokens", batches_per_shard=2, shuffle=True, seed=7))
    ds = load(tmp_path / "a", tmp_path)
    keys = list(zip(ds["megabatch"].tolist(), ds["sequence"].tolist(), ds["position"].tolist()))
    want = [(i, s, t) for i, m in enumerate(mbs) for s in range(N) for t in range(T) if m.mask[s, t]]
    assert sorted(keys) == want and len(keys) == len(want)  # every token exactly once
    assert keys != want  # and not in collection order
    states = ds["states"]
    for row, (i, s, t) in enumerate(keys):  # each row still carries its own values
        assert np.array_equal(states[row], mbs[i].states[s, t].float().numpy())
    # across shards: the first shard mixes rows from megabatches other than its own two
    first = load_file(tmp_path / "a" / "train-00000-of-00003.parquet")
    assert set(first["megabatch"]) - {0, 1}
    # seeded: the same seed gives the same rows in the same order, another seed another order
    export(src, str(tmp_path / "b"), ExportOptions(mode="tokens", batches_per_shard=2, shuffle=True, seed=7))
    export(src, str(tmp_path / "c"), ExportOptions(mode="tokens", batches_per_shard=2, shuffle=True, seed=8))
    kb = list(zip(*(load(tmp_path / "b", tmp_path / "b")[c].tolist() for c in ("megabatch", "sequence", "position"))))
    kc = list(zip(*(load(tmp_path / "c", tmp_path / "c")[c].tolist() for c in ("megabatch", "sequence", "position"))))
    assert kb == keys and kc != keys and sorted(kc) == want


def load_file(path: Path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


def test_shuffled_resume_matches_uninterrupted(tmp_path):
    store = LocalStore(tmp_path / "vault")
    write_run(store, n_files=6)
    src = str(tmp_path / "vault" / RUN / HOOK)
    opts = ExportOptions(mode="sequences", batches_per_shard=2, shuffle=True, seed=3)
    export(src, str(tmp_path / "ref"), opts)
    export(src, str(tmp_path / "part"), opts, max_shards=1)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        _interrupt_after(mp, 3)  # the second run dies during its read pass
        export(src, str(tmp_path / "part"), opts)
    export(src, str(tmp_path / "part"), opts)
    for name in parquet_names(tmp_path / "ref"):
        a, b = load_file(tmp_path / "ref" / name), load_file(tmp_path / "part" / name)
        assert a["megabatch"] == b["megabatch"] and a["sequence"] == b["sequence"] and a["states"] == b["states"]
    assert parquet_names(tmp_path / "ref") == parquet_names(tmp_path / "part")


def test_shuffle_in_memory_and_spilled_to_disk_write_the_same_shards(tmp_path, monkeypatch, capsys):
    """The pass-1 pieces stay in memory when they fit; spilled to --tmp-dir otherwise; the rows are the same."""
    from vaultsh.export import shuffle

    store = LocalStore(tmp_path / "vault")
    write_run(store, n_files=6)
    src = str(tmp_path / "vault" / RUN / HOOK)
    opts = ExportOptions(mode="tokens", batches_per_shard=2, shuffle=True, seed=5)
    seen: list[bool] = []
    real_add = shuffle.Spill.add
    monkeypatch.setattr(shuffle.Spill, "add", lambda self, *a: (seen.append(self.in_memory), real_add(self, *a))[1])
    export(src, str(tmp_path / "mem"), opts)
    assert seen and all(seen)
    seen.clear()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    files_seen: list[str] = []
    real_open = open

    def spying_open(path, *a, **kw):
        if str(path).startswith(str(scratch)):
            files_seen.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", spying_open)
    export(src, str(tmp_path / "disk"), opts, tmp_dir=str(scratch), shuffle_memory=0)
    monkeypatch.setattr("builtins.open", real_open)
    assert seen and not any(seen)
    assert any(f.endswith(".spill") for f in files_seen) and list(scratch.iterdir()) == []  # used, then cleaned up
    assert parquet_names(tmp_path / "mem") == parquet_names(tmp_path / "disk")
    for name in parquet_names(tmp_path / "mem"):
        a, b = load_file(tmp_path / "mem" / name), load_file(tmp_path / "disk" / name)
        assert a == b
    # scratch problems are one-line errors: a missing --tmp-dir, a disk too small for the spill
    msg = _one_line_error(*cli(capsys, src, tmp_path / "o1", "--shuffle", "--tmp-dir", tmp_path / "nope")[::2])
    assert "--tmp-dir" in msg and "no such directory" in msg
    monkeypatch.setattr(shuffle, "memory_budget", lambda: 0)
    monkeypatch.setattr(shuffle.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    msg = _one_line_error(*cli(capsys, src, tmp_path / "o2", "--shuffle", "--tmp-dir", scratch)[::2])
    assert "local scratch space" in msg and "free" in msg


def test_allocate_deals_every_row_once():
    rng = np.random.default_rng(0)
    for caps in ([5, 0, 7, 3], [10**9, 2 * 10**9, 5]):  # exact draw, and the large-count branch
        remaining = np.array(caps, dtype=np.int64)
        total = 0
        for r in (4, 4, 3) if caps[0] == 5 else (10**6, 10**6):
            c = allocate(rng, remaining, r)
            assert c.sum() == r and (c >= 0).all() and (c <= remaining).all()
            remaining -= c
            total += r
        assert remaining.sum() == sum(caps) - total
    with pytest.raises(ValueError):
        allocate(rng, np.array([1, 1]), 3)


# -- bad input -----------------------------------------------------------------
def _one_line_error(rc: int, stderr: str) -> str:
    assert rc == 2
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vaultsh: error: "), stderr
    return lines[0]


def test_cli_errors_are_one_line(tmp_path, capsys):
    store = LocalStore(tmp_path / "vault")
    write_run(store, n_files=2)
    Run(store, "empty").write_metadata(HOOK, {"hook": HOOK})
    write_run(store, n_files=0, uncommitted=1, run="pending")  # a worker is still writing its first megabatch
    write_run(store, n_files=1, run="pending", hook="mlp_2")  # while another hook's is committed
    hook = tmp_path / "vault" / RUN / HOOK

    msg = _one_line_error(*cli(capsys, tmp_path / "vault" / RUN, tmp_path / "o1")[::2])
    assert "not a hook directory" in msg and f"hooks: {HOOK}" in msg
    msg = _one_line_error(*cli(capsys, tmp_path / "vault" / "nope" / HOOK, tmp_path / "o1")[::2])
    assert "no such file or directory" in msg
    msg = _one_line_error(*cli(capsys, tmp_path / "vault" / "empty" / HOOK, tmp_path / "o1")[::2])
    assert "no committed megabatches" in msg
    msg = _one_line_error(*cli(capsys, tmp_path / "vault" / "pending" / HOOK, tmp_path / "o1")[::2])
    assert "no committed megabatches" in msg and "1 uncommitted" in msg
    msg = _one_line_error(*cli(capsys, hook, tmp_path / "o1", "--label-columns", "source", "topic")[::2])
    assert "unknown label column 'topic'" in msg and "score, source" in msg
    assert not (tmp_path / "o1" / MANIFEST).exists()

    assert cli(capsys, hook, tmp_path / "o2")[0] == 0
    before = (tmp_path / "o2" / MANIFEST).read_bytes()
    msg = _one_line_error(*cli(capsys, hook, tmp_path / "o2", "--tokens")[::2])
    assert "already holds a different export" in msg and "mode='sequences'" in msg
    assert (tmp_path / "o2" / MANIFEST).read_bytes() == before

    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "data.parquet").write_bytes(b"PAR1")
    msg = _one_line_error(*cli(capsys, hook, tmp_path / "o3")[::2])
    assert "no vaultsh export manifest describes" in msg
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / MANIFEST).write_text("{not json")
    msg = _one_line_error(*cli(capsys, hook, tmp_path / "o4")[::2])
    assert "not a valid export manifest" in msg
    msg = _one_line_error(*cli(capsys, hook, tmp_path / "o5", "--batches-per-shard", 0)[::2])
    assert "--batches-per-shard 0" in msg


def test_api_rejects_bad_options(tmp_path):
    store = LocalStore(tmp_path / "vault")
    write_run(store, n_files=1)
    src = str(tmp_path / "vault" / RUN / HOOK)
    for opts, needle in (
        (ExportOptions(mode="words"), "mode"),
        (ExportOptions(dtype="int8"), "--dtype"),
        (ExportOptions(compression="rar"), "--compression"),
    ):
        with pytest.raises(UserError, match=needle):
            export(src, str(tmp_path / "o"), opts)


# -- durability, resume checks, plan shortcuts ---------------------------------------
@pytest.mark.parametrize("records", ["collector", "foreign"])
def test_card_counts_unmasked_tokens(tmp_path, capsys, records):
    """From the commit records when they hold the collector's counts; else counted as the files are written."""
    store = LocalStore(tmp_path / "vault")
    mbs = write_run(store)
    if records == "foreign":
        _set_record_tokens(store, range(N_FILES), N * T)
    src, out = tmp_path / "vault" / RUN / HOOK, tmp_path / "out"
    assert cli(capsys, src, out, "--batches-per-shard", 2, "--max-shards", 1)[0] == 0
    total = sum(int(m.mask.sum()) for m in mbs)
    first_two = sum(int(m.mask.sum()) for m in mbs[:2])
    card = (out / "README.md").read_text()
    if records == "collector":
        assert f"{total:,} unmasked tokens" in card and "so far" not in card
    else:
        assert f"{first_two:,} unmasked tokens in the 2 megabatches exported so far" in card
    assert cli(capsys, src, out, "--batches-per-shard", 2)[0] == 0
    card = (out / "README.md").read_text()
    assert f"{total:,} unmasked tokens" in card and "so far" not in card
    files = json.loads((out / MANIFEST).read_text())["plan"]["files"]
    assert [f["tokens"] for f in files] == [int(m.mask.sum()) for m in mbs]


@pytest.mark.parametrize("damage", ["empty", "short", "no footer", "deleted"])
def test_resume_rewrites_a_finished_shard_cut_short(tmp_path, damage):
    """What a power loss can leave of a shard written without --fsync: the next run writes it again."""
    store = LocalStore(tmp_path / "vault")
    write_run(store)
    src, out = str(tmp_path / "vault" / RUN / HOOK), tmp_path / "out"
    export(src, str(out), ExportOptions(batches_per_shard=2))
    want = load(out, tmp_path / "a")
    shard = out / "train-00001-of-00003.parquet"
    data = shard.read_bytes()
    if damage == "deleted":
        shard.unlink()
    else:
        shard.write_bytes({"empty": b"", "short": data[: len(data) // 2], "no footer": data[:-4] + b"\0\0\0\0"}[damage])
    res = export(src, str(out), ExportOptions(batches_per_shard=2))
    assert (res.shards_written, res.complete) == (1, True)
    assert any("not the complete shard" in n for n in res.notes) == (damage != "deleted")
    assert shard.read_bytes() == data
    got = load(out, tmp_path / "b")
    assert np.array_equal(got["states"], want["states"]) and np.array_equal(got["megabatch"], want["megabatch"])


def _fsynced_names(mp: pytest.MonkeyPatch) -> list[str]:
    """Record the file name behind every os.fsync from now on."""
    real, names = os.fsync, []

    def spy(fd):
        names.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    mp.setattr(os, "fsync", spy)
    return names


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name the fsynced files")
def test_fsync_only_when_asked(tmp_path, capsys):
    store = LocalStore(tmp_path / "vault")
    write_run(store, n_files=2)
    src = tmp_path / "vault" / RUN / HOOK
    with pytest.MonkeyPatch.context() as mp:
        names = _fsynced_names(mp)
        assert cli(capsys, src, tmp_path / "plain")[0] == 0
        assert not [n for n in names if ".parquet" in n]
        assert any(MANIFEST in n for n in names)  # the manifest is always durable
        names.clear()
        assert cli(capsys, src, tmp_path / "durable", "--fsync")[0] == 0
        assert [n for n in names if n.startswith(".train-00000-of-00001.parquet.")]
    assert len(load(tmp_path / "durable", tmp_path)) == 2 * N


def test_a_file_of_another_shape_stops_the_export_there(tmp_path, capsys):
    store = LocalStore(tmp_path / "vault")
    write_run(store, n_files=3, labels=False)
    r = Run(store, RUN)
    key = r.megabatch_key(HOOK, 0, 3)
    size = write_megabatch(store, key, torch.randn(N, T, D + 1), torch.zeros(N, T, dtype=torch.long))
    r.commit(CommitRecord(0, 3, 3, 4, {HOOK: FileRecord(HOOK, key, size, None, N, N * T, 0, 3)}))
    src, out = tmp_path / "vault" / RUN / HOOK, tmp_path / "out"
    # sequences mode plans from the commit records and the first header: the odd file stops it when reached
    msg = _one_line_error(*cli(capsys, src, out, "--batches-per-shard", 1, "--workers", 1)[::2])
    assert key.rsplit("/", 1)[-1] in msg and "one export needs one shape" in msg
    assert parquet_names(out) == [f"train-0000{i}-of-00004.parquet" for i in range(3)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # tokens mode probes every file first: nothing is written
    msg = _one_line_error(*cli(capsys, src, tmp_path / "out2", "--tokens")[::2])
    assert key.rsplit("/", 1)[-1] in msg and "one export needs one shape" in msg
    assert not (tmp_path / "out2").exists() or not parquet_names(tmp_path / "out2")


def test_a_commit_record_that_miscounts_sequences_is_named(tmp_path, capsys):
    store = LocalStore(tmp_path / "vault")
    write_run(store, n_files=2, labels=False)
    r = Run(store, RUN)
    f = r.iter_commits()[1].files[HOOK]
    # rewrite record 1 with a wrong sequence count (what a hand-edited or foreign record could say)
    key = [o.key for o in store.iter_objects(r.commits_prefix())][1]
    body = json.loads(store.get_bytes(key))
    body["files"][HOOK]["n_sequences"] = N + 1
    store.put_bytes(key, json.dumps(body).encode())
    msg = _one_line_error(
        *cli(capsys, tmp_path / "vault" / RUN / HOOK, tmp_path / "out", "--batches-per-shard", 1)[::2]
    )
    assert f.key.rsplit("/", 1)[-1] in msg and f"{N} sequences, its commit record says {N + 1}" in msg


def _set_record_tokens(store, which, tokens):
    """Rewrite commit records `which` (indices) to claim `tokens` unmasked tokens for HOOK."""
    keys = [o.key for o in store.iter_objects(Run(store, RUN).commits_prefix())]
    for i in which:
        body = json.loads(store.get_bytes(keys[i]))
        body["files"][HOOK]["n_tokens"] = tokens
        store.put_bytes(keys[i], json.dumps(body).encode())


def test_records_of_another_meaning_fall_back_to_reading_every_mask(tmp_path):
    """Records whose n_tokens counts every position (not the collector's unmasked count) are not trusted."""
    store = LocalStore(tmp_path / "vault")
    mbs = write_run(store, labels=False)
    _set_record_tokens(store, range(N_FILES), N * T)
    res = export(str(tmp_path / "vault" / RUN / HOOK), str(tmp_path / "out"), ExportOptions(mode="tokens"))
    assert res.rows_written == sum(int(m.mask.sum()) for m in mbs)
    files = json.loads((tmp_path / "out" / MANIFEST).read_text())["plan"]["files"]
    assert [f["tokens"] for f in files] == [int(m.mask.sum()) for m in mbs]


def test_a_record_that_miscounts_unmasked_tokens_is_named(tmp_path, capsys):
    store = LocalStore(tmp_path / "vault")
    mbs = write_run(store, labels=False)
    _set_record_tokens(store, [2], int(mbs[2].mask.sum()) + 1)
    msg = _one_line_error(
        *cli(
            capsys,
            tmp_path / "vault" / RUN / HOOK,
            tmp_path / "out",
            "--tokens",
            "--batches-per-shard",
            1,
            "--workers",
            1,
        )[::2]
    )
    name = Run(store, RUN).megabatch_key(HOOK, 0, 2).rsplit("/", 1)[-1]
    assert name in msg and "unmasked tokens" in msg and "commit record" in msg
    assert parquet_names(tmp_path / "out") == ["train-00000-of-00005.parquet", "train-00001-of-00005.parquet"]


def test_export_to_s3_streams_multipart_shards_and_an_interrupt_leaves_no_parts(
    tmp_path, s3_env, s3_store, s3_admin, monkeypatch
):
    """Shards larger than a part go up as streamed multipart uploads; Ctrl-C mid-shard leaves no object and no
    orphaned parts, and the resumed export is complete and exact."""
    from vaultsh.store.s3 import S3Store

    mib = 1 << 20
    monkeypatch.setattr(
        S3Store.__init__,
        "__kwdefaults__",
        {**S3Store.__init__.__kwdefaults__, "multipart_threshold": 5 * mib, "multipart_chunksize": 5 * mib},
    )
    store = LocalStore(tmp_path / "vault")
    r = Run(store, RUN)
    r.write_metadata(HOOK, metadata_for(batch_size=8, sequence_length=64, d_in=1024, hook=HOOK))
    g = torch.Generator().manual_seed(1)
    mbs = []
    for i in range(8):  # 2 MiB of states each: 4 per shard -> 8 MiB shards, parts of 5 + 3 MiB
        key = r.megabatch_key(HOOK, 0, i)
        states, ids = torch.randn(8, 64, 1024, generator=g), torch.randint(0, 1000, (8, 64), generator=g)
        size = write_megabatch(store, key, states, ids)
        r.commit(CommitRecord(0, i, i, i + 1, {HOOK: FileRecord(HOOK, key, size, None, 8, 8 * 64, 0, i)}))
        mbs.append(states)
    from vaultsh.store import s3stream

    begun = []
    real_begin = s3stream.MultipartSink._begin
    monkeypatch.setattr(s3stream.MultipartSink, "_begin", lambda self: (begun.append(self.key), real_begin(self))[1])
    src, out = str(tmp_path / "vault" / RUN / HOOK), f"{s3_store.uri}/exports/big"
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        _interrupt_after(mp, 4)  # in shard 0, after three megabatches (6 MiB) went into its upload
        export(src, out, ExportOptions(batches_per_shard=4), workers=1)
    assert begun == ["exports/big/train-00000-of-00002.parquet"]  # a multipart upload had started ...
    assert s3_admin.list_multipart_uploads(Bucket=s3_store.bucket).get("Uploads", []) == []  # ... and was aborted
    assert not [o.key for o in s3_store.iter_objects("exports/big") if o.key.endswith(".parquet")]
    res = export(src, out, ExportOptions(batches_per_shard=4), workers=1)
    assert res.complete and res.shards_written == 2
    etags = [
        s3_admin.head_object(Bucket=s3_store.bucket, Key=f"exports/big/train-0000{i}-of-00002.parquet")["ETag"]
        for i in range(2)
    ]
    assert all(e.strip('"').endswith("-2") for e in etags), etags  # streamed as two parts each
    assert main(["verify", out, "--json"]) == 0  # footers read by ranged GETs on S3
    ds = load(local_copy(out, tmp_path / "dl"), tmp_path)
    for row in range(len(ds)):
        assert np.array_equal(ds["states"][row], mbs[ds["megabatch"][row]][ds["sequence"][row]].numpy())


def test_verify_checks_an_export_read_only(tmp_path, capsys):
    """`vaultsh verify OUT`: finished shards whole, row counts and fingerprint from each footer, strays named."""
    store = LocalStore(tmp_path / "vault")
    write_run(store)
    src, out = tmp_path / "vault" / RUN / HOOK, tmp_path / "out"
    assert cli(capsys, src, out, "--batches-per-shard", 2, "--max-shards", 2)[0] == 0
    rc = main(["verify", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "2 of 3 shards finished" in text and f"{4 * N:,} rows" in text and "not written yet" in text
    rc = main(["verify", str(out), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["kind"] == "export" and doc["ok"] and doc["rows"] == 4 * N
    assert list(doc) == ["uri", "kind", "ok", "shards_total", "shards_finished", "rows", "bytes", "problems"]
    # damage: one shard cut short, one replaced by another export's shard of the same size, a stray file
    first, second = out / "train-00000-of-00003.parquet", out / "train-00001-of-00003.parquet"
    before = {p: p.read_bytes() for p in (first, second)}
    first.write_bytes(before[first][: len(before[first]) // 2])
    import shutil

    shutil.copytree(tmp_path / "vault", tmp_path / "vaulx")  # the same run elsewhere: a different export, same sizes
    other = tmp_path / "other"
    export(str(tmp_path / "vaulx" / RUN / HOOK), str(other), ExportOptions(batches_per_shard=2), max_shards=2)
    foreign = (other / second.name).read_bytes()
    assert len(foreign) == len(before[second])
    second.write_bytes(foreign)
    (out / "extra.parquet").write_bytes(b"PAR1")
    rc = main(["verify", str(out), "--json"])
    doc = json.loads(capsys.readouterr().out)
    checks = {p["uri"].rsplit("/", 1)[-1]: p["check"] for p in doc["problems"]}
    assert rc == 1 and checks == {first.name: "cut", second.name: "foreign", "extra.parquet": "stray"}
    assert first.read_bytes() == before[first][: len(before[first]) // 2]  # read-only: nothing repaired
