"""`vaultsh launch ray` on a real local Ray cluster (loopback, two CPUs): two workers of the tiny model."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import yaml

from vaultsh.errors import UserError
from vaultsh.launch.common import make_plan
from vaultsh.launch.ray import parse_resources, task_options
from vaultsh.megabatch import read_megabatch
from vaultsh.run import Run
from vaultsh.store import LocalStore

from .modelfixtures import TINY_D_MODEL

ray = pytest.importorskip("ray")


def test_resources_parse_into_ray_options():
    assert task_options(parse_resources('{"CPU": 32, "GPU": 2}')) == {"num_cpus": 32.0, "num_gpus": 2.0}
    opts = task_options(parse_resources('{"CPU": 4, "memory": 1e9, "a100": 1}'))
    assert opts == {"num_cpus": 4.0, "num_gpus": 0.0, "memory": 1_000_000_000, "resources": {"a100": 1.0}}
    for bad, why in (("{CPU: 1}", "not valid JSON"), ("[1]", "JSON object"), ('{"GPU": -1}', "non-negative")):
        with pytest.raises(UserError, match=why):
            parse_resources(bad)


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        num_cpus=2, include_dashboard=False, namespace="vaultsh", log_to_driver=False, _node_ip_address="127.0.0.1"
    )
    try:
        yield
    finally:
        ray.shutdown()


def write_cfg(tmp_path, model_dir, run_name: str, n_batches: int, seq_length: int, hook: str):
    """A two-run pydoc config of the tiny model into the store tmp_path/vault, written to tmp_path/cfg.yaml."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "run_name": run_name,
                "num_runs": 2,
                "transformer_config": {"model_name": str(model_dir), "dtype": "float32"},
                "data_config": {"data_key": "pydoc", "n_batches": n_batches, "seq_length": seq_length, "batch_size": 2},
                "upload_config": {"batches_per_upload": 2, "hooks": [hook]},
                "storage": {"uri": str(tmp_path / "vault")},
            }
        )
    )
    return cfg_path


@pytest.mark.slow
def test_two_workers_on_a_local_ray_cluster_with_a_retry(cluster, tiny_dir, tmp_path):
    """Both workers run as Ray tasks; worker 1 is SIGKILLed after its first commit, retried, and resumes."""
    from vaultsh.finalize import finalize
    from vaultsh.launch.ray import launch

    cfg_path = write_cfg(tmp_path, tiny_dir, "ray.pydoc", n_batches=24, seq_length=32, hook="residuals_1")
    plan = make_plan(cfg_path, workers=2, start=0, end=1)
    events: list[dict] = []
    killed: list[int] = []

    def on_event(e):
        events.append(e)
        if e["type"] == "committed" and e["worker"] == 1 and not killed:
            pid = next(x["pid"] for x in events if x["type"] == "start" and x["worker"] == 1)
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass

    results = launch(plan, resources={"CPU": 1}, wait=True, retries=1, on_event=on_event)
    assert [r.status for r in results] == ["complete", "complete"], results
    assert killed, "worker 1 finished before it could be killed"
    assert results[0].attempts == 1 and results[1].attempts == 2
    # Events of both workers reached this process, the retry included.
    assert {(e["worker"], e["type"]) for e in events} >= {(0, "start"), (1, "start"), (0, "done"), (1, "done")}
    assert any(e["type"] == "warning" and e["worker"] == 1 and "retrying" in e["message"] for e in events)
    assert any(e["type"] == "resume" and e["worker"] == 1 and e["attempt"] == 2 for e in events)

    store = LocalStore(tmp_path / "vault")
    run = Run(store, "ray.pydoc")
    commits = run.iter_commits()
    batches = sorted(b for c in commits for b in range(c.batch_start, c.batch_end, 2))
    assert batches == list(range(24))  # every global batch exactly once
    finalize(run)
    rows = []
    for f in run.committed_files("residuals_1"):
        mb = read_megabatch(store, f.key)
        rows.append(mb.states.double().reshape(-1, TINY_D_MODEL)[mb.mask.reshape(-1)].numpy())
    x = np.concatenate(rows)
    stats = run.read_statistics("residuals_1")
    assert stats.count == x.shape[0]
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_launch_without_wait_runs_in_a_detached_supervisor(cluster, tiny_dir, tmp_path):
    """Without --wait the launcher returns at once; a detached actor supervises the workers, then goes away."""
    import time

    from vaultsh.launch.ray import NAMESPACE, launch

    cfg_path = write_cfg(tmp_path, tiny_dir, "detached.pydoc", n_batches=4, seq_length=16, hook="residuals_0")
    plan = make_plan(cfg_path)
    name = launch(plan, resources={"CPU": 1}, wait=False)
    assert name == "vaultsh-detached.pydoc-0-1"
    with pytest.raises(UserError, match="already running"):
        launch(plan, resources={"CPU": 1}, wait=False)
    run = Run(LocalStore(tmp_path / "vault"), "detached.pydoc")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            break  # the supervisor exited: every worker ended
        time.sleep(0.5)
    else:
        raise AssertionError("the detached supervisor did not finish")
    assert sorted((c.worker, c.batch_start) for c in run.iter_commits()) == [(0, 0), (1, 1)]


def test_cli_checks_ray_arguments_before_starting_anything(tmp_path):
    import subprocess
    import sys

    cfg = write_cfg(tmp_path, "m", "x", n_batches=4, seq_length=16, hook="residuals_0")  # no model is loaded
    for args, message in (
        (["--resources", "{CPU: 1}"], "--resources: not valid JSON"),
        (["--retries", "-1"], "--retries: -1"),
        (["--workers", "3"], "num_runs is 2"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "vaultsh", "launch", "ray", str(cfg), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, RAY_ADDRESS=""),
        )
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "vault").exists()
