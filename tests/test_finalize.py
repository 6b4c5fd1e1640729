"""`vaultsh finalize`: statistics merged exactly across workers, cfg.json totals, idempotence."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from collector.config import load_config
from collector.worker import run_worker
from vaultsh.errors import UserError
from vaultsh.events import EventSink
from vaultsh.finalize import finalize, open_run, summary_lines
from vaultsh.megabatch import read_megabatch
from vaultsh.run import Run
from vaultsh.stats import RunningStats

from .modelfixtures import TINY_D_MODEL

HOOKS = ["residuals_1", "mlp_2"]


def make_cfg(tiny_dir, uri, num_runs=2, n_batches=7, bpu=2):
    return load_config(
        {
            "run_name": "fin.pydoc",
            "num_runs": num_runs,
            "transformer_config": {"model_name": str(tiny_dir), "dtype": "float32"},
            "data_config": {
                "data_key": "pydoc",
                "n_batches": n_batches,
                "seq_length": 32,
                "batch_size": 2,
                "seed": 3,
                "clean_added_tokens": True,
            },
            "upload_config": {"batches_per_upload": bpu, "hooks": HOOKS},
            "storage": {"uri": str(uri)},
        }
    )


def numpy_stats(store, run, hook):
    """Mean/std/norm over every stored content token of every committed file, in numpy float64."""
    rows = []
    for f in run.committed_files(hook):
        mb = read_megabatch(store, f.key)
        rows.append(mb.states.double().reshape(-1, TINY_D_MODEL)[mb.mask.reshape(-1)].numpy())
    x = np.concatenate(rows)
    return x


def assert_matches_numpy(stats: RunningStats, x: np.ndarray):
    assert stats.count == x.shape[0]
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.std, x.std(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.mean_norm, np.linalg.norm(x, axis=1).mean(), rtol=1e-9)


@pytest.fixture(scope="module")
def s3_run(tiny_dir, s3_server, s3_admin, tmp_path_factory):
    """Two worker processes collecting at the same time into the loopback S3 server.

    (Processes, as launchers run them: transformers' model loading is not
    thread-safe, so two workers in threads of one process would not work.)
    """
    import os

    import yaml

    from vaultsh.store.s3 import S3Store

    bucket = "vaultsh-finalize-two-workers"
    s3_admin.create_bucket(Bucket=bucket)
    cfg = make_cfg(tiny_dir, f"s3://{bucket}")
    path = tmp_path_factory.mktemp("cfg") / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = dict(os.environ, S3_ENDPOINT_URL=s3_server, HF_HUB_OFFLINE="1")
    # Worker 1 in its own process, worker 0 in this one, at the same time.
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaultsh", "collect", str(path), "--machine", "1", "--headless"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        store = S3Store(bucket, endpoint_url=s3_server)
        results = {0: run_worker(cfg, 0, sink=EventSink(0), store=store)}
    finally:
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    results[1] = out
    return cfg, store, Run(store, cfg.run_name), results


def test_parallel_workers_on_s3_merge_to_numpy_over_all_stored_tokens(s3_run):
    cfg, store, run, results = s3_run
    assert results[0]["status"] == "complete" and results[0]["batches"] == 4  # global batches 0, 2, 4, 6
    assert "worker 1: complete: 3 batches" in results[1]  # global batches 1, 3, 5
    assert {c.worker for c in run.iter_commits()} == {0, 1}
    for hook in HOOKS:
        x = numpy_stats(store, run, hook)
        # What the workers left behind already covers both workers, not worker 0's alone ...
        assert_matches_numpy(run.read_statistics(hook), x)
        # ... and finalize recomputes the same merge from scratch.
        store.delete(run.statistics_key(hook))
    report = finalize(run)
    assert all(h.written for h in report.hooks.values())
    for hook in HOOKS:
        assert_matches_numpy(run.read_statistics(hook), numpy_stats(store, run, hook))
        assert report.hooks[hook].recomputed == []
        assert report.hooks[hook].count == report.hooks[hook].tokens
    assert report.warnings == []


def test_finalize_writes_totals_and_is_idempotent(s3_run):
    cfg, store, run, results = s3_run
    finalize(run)
    before = {o.key: store.get_bytes(o.key) for o in store.iter_objects(run.prefix)}
    report = finalize(run)
    assert not report.changed
    after = {o.key: store.get_bytes(o.key) for o in store.iter_objects(run.prefix)}
    assert after == before
    totals = run.read_cfg()["totals"]
    commits = run.iter_commits()
    assert totals["megabatches"] == len(commits) == 4  # 2 + 2 (worker 1's last holds one batch)
    assert totals["tokens"] == sum(c.tokens for c in commits) == sum(f.n_tokens for f in run.committed_files("mlp_2"))
    assert totals["batches"] == 7 and totals["workers"] == [0, 1]
    assert totals["bytes"] == sum(f.size for c in commits for f in c.files.values())
    assert totals["hooks"]["mlp_2"]["files"] == 4
    lines = summary_lines(report)
    assert len(lines) < 25
    assert "7 batches of 7 planned" in lines[1] and "unchanged" in lines[-1]


def test_missing_or_wrong_snapshot_is_recomputed_from_files(tiny_dir, tmp_path):
    from vaultsh.store import LocalStore

    cfg = make_cfg(tiny_dir, tmp_path, n_batches=6)
    for w in (0, 1):
        run_worker(cfg, w, sink=EventSink(w))
    store = LocalStore(tmp_path)
    run = Run(store, cfg.run_name)
    x = numpy_stats(store, run, "mlp_2")
    last0 = run.last_committed_index(0)
    last1 = run.last_committed_index(1)
    store.delete(run.partial_stats_key(0, "mlp_2", last0))
    # Worker 1's snapshot replaced by one that counts other tokens.
    bogus = RunningStats(TINY_D_MODEL).update(torch.ones(3, TINY_D_MODEL))
    store.put_bytes(run.partial_stats_key(1, "mlp_2", last1), bogus.to_bytes())
    report = finalize(run)
    assert report.hooks["mlp_2"].recomputed == [0, 1]
    assert len([w for w in report.warnings if "mlp_2" in w]) == 2
    assert_matches_numpy(run.read_statistics("mlp_2"), x)
    # The other hook's snapshots were fine and used as they are.
    assert report.hooks["residuals_1"].recomputed == []
    # --recompute from files gives the same numbers as the snapshots.
    snap = run.read_statistics("residuals_1")
    finalize(run, recompute=True)
    again = run.read_statistics("residuals_1")
    assert again.count == snap.count
    np.testing.assert_allclose(again.mean, snap.mean, rtol=1e-12)
    np.testing.assert_allclose(again.m2, snap.m2, rtol=1e-9)


def test_missing_workers_and_dry_run(tiny_dir, tmp_path):
    from vaultsh.store import LocalStore

    cfg = make_cfg(tiny_dir, tmp_path, num_runs=3, n_batches=6)
    run_worker(cfg, 1, sink=EventSink(1))
    store = LocalStore(tmp_path)
    run = Run(store, cfg.run_name)
    stats_before = store.get_bytes(run.statistics_key("mlp_2"))
    cfg_before = store.get_bytes(run.cfg_key)
    report = finalize(run, dry_run=True)
    assert report.missing_workers == [0, 2] and report.workers == [1]
    assert report.cfg_written and store.get_bytes(run.cfg_key) == cfg_before
    assert store.get_bytes(run.statistics_key("mlp_2")) == stats_before
    assert any("no commits yet: 0, 2" in line for line in summary_lines(report, dry_run=True))
    # A local run directory given as a path: finalize writes there.
    local = open_run(str(tmp_path / cfg.run_name))
    assert local.uri.endswith(cfg.run_name)
    assert finalize(local).cfg_written
    assert store.get_bytes(run.cfg_key) != cfg_before and run.read_cfg()["totals"]["workers"] == [1]


def test_cli_finalize_one_screen_and_errors(s3_run, s3_server, tmp_path):
    import os

    cfg, store, run, _ = s3_run
    env = dict(os.environ, S3_ENDPOINT_URL=s3_server)
    proc = subprocess.run(
        [sys.executable, "-m", "vaultsh", "finalize", run.uri, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["workers"] == [0, 1] and data["batches"] == 7 and data["changed"] is False
    proc = subprocess.run(
        [sys.executable, "-m", "vaultsh", "finalize", run.uri], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "workers with commits: 0-1 (num_runs 2)" in proc.stdout
    # Not a run: one line, exit 2, nothing written.
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "vaultsh", "finalize", str(tmp_path / "empty")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not a run" in proc.stderr
    assert list((tmp_path / "empty").iterdir()) == []


def test_open_run_refuses_bucket_without_run():
    with pytest.raises(UserError, match="give a run"):
        open_run("s3://some-bucket/")
