"""The run layout, on both stores (the `store` fixture: LocalStore and S3Store on moto)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vaultsh.run as run_mod
from tests.fakes import ACTIVAULT_METADATA_FIELDS, activault_metadata
from vaultsh.errors import FormatError, StoreError
from vaultsh.run import (
    CFG,
    INTERNAL,
    METADATA,
    STATISTICS,
    CommitRecord,
    FileRecord,
    Run,
    megabatch_name,
    metadata_for,
    parse_megabatch_name,
)
from vaultsh.stats import RunningStats, merge_all
from vaultsh.store.local import LocalStore

ACTIVAULT_STATISTICS_FIELDS = ("mean", "std", "norm", "M2")
HOOKS = ["residuals_2", "residuals_10", "mlp_2"]


# -- names -------------------------------------------------------------------
def test_megabatch_names_are_deterministic():
    assert megabatch_name(3, 12) == "w0003--0000012.safetensors"
    assert megabatch_name(3, 12, "pt") == "w0003--0000012.saved.pt"
    assert megabatch_name(12345, 12345678) == "w12345--12345678.safetensors"
    assert megabatch_name(0, 0) == megabatch_name(0, 0)
    for bad in ((-1, 0), (0, -1), (True, 0), (0, 1.0)):
        with pytest.raises(ValueError):
            megabatch_name(*bad)
    with pytest.raises(ValueError):
        megabatch_name(0, 0, "npz")


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**9), st.sampled_from(["safetensors", "pt"]))
def test_parse_megabatch_name_round_trip(worker, index, fmt):
    name = megabatch_name(worker, index, fmt)
    assert parse_megabatch_name(name) == (worker, index)
    assert parse_megabatch_name(f"run/hook/{name}") == (worker, index)


@pytest.mark.parametrize(
    "name",
    [
        "0f909221-ff28-4a94-a43f-cfe973e835cf--5_0.saved.pt",
        "metadata.json",
        "statistics.json",
        "w00001--0000001.safetensors",  # not the canonical spelling
        "w0001--000001.safetensors",
        "w0001--0000001.pt",
        "w0001--0000001.safetensors.tmp",
        "x0001--0000001.safetensors",
    ],
)
def test_parse_rejects_foreign_names(name):
    assert parse_megabatch_name(name) is None


def test_keys(tmp_path):
    run = Run(LocalStore(tmp_path), "myrun")
    assert run.cfg_key == "myrun/cfg.json"
    assert run.hook_prefix("blocks.3.hook_resid_pre") == "myrun/blocks.3.hook_resid_pre/"
    assert run.metadata_key("mlp_1") == "myrun/mlp_1/metadata.json"
    assert run.statistics_key("mlp_1") == "myrun/mlp_1/statistics.json"
    assert run.megabatch_key("mlp_1", 2, 7) == "myrun/mlp_1/w0002--0000007.safetensors"
    assert run.megabatch_key("mlp_1", 2, 7, "pt") == "myrun/mlp_1/w0002--0000007.saved.pt"
    assert run.commit_key(1, 5) == "myrun/_vaultsh/commits/w0001/0000005.json"
    assert run.partial_stats_key(1, "mlp_1", 5) == "myrun/_vaultsh/stats/w0001/mlp_1/0000005.safetensors"
    for bad in ("", "a/b", INTERNAL, "..", "."):
        with pytest.raises(ValueError):
            run.hook_prefix(bad)
    with pytest.raises(StoreError):
        Run(run.store, "../escape")
    with pytest.raises(StoreError):
        Run(run.store, "")


# -- helpers -------------------------------------------------------------------
def put_megabatch(run: Run, hook: str, worker: int, index: int, size: int = 100) -> FileRecord:
    key = run.megabatch_key(hook, worker, index)
    run.store.put_bytes(key, bytes([index % 256]) * size)
    return FileRecord(hook, key, size, "ab" * 32, n_sequences=2, n_tokens=16, worker=worker, index=index)


def commit_megabatch(run: Run, worker: int, index: int, hooks=HOOKS, size: int = 100) -> CommitRecord:
    files = {h: put_megabatch(run, h, worker, index, size) for h in hooks}
    rec = CommitRecord(worker, index, batch_start=index * 4, batch_end=index * 4 + 4, files=files, tokens=16)
    run.commit(rec)
    return rec


# -- commit records ------------------------------------------------------------
def test_commit_iter_and_last_index(store):
    run = Run(store, "r")
    assert not run.has_commit_records()
    assert run.iter_commits() == []
    assert run.last_committed_index(0) is None
    order = [(0, 0), (1, 0), (0, 2), (0, 1), (1, 3)]
    random.Random(0).shuffle(order)
    written = {}
    for w, i in order:
        written[(w, i)] = commit_megabatch(run, w, i)
    assert run.has_commit_records()
    recs = run.iter_commits()
    assert [(r.worker, r.index) for r in recs] == sorted(order)
    assert all(r == written[(r.worker, r.index)] for r in recs)
    assert [(r.worker, r.index) for r in run.iter_commits(worker=1)] == [(1, 0), (1, 3)]
    assert run.last_committed_index(0) == 2
    assert run.last_committed_index(1) == 3
    assert run.last_committed_index(7) is None
    assert run.committed_indices(1) == [0, 3]
    # re-committing the same index overwrites, never duplicates
    commit_megabatch(run, 0, 2)
    assert len(run.iter_commits(worker=0)) == 3


def _count_reads(run: Run) -> list[str]:
    reads: list[str] = []
    real = run.read_commit

    def counting(t):
        reads.append(t[2])
        return real(t)

    run.read_commit = counting
    return reads


def test_incremental_commit_reads_only_new_or_changed_records(store):
    run = Run(store, "r")
    reads = _count_reads(run)
    for i in range(4):
        commit_megabatch(run, 0, i)
    known: dict = {}
    assert [r.index for r in run.iter_commits(known=known)] == [0, 1, 2, 3] and len(reads) == 4
    reads.clear()
    assert [r.index for r in run.iter_commits(known=known)] == [0, 1, 2, 3] and reads == []  # nothing new: no reads
    commit_megabatch(run, 1, 0)
    got = run.iter_commits(known=known)
    assert [(r.worker, r.index) for r in got] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert reads == [run.commit_key(1, 0)]
    # a record rewritten with other content (another size) is read again; a deleted one leaves
    rec = got[2]
    rec.tokens = 123_456_789
    run.commit(rec)
    store.delete(run.commit_key(0, 0))
    reads.clear()
    got = run.iter_commits(known=known)
    assert [(r.worker, r.index) for r in got] == [(0, 1), (0, 2), (0, 3), (1, 0)]
    assert reads == [run.commit_key(0, 2)] and got[1].tokens == 123_456_789
    assert sorted(known) == sorted(run.commit_key(w, i) for w, i in [(0, 1), (0, 2), (0, 3), (1, 0)])
    assert got == run.iter_commits()


def test_commit_chunks_replace_record_reads_and_never_override_a_record(store):
    """A chunk holds copies of 100 records: one GET instead of 100; a record rewritten since, or a broken
    chunk, is read directly, so readers always see the records themselves."""
    run = Run(store, "r")
    recs = []
    for i in range(run_mod.COMMIT_CHUNK + 7):
        rec = CommitRecord(0, i, 4 * i, 4 * i + 4, {}, tokens=16)
        run.commit(rec)
        recs.append(rec)
    run.commit(CommitRecord(1, 0, 0, 4, {}, tokens=16))
    plain = run.iter_commits()
    key = run.write_commit_chunk(recs[: run_mod.COMMIT_CHUNK])
    assert key == run.commit_chunk_key(0, run_mod.COMMIT_CHUNK - 1)
    reads = _count_reads(run)
    assert run.iter_commits() == plain
    assert sorted(reads) == sorted(
        [run.commit_key(0, i) for i in range(run_mod.COMMIT_CHUNK, run_mod.COMMIT_CHUNK + 7)] + [run.commit_key(1, 0)]
    )
    reads.clear()
    assert run.iter_commits(worker=1) == [plain[-1]] and reads == [run.commit_key(1, 0)]
    # a record rewritten after the chunk (here: other content, another size) is read, not taken from the chunk
    recs[5].tokens = 123_456_789
    run.commit(recs[5])
    reads.clear()
    got = run.iter_commits(worker=0)
    assert got[5].tokens == 123_456_789 and run.commit_key(0, 5) in reads and len(reads) == 8
    # a deleted record stays deleted; a broken chunk only costs the shortcut
    store.delete(run.commit_key(0, 7))
    store.put_bytes(key, b'{"format": "vaultsh-commit-chunk", "records": [{"key": 1}')
    reads.clear()
    got = run.iter_commits(worker=0)
    assert [r.index for r in got] == [i for i in range(run_mod.COMMIT_CHUNK + 7) if i != 7]
    assert len(reads) == run_mod.COMMIT_CHUNK + 6 and got[5].tokens == 123_456_789


def test_commit_chunk_holds_consecutive_records_of_one_worker(store):
    run = Run(store, "r")
    with pytest.raises(ValueError):
        run.write_commit_chunk([CommitRecord(0, 0, 0, 4, {}), CommitRecord(0, 2, 8, 12, {})])
    with pytest.raises(ValueError):
        run.write_commit_chunk([CommitRecord(0, 0, 0, 4, {}), CommitRecord(1, 1, 4, 8, {})])
    with pytest.raises(ValueError):
        run.write_commit_chunk([])


def test_commit_record_json_round_trip():
    rec = CommitRecord(
        2,
        9,
        36,
        40,
        {"mlp_1": FileRecord("mlp_1", "r/mlp_1/w0002--0000009.safetensors", 10, None, 4, 30, 2, 9)},
        tokens=30,
    )
    back = CommitRecord.from_json(rec.to_json())
    assert back == rec
    assert json.loads(rec.to_json())["files"]["mlp_1"]["n_tokens"] == 30


def test_committed_files_ignore_uncommitted(store):
    run = Run(store, "r")
    commit_megabatch(run, 0, 0)
    commit_megabatch(run, 1, 0)
    # megabatch 1 of worker 0 was uploaded for one hook, but never committed
    stray = put_megabatch(run, "residuals_2", 0, 1)
    assert store.exists(stray.key)
    files = run.committed_files("residuals_2")
    assert [(f.worker, f.index) for f in files] == [(0, 0), (1, 0)]
    assert stray.key not in {f.key for f in files}
    assert [o.key for o in run.uncommitted_files("residuals_2")] == [stray.key]
    assert run.uncommitted_files("mlp_2") == []
    s = run.summary()
    assert s.hooks["residuals_2"].uncommitted == 1
    assert s.hooks["residuals_2"].megabatches == 2


def test_private_files_stay_out_of_hook_dirs(store):
    """Activault's RCache loads every key under {hook}/ except metadata/statistics.json."""
    run = Run(store, "r")
    commit_megabatch(run, 0, 0)
    run.write_metadata("residuals_2", {"shape": [2, 8, 4]})
    run.write_statistics("residuals_2", RunningStats(4))
    run.write_partial_stats(0, "residuals_2", 0, RunningStats(4))
    for o in store.iter_objects(run.hook_prefix("residuals_2")):
        assert o.name in (METADATA, STATISTICS) or parse_megabatch_name(o.name) is not None
    assert all(o.key.startswith(run.prefix) for o in store.iter_objects(""))


# -- Activault runs ------------------------------------------------------------
ACTIVAULT_HOOK = "models.layers.24.mlp.post"


def make_activault_run(store, name="legacy", n_files=3):
    hook = ACTIVAULT_HOOK
    store.put_bytes(f"{name}/cfg.json", json.dumps({"run_name": name, "total_tokens": 123}).encode())
    md = activault_metadata(
        batch_size=4, sequence_length=8, d_in=6, batches_per_file=2, dtype="bfloat16", bytes_per_file=250
    )
    store.put_bytes(f"{name}/{hook}/metadata.json", json.dumps(md).encode())
    x = np.random.default_rng(0).normal(size=(64, 6))
    s = RunningStats.from_batch(x)
    doc = {k: v for k, v in s.to_activault_json().items() if k in ACTIVAULT_STATISTICS_FIELDS}
    store.put_bytes(f"{name}/{hook}/statistics.json", json.dumps(doc).encode())
    keys = []
    for n in range(1, n_files + 1):
        key = f"{name}/{hook}/0f909221-ff28-4a94-a43f-cfe973e835cf--{n}_0.saved.pt"
        store.put_bytes(key, b"x" * 250)
        keys.append(key)
    return Run(store, name), keys, s


def test_activault_run_treats_every_file_as_committed(store):
    run, keys, s = make_activault_run(store)
    assert not run.has_commit_records()
    assert run.hooks() == [ACTIVAULT_HOOK]
    files = run.committed_files(ACTIVAULT_HOOK)
    assert sorted(f.key for f in files) == sorted(keys)
    assert all(f.sha256 is None and f.worker is None and f.index is None for f in files)
    assert all(f.size == 250 and f.n_tokens == 64 and f.n_sequences == 8 for f in files)
    assert run.uncommitted_files(ACTIVAULT_HOOK) == []
    summary = run.summary()
    assert summary.has_commit_records is False
    assert summary.megabatches == 3 and summary.files == 3
    assert summary.bytes == 750 and summary.tokens == 3 * 64
    assert summary.workers == []
    assert run.read_cfg()["total_tokens"] == 123
    back = run.read_statistics(ACTIVAULT_HOOK)  # no count: recovered from M2/std**2
    assert back.count == 64
    np.testing.assert_allclose(back.mean, s.mean)
    np.testing.assert_allclose(back.std, s.std)


def test_vaultsh_files_without_records_parse_worker_and_index(store):
    run = Run(store, "r")
    put_megabatch(run, "mlp_2", 3, 4)
    (f,) = run.committed_files("mlp_2")
    assert (f.worker, f.index, f.n_tokens) == (3, 4, 0)


# -- hooks and summary ---------------------------------------------------------
def test_hooks_lists_hook_dirs_and_excludes_internal(store):
    run = Run(store, "r")
    commit_megabatch(run, 0, 0, hooks=["residuals_10", "residuals_2"])
    run.write_metadata("mlp_2", {"shape": [1, 1, 1]})  # metadata only, no files yet
    store.put_bytes("r/logs/worker0.log", b"hello")  # not a hook dir
    store.put_bytes(f"r/{INTERNAL}/logs/w0000.log", b"hi")
    run.write_cfg({"a": 1})
    assert run.hooks() == ["mlp_2", "residuals_2", "residuals_10"]
    assert Run(store, "nothing-here").hooks() == []


def test_summary_numbers(store):
    run = Run(store, "r")
    for w, i in [(0, 0), (0, 1), (1, 0)]:
        commit_megabatch(run, w, i, size=100 + i)
    s = run.summary()
    assert list(s.hooks) == ["mlp_2", "residuals_2", "residuals_10"]
    for h in HOOKS:
        hs = s.hooks[h]
        assert (hs.megabatches, hs.bytes, hs.tokens, hs.sequences, hs.uncommitted) == (3, 301, 48, 6, 0)
    assert s.megabatches == 3
    assert s.files == 9
    assert s.bytes == 3 * 301
    assert s.tokens == 48
    assert s.workers == [0, 1]
    assert s.has_commit_records
    text = "\n".join(s.lines())
    assert "residuals_10" in text and "total" in text
    assert s.to_dict()["hooks"]["mlp_2"]["megabatches"] == 3


# -- malformed records and JSON ------------------------------------------------
def _rec(**files) -> bytes:
    return json.dumps(
        {"worker": 0, "index": 0, "batch_start": 0, "batch_end": 1, "created": "x", "files": files}
    ).encode()


MALFORMED_COMMITS = [
    b"{not json",
    b"__import__('os').system('echo hi')",
    b"[1, 2, 3]",
    b"\xff\xfe",
    json.dumps({"worker": 0, "index": 0}).encode(),
    json.dumps({"worker": "0", "index": 0, "batch_start": 0, "batch_end": 1, "files": {}, "created": "x"}).encode(),
    json.dumps({"worker": 0, "index": 0, "batch_start": 2, "batch_end": 1, "files": {}, "created": "x"}).encode(),
    json.dumps({"worker": 5, "index": 0, "batch_start": 0, "batch_end": 1, "files": {}, "created": "x"}).encode(),
    json.dumps(
        {"format": "other", "worker": 0, "index": 0, "batch_start": 0, "batch_end": 1, "files": {}, "created": "x"}
    ).encode(),
    _rec(h={"hook": "h", "key": "../../etc/passwd", "size": 1}),
    _rec(h={"hook": "other", "key": "r/h/f", "size": 1}),
    _rec(h={"hook": "h", "key": "r/h/f", "size": -1}),
    _rec(h={"hook": "h", "key": "r/h/f", "size": 1, "sha256": "zz"}),
    _rec(_vaultsh={"hook": "_vaultsh", "key": "r/_vaultsh/f", "size": 1}),
    _rec(h={"hook": "h", "key": "r/h/metadata.json", "size": 1}),
]


def test_malformed_commit_record_is_format_error(store):
    run = Run(store, "r")
    commit_megabatch(run, 0, 1, hooks=["mlp_2"])
    key = run.commit_key(0, 0)
    for payload in MALFORMED_COMMITS:
        store.put_bytes(key, payload)
        with pytest.raises(FormatError) as e:
            run.iter_commits()
        assert "w0000/0000000.json" in str(e.value), payload
        with pytest.raises(FormatError):
            run.committed_files("mlp_2")


def test_json_files_are_validated(store, monkeypatch):
    run = Run(store, "r")
    assert run.read_cfg() is None and run.read_metadata("mlp_2") is None and run.read_statistics("mlp_2") is None
    store.put_bytes(run.cfg_key, b"not json at all")
    with pytest.raises(FormatError, match="cfg.json"):
        run.read_cfg()
    store.put_bytes(run.cfg_key, b"[1]")
    with pytest.raises(FormatError):
        run.read_cfg()
    monkeypatch.setattr(run_mod, "MAX_JSON_BYTES", 64)
    store.put_bytes(run.metadata_key("mlp_2"), json.dumps({"pad": "x" * 100}).encode())
    with pytest.raises(FormatError, match="limit"):
        run.read_metadata("mlp_2")


def test_cfg_round_trip_is_pretty_json(store):
    run = Run(store, "r")
    cfg = {"run_name": "r", "model": {"d_model": 576, "n_layers": 30}, "hooks": ["a", "b"], "total_tokens": 0}
    run.write_cfg(cfg)
    assert run.read_cfg() == cfg
    raw = store.get_bytes(f"r/{CFG}").decode()
    assert "\n  " in raw and '"hooks": ["a", "b"]' in raw


# -- statistics and metadata ---------------------------------------------------
def test_statistics_round_trip_through_statistics_json(store):
    run = Run(store, "r")
    rng = np.random.default_rng(1)
    s = RunningStats(5)
    for _ in range(4):
        s.update(rng.normal(size=(3, 7, 5)) * 1e3 + 7, rng.random((3, 7)) > 0.3)
    run.write_statistics("mlp_2", s)
    assert run.read_statistics("mlp_2") == s
    doc = json.loads(store.get_bytes(run.statistics_key("mlp_2")))
    for k in (*ACTIVAULT_STATISTICS_FIELDS, "count", "d_model"):
        assert k in doc
    assert doc["count"] == s.count and doc["norm"] == s.mean_norm


def test_metadata_has_activault_fields(store):
    run = Run(store, "r")
    md = metadata_for(
        batch_size=4,
        sequence_length=16,
        d_in=576,
        batches_per_file=8,
        dtype="bfloat16",
        hook="residuals_3",
        site="resid_pre",
        layer=3,
        format="pt",
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        bytes_per_file=1234,
    )
    run.write_metadata("residuals_3", md)
    doc = json.loads(store.get_bytes(run.metadata_key("residuals_3")))
    for k in ACTIVAULT_METADATA_FIELDS:
        assert k in doc
    assert doc["shape"] == [32, 16, 576] and doc["input_ids_shape"] == [32, 16]
    assert doc["dtype"] == "torch.bfloat16" and doc["bytes_per_file"] == 1234
    assert (doc["hook"], doc["site"], doc["layer"], doc["format"]) == ("residuals_3", "resid_pre", 3, "pt")
    assert doc["storage_dtype"] == "torch.bfloat16" and doc["model"].startswith("HuggingFaceTB/")
    assert run.read_metadata("residuals_3") == md
    # the stored dtype is what RCache allocates with
    md2 = metadata_for(
        batch_size=1, sequence_length=2, d_in=3, dtype="torch.bfloat16", storage_dtype="float16", hook="h"
    )
    assert md2["dtype"] == "torch.float16" and md2["model_dtype"] == "torch.bfloat16"
    assert "bytes_per_file" not in md2


def test_partial_stats_merge(store):
    run = Run(store, "r")
    rng = np.random.default_rng(2)
    data = {}
    for w, i in [(0, 0), (0, 1), (1, 0)]:
        x = rng.normal(size=(10, 3))
        data[(w, i)] = x
        run.write_partial_stats(w, "mlp_2", i, RunningStats.from_batch(x))
        commit_megabatch(run, w, i, hooks=["mlp_2"])
    # an uncommitted partial is ignored
    run.write_partial_stats(1, "mlp_2", 1, RunningStats.from_batch(rng.normal(size=(10, 3)) + 100))
    assert run.read_partial_stats(0, "mlp_2", 1) == RunningStats.from_batch(data[(0, 1)])
    assert run.read_partial_stats(0, "mlp_2", 9) is None
    assert [t[:3] for t in run.list_partial_stats("mlp_2")] == [
        (0, "mlp_2", 0),
        (0, "mlp_2", 1),
        (1, "mlp_2", 0),
        (1, "mlp_2", 1),
    ]
    merged = run.merge_partial_stats("mlp_2")
    ref = RunningStats.from_batch(np.concatenate(list(data.values())))
    assert merged.count == 30
    np.testing.assert_allclose(merged.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, ref.m2, rtol=1e-12)
    assert run.merge_partial_stats("mlp_2", committed_only=False).count == 40
    assert run.merge_partial_stats("residuals_2") is None
    # cumulative partials: the latest committed per worker
    cum = run.merge_partial_stats("mlp_2", cumulative=True)
    exp = merge_all([RunningStats.from_batch(data[(0, 1)]), RunningStats.from_batch(data[(1, 0)])])
    assert cum.count == exp.count
    np.testing.assert_allclose(cum.mean, exp.mean, rtol=1e-12)


def test_records_are_rerooted_on_the_run(tmp_path):
    """Keys in records are relative to the writer's store root; a reader rooted elsewhere still finds the files."""
    outer = Run(LocalStore(tmp_path / "vault"), "team/r")
    commit_megabatch(outer, 0, 0)
    inner = Run(LocalStore(tmp_path / "vault" / "team"), "r")
    files = inner.committed_files("mlp_2")
    assert [f.key for f in files] == ["r/mlp_2/w0000--0000000.safetensors"]
    assert inner.store.exists(files[0].key)
    assert inner.uncommitted_files("mlp_2") == []


def test_commit_refuses_files_outside_their_hook_dir(store):
    run = Run(store, "r")
    f = FileRecord("mlp_2", "r/other/w0000--0000000.safetensors", 1)
    with pytest.raises(ValueError):
        run.commit(CommitRecord(0, 0, 0, 1, {"mlp_2": f}))
    with pytest.raises(TypeError):
        run.commit({"worker": 0})
    assert not run.has_commit_records()


def test_run_at_a_uri_and_the_store_root_refused(tmp_path):
    """`Run.at` is how watch, the batch viewers and the SAELens scaling factor open a run by URI."""
    from vaultsh.errors import UserError
    from vaultsh.explore.batch import open_run
    from vaultsh.supervise.watcher import StoreWatcher

    LocalStore(tmp_path).put_bytes("my-run/cfg.json", b"{}")
    run = Run.at(f"{tmp_path}/my-run/")  # a local path: its store is the filesystem's root
    assert run.uri == str(tmp_path / "my-run") and run.read_cfg() == {}
    for open_ in (Run.at, open_run, StoreWatcher):
        with pytest.raises(UserError, match=r"^/: give the run's URI \(store/run_name\), not the store root$"):
            open_("/")
    assert open_run(str(tmp_path / "nowhere" / "run")) is None  # nothing written there yet
