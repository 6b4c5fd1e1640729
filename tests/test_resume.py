"""Resume after a hard crash: SIGKILL mid-megabatch, rerun, and the run equals an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from collector.config import load_config
from collector.worker import run_worker
from vaultsh.events import EventSink, decode
from vaultsh.megabatch import read_megabatch
from vaultsh.run import Run
from vaultsh.stats import RunningStats
from vaultsh.store import LocalStore

HOOKS = ["residuals_1", "mlp_1"]
BPU = 4
N_BATCHES = 24  # 12 batches, 3 megabatches for worker 1 of 2

# The crashing worker is slowed down (a sleep before each forward pass) so the kill lands
# mid-megabatch on any machine; everything else about it is the real worker process.
_SLOW_WORKER = (
    "import sys, time\n"
    "import collector.capture as L\n"
    "run = L.ActivationCapture.run\n"
    "def slow(self, **kw):\n"
    "    time.sleep(0.3)\n"
    "    return run(self, **kw)\n"
    "L.ActivationCapture.run = slow\n"
    "from vaultsh.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def raw_cfg(tiny_dir, uri, **data):
    return {
        "run_name": "crash.pydoc",
        "num_runs": 2,
        "transformer_config": {"model_name": str(tiny_dir), "dtype": "float32"},
        "data_config": {
            "data_key": "pydoc",
            "n_batches": N_BATCHES,
            "seq_length": 32,
            "batch_size": 2,
            "seed": 5,
            **data,
        },
        "upload_config": {"batches_per_upload": BPU, "hooks": HOOKS, "max_queued_megabatches": 2},
        "storage": {"uri": str(uri)},
    }


def kill_mid_megabatch(cfg_path, tmp_path, worker: int) -> list[dict]:
    """Run worker `worker` as a process; SIGKILL it after a commit, while a megabatch is half full."""
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WORKER, "collect", str(cfg_path), "--machine", str(worker), "--events-fd", str(w)],
        cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        pass_fds=(w,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(w)
    events: list[dict] = []
    killed = False
    with os.fdopen(r, "rb") as channel:
        for line in channel:
            e = decode(line)
            if e is None:
                continue
            events.append(e)
            committed = sum(1 for x in events if x["type"] == "committed")
            if e["type"] == "progress" and committed >= 1 and e["batches"] % BPU == 2:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
    proc.wait(timeout=60)
    assert killed, f"worker finished before it could be killed: {[e['type'] for e in events]}"
    assert proc.returncode == -signal.SIGKILL
    return events


def _files(store, run) -> dict[str, bytes]:
    return {o.key[len(run.prefix) :]: store.get_bytes(o.key) for o in store.iter_objects(run.prefix)}


def _strip(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "created"}


def test_sigkill_mid_megabatch_then_resume_equals_uninterrupted_run(tiny_dir, tmp_path):
    # The reference: worker 1 of 2, uninterrupted.
    ref_cfg = load_config(raw_cfg(tiny_dir, tmp_path / "ref"))
    assert run_worker(ref_cfg, 1, sink=EventSink(1))["status"] == "complete"

    # The crash: worker 1 is killed mid-megabatch.
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw_cfg(tiny_dir, tmp_path / "crash")))
    cfg = load_config(path)
    events = kill_mid_megabatch(path, tmp_path, worker=1)
    store = LocalStore(tmp_path / "crash")
    run = Run(store, cfg.run_name)
    done = run.committed_indices(1)
    assert 1 <= len(done) < N_BATCHES // 2 // BPU
    progressed = events[-1]["batches"]
    assert progressed % BPU != 0 and progressed > len(done) * BPU  # killed with collected work not committed

    # Resume: same config, same machine index.
    resumed: list[dict] = []
    result = run_worker(cfg, 1, sink=EventSink(1, callback=resumed.append))
    assert result["status"] == "complete"
    start = next(e for e in resumed if e["type"] == "resume")
    assert start["from_megabatch"] == len(done) and start["from_batch"] == len(done) * BPU

    ref_store = LocalStore(tmp_path / "ref")
    ref_run = Run(ref_store, ref_cfg.run_name)
    got, want = _files(store, run), _files(ref_store, ref_run)
    # File for file: the same keys, nothing duplicated, nothing left over.
    assert sorted(got) == sorted(want)
    for hook in HOOKS:
        # Statistics are byte-identical (the same merges in the same order).
        assert got[f"{hook}/statistics.json"] == want[f"{hook}/statistics.json"]
        assert got[f"{hook}/metadata.json"] == want[f"{hook}/metadata.json"]
        for c, rc in zip(run.iter_commits(), ref_run.iter_commits(), strict=True):
            a, b = read_megabatch(store, c.files[hook].key), read_megabatch(ref_store, rc.files[hook].key)
            assert torch.equal(a.input_ids, b.input_ids), f"{c.files[hook].key}: different sequences"
            assert torch.equal(a.mask, b.mask)
            assert a.source is not None and torch.equal(a.source, b.source)  # provenance survives the crash
            assert torch.equal(a.states, b.states)
            assert _strip(a.header.metadata) == _strip(b.header.metadata)
            assert len(got[c.files[hook].key[len(run.prefix) :]]) == len(
                want[rc.files[hook].key[len(ref_run.prefix) :]]
            )
    # Commit records agree on everything but creation times and digests (the header records its creation time).
    for c, rc in zip(run.iter_commits(), ref_run.iter_commits(), strict=True):
        assert (c.worker, c.index, c.batch_start, c.batch_end, c.tokens) == (
            rc.worker,
            rc.index,
            rc.batch_start,
            rc.batch_end,
            rc.tokens,
        )
        assert {h: (f.key, f.size, f.n_tokens, f.n_sequences) for h, f in c.files.items()} == {
            h: (f.key, f.size, f.n_tokens, f.n_sequences) for h, f in rc.files.items()
        }
    # Per-worker statistics snapshots hold identical numbers (their header's key order may differ).
    for key in got:
        if key.startswith("_vaultsh/stats/"):
            assert RunningStats.from_bytes(got[key]) == RunningStats.from_bytes(want[key]), key


def test_resume_with_changed_config_is_refused_naming_the_difference(tiny_dir, tmp_path):
    from vaultsh.errors import ConfigError

    cfg = load_config(raw_cfg(tiny_dir, tmp_path, n_batches=8))
    run_worker(cfg, 0, sink=EventSink(0))
    changed = load_config(raw_cfg(tiny_dir, tmp_path, n_batches=8, seed=6))
    store = LocalStore(tmp_path)
    before = {o.key: store.get_bytes(o.key) for o in store.iter_objects("")}
    with pytest.raises(ConfigError, match=r"data\.seed: 5 -> 6"):
        run_worker(changed, 1, sink=EventSink(1))
    # Refused before anything was written.
    assert {o.key: store.get_bytes(o.key) for o in store.iter_objects("")} == before


def test_leftovers_of_a_worker_are_cleaned_when_it_completes(tiny_dir, tmp_path):
    """Files past the last commit (a crash, a changed config) would be read by Activault's RCache: they go."""
    cfg = load_config(raw_cfg(tiny_dir, tmp_path, n_batches=16))
    run_worker(cfg, 0, sink=EventSink(0))
    store = LocalStore(tmp_path)
    run = Run(store, cfg.run_name)
    assert run.committed_indices(0) == [0, 1]
    before = sorted(o.key for o in store.iter_objects(""))
    planted = []
    for hook in HOOKS:
        data = store.get_bytes(run.megabatch_key(hook, 0, 1))
        planted.append(run.megabatch_key(hook, 0, 7))  # uncommitted, past the end
        store.put_bytes(planted[-1], data)
        planted.append(run.partial_stats_key(0, hook, 0))  # an older snapshot a crash left behind
        store.put_bytes(planted[-1], store.get_bytes(run.partial_stats_key(0, hook, 1)))
    other = run.megabatch_key("mlp_1", 1, 7)  # another worker's file is not this worker's business
    store.put_bytes(other, b"x")
    result = run_worker(cfg, 0, sink=EventSink(0))
    assert result["status"] == "complete"
    after = sorted(o.key for o in store.iter_objects(""))
    assert after == sorted(before + [other])


def test_statistics_are_merged_while_the_run_grows(tiny_dir, tmp_path, monkeypatch):
    import collector.worker as worker_mod

    monkeypatch.setattr(worker_mod, "MERGE_EVERY_S", 0.0)  # merge after every commit
    cfg = load_config(raw_cfg(tiny_dir, tmp_path, n_batches=16))
    run_worker(cfg, 0, sink=EventSink(0))
    store = LocalStore(tmp_path)
    run = Run(store, cfg.run_name)
    seen = []

    def on_event(e):
        if e["type"] == "committed" and e["megabatch"] == 0:
            # Worker 1 is still running: statistics.json already covers worker 0 and worker 1's first commit.
            seen.append((run.read_statistics("mlp_1").count, sum(c.tokens for c in run.iter_commits())))

    run_worker(cfg, 1, sink=EventSink(1, callback=on_event))
    assert seen and seen[0][0] == seen[0][1]
    assert 0 < seen[0][0] < sum(c.tokens for c in run.iter_commits())
