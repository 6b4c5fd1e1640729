"""The streaming reader (vaultsh.reader) on LocalStore and on moto's S3 server over loopback.

Most tests use small synthetic runs written through the real writers
(`write_megabatch`, `Run.commit`, `metadata_for`, `RunningStats`); the
round-trip tests read a run the real collector wrote (tiny random Llama, real
tokenizer), copied byte for byte into the S3 bucket for the S3 variant.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import threading
import time
import uuid
import warnings
import weakref

import numpy as np
import pytest
import torch

from vaultsh.errors import FormatError, StoreError, UserError
from vaultsh.megabatch import read_megabatch, write_megabatch
from vaultsh.reader import ActivationDataset, ActivationReader, S3RCache, SkippedFileWarning
from vaultsh.reader.buffers import BufferPool
from vaultsh.run import CommitRecord, FileRecord, Run, metadata_for
from vaultsh.stats import RunningStats
from vaultsh.store import LocalStore
from vaultsh.testing.faultproxy import FaultProxy

HOOK = "residuals_3"
N, T, D = 4, 8, 16


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def make_run(
    store,
    run_name="syn",
    hook=HOOK,
    n_files=6,
    n=N,
    t=T,
    d=D,
    dtype=torch.float32,
    seed=0,
    commit=True,
    fmt="safetensors",
    short_last=False,
):
    """A run with `n_files` committed megabatches of random states and ~30% masked tokens.

    Returns the keys in commit order. Every file gets a commit record with its
    true size, sha256, and counts, and statistics.json covers the unmasked tokens.
    """
    run = Run(store, run_name)
    run.write_metadata(
        hook,
        metadata_for(
            batch_size=2, sequence_length=t, d_in=d, batches_per_file=n // 2, dtype=dtype, hook=hook, format=fmt
        ),
    )
    g = torch.Generator().manual_seed(seed)
    stats = RunningStats(d)
    keys = []
    for i in range(n_files):
        rows = n - 1 if short_last and i == n_files - 1 else n
        states = (torch.randn(rows, t, d, generator=g) * 3 + 1.5).to(dtype)
        ids = torch.randint(0, 50_000, (rows, t), generator=g)
        mask = torch.rand(rows, t, generator=g) > 0.3
        mask[:, 0] = False  # a BOS position, as the collector masks it
        key = run.megabatch_key(hook, 0, i, fmt)
        size = write_megabatch(store, key, states, ids, mask, metadata={"hook": hook, "megabatch": i}, fmt=fmt)
        sha = hashlib.sha256(store.get_bytes(key)).hexdigest()
        stats.update(states, mask)
        if commit:
            run.commit(
                CommitRecord(
                    worker=0,
                    index=i,
                    batch_start=2 * i,
                    batch_end=2 * i + 2,
                    files={hook: FileRecord(hook, key, size, sha, rows, rows * t, 0, i)},
                    tokens=rows * t,
                )
            )
        keys.append(key)
    run.write_statistics(hook, stats)
    return keys


def expected(store, keys):
    return [read_megabatch(store, k) for k in keys]


def ident(states: torch.Tensor) -> str:
    return hashlib.sha256(states.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def idents(batches) -> list[str]:
    return [ident(b["states"]) for b in batches]


def real_rows(mbs) -> tuple[torch.Tensor, torch.Tensor]:
    """(states, input_ids) of every unmasked token, in file order."""
    s = torch.cat([mb.states.reshape(-1, mb.states.shape[-1])[mb.mask.reshape(-1)] for mb in mbs])
    i = torch.cat([mb.input_ids.reshape(-1)[mb.mask.reshape(-1)] for mb in mbs])
    return s, i


def sorted_rows(x: torch.Tensor) -> np.ndarray:
    a = x.double().numpy()
    return a[np.lexsort(a.T[::-1])]


def reader_for(store, source="syn/" + HOOK, **kw) -> ActivationReader:
    kw.setdefault("connections", 4)
    return ActivationReader(source, store=store, **kw)


# --------------------------------------------------------------------------
# a run the real collector wrote
# --------------------------------------------------------------------------

COLLECT_HOOKS = ["residuals_0", "mlp_2"]


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """(store root, run name): a complete collector run (3 megabatches per hook) plus one uncommitted file."""
    pytest.importorskip("transformers")
    from .modelfixtures import collect_tiny_run

    run_name = "tiny.reader"
    _, root, result = collect_tiny_run(
        tmp_path_factory,
        run_name,
        {"data_key": "pydoc", "n_batches": 6, "seq_length": 32, "batch_size": 2, "seed": 7, "clean_added_tokens": True},
        {"batches_per_upload": 2, "hooks": COLLECT_HOOKS, "max_queued_megabatches": 2},
    )
    assert result["status"] == "complete" and result["megabatches"] == 3
    store = LocalStore(root)
    run = Run(store, run_name)
    # A megabatch uploaded but never committed (the worker died before its commit record).
    for hook in COLLECT_HOOKS:
        last = run.committed_files(hook)[-1]
        store.put_bytes(run.megabatch_key(hook, 0, 3), store.get_bytes(last.key))
    return root, run_name


def copy_store(src: LocalStore, dst) -> None:
    for obj in src.iter_objects(""):
        dst.put_bytes(obj.key, src.get_bytes(obj.key))


@pytest.fixture
def collected_store(request, collected):
    root, run_name = collected
    local = LocalStore(root)
    if request.param == "local":
        return local, run_name
    s3 = request.getfixturevalue("s3_store")
    copy_store(local, s3)
    return s3, run_name


@pytest.mark.parametrize("collected_store", ["local", "s3"], indirect=True)
def test_round_trip_of_what_the_collector_wrote(collected_store):
    store, run_name = collected_store
    run = Run(store, run_name)
    for hook in COLLECT_HOOKS:
        files = run.committed_files(hook)
        assert len(files) == 3 and len(run.uncommitted_files(hook)) == 1
        mbs = expected(store, [f.key for f in files])
        with ActivationReader(f"{run_name}/{hook}", store=store, verify="sha256") as reader:
            got = list(reader)
            st = reader.stats
        assert len(got) == 3  # the uncommitted 4th file is never read
        for b, mb in zip(got, mbs):
            assert b["states"].dtype == mb.states.dtype == torch.float32
            assert torch.equal(b["states"], mb.states)
            assert torch.equal(b["input_ids"], mb.input_ids)
            assert torch.equal(b["mask"], mb.mask)
        assert st.files_read == 3 and st.files_skipped == 0
        assert st.bytes_downloaded == sum(f.size for f in files)
        assert st.tokens == sum(int(mb.mask.sum()) for mb in mbs)
        assert st.positions == sum(mb.mask.numel() for mb in mbs)


def test_collector_run_by_path_and_uri(collected, s3_env, s3_bucket, s3_server):
    """The same run addressed as a local path and as an s3:// URI (S3_ENDPOINT_URL)."""
    from vaultsh.store.s3 import S3Store

    root, run_name = collected
    local = LocalStore(root)
    copy_store(local, S3Store(s3_bucket, endpoint_url=s3_server))
    files = Run(local, run_name).committed_files("mlp_2")
    want = [ident(mb.states) for mb in expected(local, [f.key for f in files])]
    assert idents(ActivationReader(str(root / run_name / "mlp_2"))) == want
    assert idents(ActivationReader(f"s3://{s3_bucket}/{run_name}/mlp_2")) == want
    # token mode over the real masks: exactly the unmasked tokens, in order
    rows = torch.cat(
        [b["states"] for b in ActivationReader(str(root / run_name / "mlp_2"), tokens=True, batch_size=13)]
    )
    s, _ = real_rows(expected(local, [f.key for f in files]))
    assert torch.equal(rows, s)


# --------------------------------------------------------------------------
# committed files only; Activault runs
# --------------------------------------------------------------------------


def test_only_committed_megabatches_are_read(store):
    keys = make_run(store, n_files=4)
    extra = make_run(store, run_name="other", n_files=2, seed=9, commit=False)
    run = Run(store, "syn")
    # a valid megabatch in the hook directory that no commit record names
    store.put_bytes(run.megabatch_key(HOOK, 1, 0), store.get_bytes(extra[0]))
    reader = reader_for(store)
    got = list(reader)
    assert idents(got) == [ident(mb.states) for mb in expected(store, keys)]
    assert reader.stats.files_total == 4


@pytest.mark.parametrize("fmt_name", ["activault-pt"])
def test_activault_saved_pt_run_is_readable(store, fmt_name):
    """Activault's layout: {uuid}--{n}_{job}.saved.pt files, metadata.json, no commit records."""
    run = Run(store, "llama3.3_70b")
    hook = "models.layers.12.mlp.post"
    g = torch.Generator().manual_seed(3)
    keys = []
    for i in range(3):
        states = torch.randn(N, T, D, generator=g).to(torch.bfloat16)
        ids = torch.randint(0, 1000, (N, T), generator=g)
        key = f"{run.hook_prefix(hook)}{uuid.UUID(int=i + 1)}--{i}_0.saved.pt"
        size = write_megabatch(store, key, states, ids, fmt="pt")
        keys.append(key)
    md = metadata_for(
        batch_size=2,
        sequence_length=T,
        d_in=D,
        batches_per_file=2,
        dtype=torch.bfloat16,
        hook=hook,
        format="pt",
        bytes_per_file=size,
    )
    run.write_metadata(hook, md)
    mbs = expected(store, sorted(keys))
    got = list(reader_for(store, f"llama3.3_70b/{hook}"))
    assert len(got) == 3
    for b, mb in zip(got, mbs):
        assert b["states"].dtype == torch.bfloat16
        assert torch.equal(b["states"], mb.states) and torch.equal(b["input_ids"], mb.input_ids)
        assert bool(b["mask"].all())


class _Evil:
    """Unpickling this would create a directory: proof that a file was unpickled freely."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return os.makedirs, (self.path,)


def test_pickle_with_code_in_a_saved_pt_is_refused_never_run(store, tmp_path):
    run = Run(store, "evil")
    hook = "residuals_0"
    marker = tmp_path / "pwned"
    good = f"{run.hook_prefix(hook)}{uuid.UUID(int=1)}--0_0.saved.pt"
    bad = f"{run.hook_prefix(hook)}{uuid.UUID(int=2)}--1_0.saved.pt"
    states = torch.randn(N, T, D)
    ids = torch.zeros(N, T, dtype=torch.int64)
    size = write_megabatch(store, good, states, ids, fmt="pt")
    buf = io.BytesIO()
    torch.save({"states": states, "input_ids": ids, "tensor_bytes": size, "x": _Evil(marker)}, buf)
    store.put_bytes(bad, buf.getvalue())
    run.write_metadata(
        hook, metadata_for(batch_size=2, sequence_length=T, d_in=D, batches_per_file=2, hook=hook, format="pt")
    )
    with pytest.raises(FormatError, match=r"--1_0\.saved\.pt.*refused"):
        list(reader_for(store, f"evil/{hook}"))
    with pytest.warns(SkippedFileWarning, match="refused"):
        got = list(reader_for(store, f"evil/{hook}", on_error="skip"))
    assert len(got) == 1 and torch.equal(got[0]["states"], states)
    assert not marker.exists()


def test_labels_and_file_positions_for_export(local_store):
    """What vaultsh export builds on: per-sequence labels and which file each megabatch came from."""
    run = Run(local_store, "lab")
    run.write_metadata(HOOK, metadata_for(batch_size=2, sequence_length=T, d_in=D, batches_per_file=2, hook=HOOK))
    labels = []
    for i in range(3):
        key = run.megabatch_key(HOOK, 0, i)
        lab = {"source": torch.arange(N, dtype=torch.int64) + 10 * i}
        size = write_megabatch(local_store, key, torch.randn(N, T, D), torch.zeros(N, T, dtype=torch.int64), labels=lab)
        run.commit(CommitRecord(0, i, i, i + 1, {HOOK: FileRecord(HOOK, key, size, None, N, N * T, 0, i)}))
        labels.append(lab["source"])
    got = list(reader_for(local_store, "lab/" + HOOK, return_labels=True, return_file=True, start=1))
    assert [b["file_index"] for b in got] == [1, 2]
    assert [b["file"].rsplit("/", 1)[-1] for b in got] == ["w0000--0000001.safetensors", "w0000--0000002.safetensors"]
    for b, want in zip(got, labels[1:]):
        assert set(b["labels"]) == {"source"} and torch.equal(b["labels"]["source"], want)
    assert "labels" not in next(iter(reader_for(local_store, "lab/" + HOOK)))


# --------------------------------------------------------------------------
# order, sharding, resume
# --------------------------------------------------------------------------


def test_sharding_covers_every_file_exactly_once(store):
    keys = make_run(store, n_files=7)
    want = {ident(mb.states) for mb in expected(store, keys)}
    for world in (1, 2, 3):
        seen: list[str] = []
        for rank in range(world):
            seen += idents(reader_for(store, shuffle=True, seed=5).shard(rank, world))
        assert len(seen) == len(want) == 7 and set(seen) == want, world
    # with a start offset the shards cover exactly the files after it
    order = idents(reader_for(store, shuffle=True, seed=5))
    seen = []
    for rank in range(3):
        seen += idents(reader_for(store, shuffle=True, seed=5, start=2, rank=rank, world_size=3))
    assert sorted(seen) == sorted(order[2:])
    with pytest.raises(UserError, match="rank"):
        reader_for(store).shard(3, 3)


def test_dataloader_workers_cover_every_file_once(store):
    keys = make_run(store, n_files=5)
    want = sorted(ident(mb.states) for mb in expected(store, keys))
    ds = ActivationDataset("syn/" + HOOK, store=store, connections=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = sorted(idents(loader))
    assert got == want
    # token mode through the loader: every real token exactly once
    ds = ActivationDataset("syn/" + HOOK, store=store, tokens=True, batch_size=10, connections=2)
    rows = torch.cat([b["states"] for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)])
    s, _ = real_rows(expected(store, keys))
    np.testing.assert_array_equal(sorted_rows(rows), sorted_rows(s))


def test_reader_survives_pickling(store):
    """What a spawn-started DataLoader worker does: pickle, reopen the store, read."""
    keys = make_run(store, n_files=3)
    reader = reader_for(store)
    clone = pickle.loads(pickle.dumps(reader))
    assert idents(clone) == [ident(mb.states) for mb in expected(store, keys)]


def test_file_order_is_a_seeded_permutation(store):
    keys = make_run(store, n_files=8)
    commit_order = [ident(mb.states) for mb in expected(store, keys)]
    assert idents(reader_for(store)) == commit_order
    a = idents(reader_for(store, shuffle=True, seed=1))
    b = idents(reader_for(store, shuffle=True, seed=1))
    c = idents(reader_for(store, shuffle=True, seed=2))
    assert a == b and sorted(a) == sorted(commit_order)
    assert a != commit_order and c != a
    r = reader_for(store, shuffle=True, seed=1)
    r.set_epoch(1)
    assert sorted(idents(r)) == sorted(a) and idents(r) != a


def test_resume_from_a_file_index(store):
    make_run(store, n_files=6)
    full = idents(reader_for(store, shuffle=True, seed=3))
    reader = reader_for(store, shuffle=True, seed=3)
    first = []
    for batch in reader:
        first.append(ident(batch["states"]))
        if len(first) == 2:
            break
    # after handing out 2 megabatches and moving on, 2 are done
    assert reader.file_index in (1, 2)
    idx = len(first)
    rest = idents(reader_for(store, shuffle=True, seed=3, start=idx))
    assert first + rest == full
    # set_file_index does the same; a start past the end is refused
    r = reader_for(store, shuffle=True, seed=3)
    r.set_file_index(4)
    assert idents(r) == full[4:]
    with pytest.raises(UserError):
        reader_for(store, start=7)
    r = reader_for(store)
    list(r)
    assert r.file_index == 6


# --------------------------------------------------------------------------
# token mode
# --------------------------------------------------------------------------


def test_token_mode_drops_masked_tokens(store):
    keys = make_run(store, n_files=4, short_last=True)
    mbs = expected(store, keys)
    s, i = real_rows(mbs)
    n_real = sum(int(mb.mask.sum()) for mb in mbs)
    reader = reader_for(store, tokens=True, batch_size=7)
    batches = list(reader)
    assert all(b["states"].shape == (7, D) and b["input_ids"].shape == (7,) for b in batches[:-1])
    assert 1 <= batches[-1]["states"].shape[0] <= 7
    rows = torch.cat([b["states"] for b in batches])
    assert rows.shape[0] == n_real == s.shape[0] == reader.stats.tokens
    assert torch.equal(rows, s) and torch.equal(torch.cat([b["input_ids"] for b in batches]), i)
    dropped = list(reader_for(store, tokens=True, batch_size=7, drop_last=True))
    assert sum(b["states"].shape[0] for b in dropped) == n_real // 7 * 7


def test_shuffle_buffer_is_a_seeded_permutation_that_mixes_files(store):
    keys = make_run(store, n_files=6)
    mbs = expected(store, keys)
    s, ids = real_rows(mbs)
    file_of = {}
    for f, mb in enumerate(mbs):
        for row in mb.states.reshape(-1, D)[mb.mask.reshape(-1)]:
            file_of[row.numpy().tobytes()] = f
    id_of = {row.numpy().tobytes(): int(t) for row, t in zip(s, ids)}

    def run(seed):
        return list(reader_for(store, tokens=True, batch_size=16, shuffle_buffer=3, seed=seed))

    a, b, c = run(0), run(0), run(1)
    rows = torch.cat([x["states"] for x in a])
    np.testing.assert_array_equal(sorted_rows(rows), sorted_rows(s))  # same multiset of rows
    assert not torch.equal(rows, s)  # ... in another order
    assert torch.equal(rows, torch.cat([x["states"] for x in b]))  # seeded
    assert not torch.equal(rows, torch.cat([x["states"] for x in c]))
    # every row keeps its own token id
    got_ids = torch.cat([x["input_ids"] for x in a])
    assert all(id_of[r.numpy().tobytes()] == int(t) for r, t in zip(rows, got_ids))
    # batches mix several megabatches
    mixed = [len({file_of[r.numpy().tobytes()] for r in x["states"]}) for x in a[:-1]]
    assert max(mixed) >= 3


# --------------------------------------------------------------------------
# memory bound and prefetch
# --------------------------------------------------------------------------


class LiveBuffers:
    """The reader's download buffers, tracked until their memory is really freed.

    Each buffer is a numpy array; it lives as long as the reader's pool keeps
    it or any tensor view of it exists; a weakref finalizer counts it out
    then. `peak` is the most buffer memory alive at once, whoever held it.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.live = self.peak = self.count = 0

    def alloc(self, size: int, pin: bool) -> np.ndarray:
        assert not pin
        a = np.empty(size, np.uint8)
        with self.lock:
            self.live += size
            self.count += 1
            self.peak = max(self.peak, self.live)
        weakref.finalize(a, self._free, size)
        return a

    def _free(self, size: int) -> None:
        with self.lock:
            self.live -= size


def test_memory_bound_is_respected(store, monkeypatch):
    keys = make_run(store, n_files=6, n=16, t=32, d=64)  # ~140 KB per file
    size = store.head(keys[0]).size
    assert all(store.head(k).size == size for k in keys)
    want = [ident(mb.states) for mb in expected(store, keys)]
    bound = int(2.5 * size)
    live = LiveBuffers()
    monkeypatch.setattr(BufferPool, "alloc", staticmethod(live.alloc))

    # a slow consumer that drops each megabatch before asking for the next
    reader = reader_for(store, prefetch=4, buffer_bytes=bound, range_bytes=64 << 10, connections=4)  # 3 ranges a file
    it, got, ahead = iter(reader), [], []
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        time.sleep(0.05)  # the prefetcher runs as far ahead as it may
        ahead.append(reader.stats.bytes_downloaded - len(got) * size)
        got.append(ident(batch["states"]))
        del batch
    st = reader.stats
    assert got == want
    assert live.count == 2  # two buffers fit in the bound, and they were reused for all six files
    assert live.peak <= bound and max(ahead) <= bound and st.peak_buffered_bytes <= bound == st.buffer_bytes
    assert live.peak >= 2 * size  # the bound (not prefetch=4) was what limited it
    assert live.live == 0  # nothing is kept after the pass

    # a `for` loop holds the previous megabatch while the next is fetched: one file more, never more
    live.peak = 0
    reader = reader_for(store, prefetch=4, buffer_bytes=bound, range_bytes=64 << 10, connections=4)
    for batch in reader:  # noqa: B007 (held on purpose: the loop variable keeps the previous megabatch alive)
        time.sleep(0.02)
    assert live.peak <= bound + size
    del batch

    # converted outputs don't alias the buffers: those are freed right after staging
    live.peak = 0
    reader = reader_for(store, prefetch=4, buffer_bytes=bound, dtype="float64", connections=4)
    out = list(reader)
    assert len(out) == 6 and live.peak <= bound and live.live == 0

    # a bound smaller than one file: files are read one at a time, and all of them
    live.peak = 0
    reader = reader_for(store, prefetch=3, buffer_bytes=size // 3, connections=4)
    it, got = iter(reader), []
    for batch in it:
        got.append(ident(batch["states"]))
        del batch
    assert got == want and live.peak == size == reader.stats.peak_buffered_bytes


def test_progress_and_throughput_are_reported(store):
    keys = make_run(store, n_files=3)
    reader = reader_for(store)
    assert reader.stats.files_read == 0
    it = iter(reader)
    next(it)
    mid = reader.stats
    assert mid.files_read == 1 and mid.elapsed_s > 0
    rest = list(it)
    st = reader.stats
    assert len(rest) == 2 and st.files_read == 3 and st.files_total == 3
    assert st.bytes_downloaded == sum(store.head(k).size for k in keys)
    assert st.states_bytes == 3 * N * T * D * 4
    assert st.mb_per_s > 0 and st.states_mb_per_s > 0 and st.tokens_per_s > 0
    d = reader.progress()
    assert d["files_read"] == 3 and d["mb_per_s"] == pytest.approx(st.mb_per_s, rel=0.5)


# --------------------------------------------------------------------------
# dtype and normalisation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["center", "unit_norm", "center_unit_norm", "standardize"])
def test_normalisation_equals_manual_computation(local_store, mode):
    store = local_store
    keys = make_run(store, n_files=3)
    mbs = expected(store, keys)
    stats = Run(store, "syn").read_statistics(HOOK)
    mean, std = torch.from_numpy(stats.mean), torch.from_numpy(stats.std)
    manual = {
        "center": lambda x: x - mean,
        "unit_norm": lambda x: x / stats.mean_norm,
        "center_unit_norm": lambda x: (x - mean) / float(np.sqrt(stats.var.sum())),
        "standardize": lambda x: (x - mean) / std,
    }[mode]
    got = list(reader_for(store, normalize=mode))
    for b, mb in zip(got, mbs):
        assert b["states"].dtype == torch.float32
        torch.testing.assert_close(b["states"].double(), manual(mb.states.double()), rtol=1e-5, atol=1e-5)
    if mode == "unit_norm":  # the mean norm of the (unmasked) tokens is now 1
        rows = torch.cat([b["states"].reshape(-1, D)[mb.mask.reshape(-1)] for b, mb in zip(got, mbs)])
        assert float(rows.double().norm(dim=1).mean()) == pytest.approx(1.0, rel=1e-5)
    if mode == "center":
        rows = torch.cat([b["states"].reshape(-1, D)[mb.mask.reshape(-1)] for b, mb in zip(got, mbs)])
        assert float(rows.double().mean(0).abs().max()) < 1e-4


def test_dtype_conversion(local_store):
    keys = make_run(local_store, n_files=2)
    for b, mb in zip(reader_for(local_store, dtype="bfloat16"), expected(local_store, keys)):
        assert b["states"].dtype == torch.bfloat16 and torch.equal(b["states"], mb.states.to(torch.bfloat16))
    toks = list(reader_for(local_store, dtype=torch.float16, normalize="center", tokens=True, batch_size=50))
    assert all(t["states"].dtype == torch.float16 for t in toks)
    with pytest.raises(UserError, match="dtype"):
        reader_for(local_store, dtype="int8")


def test_normalize_without_statistics_is_a_user_error(local_store):
    make_run(local_store, n_files=1)
    local_store.delete("syn/" + HOOK + "/statistics.json")
    with pytest.raises(UserError, match="statistics.json"):
        reader_for(local_store, normalize="center")


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------


def _corrupt(store, key: str, how: str) -> None:
    data = bytearray(store.get_bytes(key))
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data[:] = bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8))
    elif how == "bitflip":  # a flipped byte inside `states`: same size, valid header
        data[len(data) // 2] ^= 0xFF
    store.put_bytes(key, bytes(data))


@pytest.mark.parametrize("how", ["truncated", "garbage", "bitflip", "deleted"])
def test_corrupt_file_mid_run_raise_or_skip(store, how):
    keys = make_run(store, n_files=5)
    good = [ident(mb.states) for mb in expected(store, keys)]
    if how == "deleted":
        store.delete(keys[2])
    else:
        _corrupt(store, keys[2], how)
    verify = "sha256" if how == "bitflip" else "size"

    reader = reader_for(store, verify=verify)
    seen = []
    with pytest.raises((FormatError, StoreError)) as info:
        for b in reader:
            seen.append(ident(b["states"]))
    assert seen == good[:2]  # nothing of the bad file was yielded
    assert keys[2].rsplit("/", 1)[-1] in str(info.value)

    reader = reader_for(store, verify=verify, on_error="skip")
    with pytest.warns(SkippedFileWarning, match=keys[2].rsplit("/", 1)[-1]):
        got = idents(reader)
    assert got == good[:2] + good[3:]
    st = reader.stats
    assert st.files_skipped == 1 and st.files_read == 4
    assert st.skipped[0][0].endswith(keys[2].rsplit("/", 1)[-1])


def test_bitflip_goes_unnoticed_only_without_sha256(local_store):
    """verify="size" checks structure only; the digest check is what catches a flipped data byte."""
    keys = make_run(local_store, n_files=2)
    _corrupt(local_store, keys[0], "bitflip")
    assert len(list(reader_for(local_store))) == 2
    with pytest.raises(FormatError, match="sha256"):
        list(reader_for(local_store, verify="sha256"))


def test_shape_mismatch_with_metadata_is_detected(store):
    keys = make_run(store, n_files=3)
    run = Run(store, "syn")
    # replace the middle file by one with another d_model, and commit it as such (size, digest and all)
    g = torch.Generator().manual_seed(1)
    size = write_megabatch(store, keys[1], torch.randn(N, T, D + 1, generator=g), torch.zeros(N, T, dtype=torch.int64))
    sha = hashlib.sha256(store.get_bytes(keys[1])).hexdigest()
    run.commit(CommitRecord(0, 1, 2, 4, {HOOK: FileRecord(HOOK, keys[1], size, sha, N, N * T, 0, 1)}))
    with pytest.raises(FormatError, match=r"metadata\.json"):
        list(reader_for(store))
    with pytest.warns(SkippedFileWarning, match="differs from metadata.json"):
        got = list(reader_for(store, on_error="skip"))
    assert len(got) == 2
    # a dtype that differs from metadata.json is caught too
    size = write_megabatch(
        store, keys[1], torch.randn(N, T, D, generator=g).half(), torch.zeros(N, T, dtype=torch.int64)
    )
    sha = hashlib.sha256(store.get_bytes(keys[1])).hexdigest()
    run.commit(CommitRecord(0, 1, 2, 4, {HOOK: FileRecord(HOOK, keys[1], size, sha, N, N * T, 0, 1)}))
    with pytest.raises(FormatError, match="dtype"):
        list(reader_for(store))


def test_no_committed_megabatches_names_the_prefix(store):
    make_run(store, run_name="pending", n_files=2, commit=False)
    # another hook of the run has commits, so the run has records and `pending` files are uncommitted
    make_run(store, run_name="pending", hook="mlp_1", n_files=1)
    with pytest.raises(UserError, match=r"no committed megabatches under .*pending/residuals_3.*uncommitted"):
        reader_for(store, "pending/" + HOOK)
    with pytest.raises(UserError, match=r"no committed megabatches under .*pending/nope.*mlp_1"):
        reader_for(store, "pending/nope")
    with pytest.raises(UserError, match="RUN/HOOK"):
        reader_for(store, "justonename")


def test_network_errors_are_retried(s3_server, s3_bucket):
    from vaultsh.store.s3 import S3Store

    writer = S3Store(s3_bucket, endpoint_url=s3_server)
    keys = make_run(writer, n_files=3)
    good = [ident(mb.states) for mb in expected(writer, keys)]
    with FaultProxy(s3_server) as proxy:
        # botocore gets one attempt per request, so every retry here is the reader's own
        store = S3Store(s3_bucket, endpoint_url=proxy.url, max_attempts=1)
        reader = reader_for(store, retries=4, retry_backoff=0.01)
        proxy.fail_next(n=2, method="GET", mode="503", path_contains="w0000--0000001")
        proxy.fail_next(n=1, method="GET", mode="500", path_contains="w0000--0000002")
        assert idents(reader) == good
        assert proxy.faults_injected == 3 and reader.stats.retries == 3
        # a fault that never passes is raised after the retries, even with on_error="skip"
        proxy.fail_next(n=1000, method="GET", mode="503", path_contains="w0000--0000001")
        reader = reader_for(store, retries=2, retry_backoff=0.01, on_error="skip")
        with pytest.raises(StoreError, match="w0000--0000001"):
            list(reader)


def test_cuda_device_without_cuda_is_refused_by_the_reader(local_store):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    make_run(local_store, n_files=1)
    with pytest.raises(UserError, match="CUDA"):
        reader_for(local_store, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_pinned(local_store):  # pragma: no cover - no GPU on the CI machine
    keys = make_run(local_store, n_files=4)
    mbs = expected(local_store, keys)
    reader = reader_for(local_store, device="cuda", dtype="float32", prefetch=2)
    assert reader._pin
    for b, mb in zip(reader, mbs):
        assert b["states"].is_cuda and torch.equal(b["states"].cpu(), mb.states)
    rows = torch.cat(
        [b["states"].cpu() for b in reader_for(local_store, device="cuda", tokens=True, batch_size=9, shuffle_buffer=2)]
    )
    np.testing.assert_array_equal(sorted_rows(rows), sorted_rows(real_rows(mbs)[0]))


def test_several_sources_are_read_in_turn(local_store):
    a = make_run(local_store, run_name="a", n_files=2, seed=1)
    b = make_run(local_store, run_name="b", n_files=3, seed=2)
    got = idents(ActivationReader([f"a/{HOOK}", f"b/{HOOK}"], store=local_store))
    assert got == [ident(mb.states) for mb in expected(local_store, a + b)]


# --------------------------------------------------------------------------
# Activault compatibility
# --------------------------------------------------------------------------

# Activault's README, "Using Activations with RCache", verbatim but for the import line.
ACTIVAULT_README_SNIPPET = """
import os
from vaultsh.reader import S3RCache

cache = S3RCache.from_credentials(
    aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
    aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    s3_prefix="run_name/hook_name",
    device="cuda",  # or "cpu"
    return_ids=True  # if you need the input tokens
)

for batch in cache:
    states = batch["states"]        # shape: [n_batches, seq_len, d_model]
    input_ids = batch["input_ids"]  # shape: [n_batches, seq_len]
    # ... process batch ...

cache.finalize()  # clean up
"""


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_activault_readme_snippet_runs_unchanged(s3_server, s3_bucket, monkeypatch, fmt):
    from vaultsh.store.s3 import S3Store

    writer = S3Store(s3_bucket, endpoint_url=s3_server)
    keys = make_run(writer, run_name="run_name", hook="hook_name", n_files=3, fmt=fmt)
    want = {ident(mb.states): mb for mb in expected(writer, keys)}
    monkeypatch.setenv("S3_BUCKET_NAME", s3_bucket)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    seen = []
    real_next = S3RCache.__next__

    def spy(self):
        batch = real_next(self)
        seen.append(batch)
        return batch

    monkeypatch.setattr(S3RCache, "__next__", spy)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "cuda requested but not available" on CPU machines
        exec(compile(ACTIVAULT_README_SNIPPET, "activault_readme_snippet", "exec"), ns)
    assert len(seen) == 3
    assert sorted(ident(b["states"]) for b in seen) == sorted(want)
    for b in seen:
        assert set(b) == {"states", "input_ids"}
        assert torch.equal(b["input_ids"], want[ident(b["states"])].input_ids)
    assert ns["states"].shape == (N, T, D) and ns["input_ids"].shape == (N, T)
    assert ns["cache"].stats.files_read == 3


def test_s3rcache_activault_defaults(s3_server, s3_bucket, monkeypatch, tmp_path):
    """return_ids=False yields states tensors with tokens shuffled inside each megabatch, as Activault does."""
    from vaultsh.store.s3 import S3Store

    writer = S3Store(s3_bucket, endpoint_url=s3_server)
    keys = make_run(writer, run_name="r", hook="h", n_files=3)
    mbs = expected(writer, keys)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    cache = S3RCache.from_credentials(
        "testing",
        "testing",
        s3_prefix="r/h",
        bucket_name=s3_bucket,
        preserve_file_order=True,
        buffer_size=1,
        concurrency=4,
    )
    out = list(cache)
    cache.finalize()
    assert all(isinstance(t, torch.Tensor) and t.shape == (N, T, D) for t in out)
    for t, mb in zip(out, mbs):  # same tokens, other order
        assert not torch.equal(t, mb.states)
        np.testing.assert_array_equal(sorted_rows(t.reshape(-1, D)), sorted_rows(mb.states.reshape(-1, D)))
    assert cache.current_file_index == 3
    cache.set_file_index(2)
    assert len(list(cache)) == 1
    # a local hook directory works as s3_prefix too
    local = LocalStore(tmp_path / "v")
    make_run(local, run_name="r", hook="h", n_files=2)
    cache = S3RCache(None, str(tmp_path / "v" / "r" / "h"), return_ids=True, shuffle=False)
    assert len(list(cache)) == 2
    cache.finalize()
