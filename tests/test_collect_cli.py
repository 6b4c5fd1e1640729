"""`vaultsh collect` as a user runs it: a real process, signals, the real model into S3."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from vaultsh.run import Run
from vaultsh.store import LocalStore

from .modelfixtures import make_tiny_llama_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


def write_cfg(path: Path, tiny_dir: Path, store: Path, n_batches: int, bpu: int = 3) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "run_name": "sig.pydoc",
                "num_runs": 1,
                "transformer_config": {"model_name": str(tiny_dir), "dtype": "float32"},
                "data_config": {"data_key": "pydoc", "n_batches": n_batches, "seq_length": 64, "batch_size": 2},
                "upload_config": {"batches_per_upload": bpu, "hooks": ["residuals_1", "mlp_3"]},
                "storage": {"uri": str(store)},
            }
        )
    )
    return path


def env(**extra) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def headless(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "vaultsh", "collect", str(cfg), "--headless"]


def start(cfg: Path, tmp_path: Path) -> subprocess.Popen:
    """`vaultsh collect CFG --headless` in a process of its own, started."""
    return subprocess.Popen(
        headless(cfg), cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def collect(cfg: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`vaultsh collect CFG --headless` in a process of its own, run to the end."""
    return subprocess.run(headless(cfg), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)


def wait_for_commit(run: Run, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.iter_commits():
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.communicate()}")
        time.sleep(0.1)
    raise AssertionError("no megabatch committed in time")


def assert_consistent(store: LocalStore, run: Run) -> list:
    """Every commit names files that exist with the recorded bytes; stats cover exactly the commits."""
    commits = run.iter_commits()
    for c in commits:
        for f in c.files.values():
            assert hashlib.sha256(store.get_bytes(f.key)).hexdigest() == f.sha256
    return commits


def test_sigterm_finishes_megabatch_in_flight_and_commits(tiny_dir, tmp_path):
    store_dir = tmp_path / "vault"
    cfg = write_cfg(tmp_path / "cfg.yaml", tiny_dir, store_dir, n_batches=300)
    proc = start(cfg, tmp_path)
    store = LocalStore(store_dir)
    run = Run(store, "sig.pydoc")
    wait_for_commit(run, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped" in out
    commits = assert_consistent(store, run)
    assert 1 <= len(commits) < 100
    # Every megabatch is whole (3 batches of 2 rows): nothing half-written got committed.
    assert all(c.batch_end - c.batch_start == 3 for c in commits)
    stats = run.read_statistics("mlp_3")
    assert stats.count == sum(c.tokens for c in commits)
    # Nothing uncommitted is left behind by a graceful stop.
    assert run.uncommitted_files("mlp_3") == []


def test_second_signal_exits_at_once_leaving_a_consistent_run(tiny_dir, tmp_path):
    # Large megabatches, so the one in flight is far from done when the second signal comes.
    store_dir = tmp_path / "vault"
    cfg = write_cfg(tmp_path / "cfg.yaml", tiny_dir, store_dir, n_batches=5000, bpu=40)
    proc = start(cfg, tmp_path)
    store = LocalStore(store_dir)
    run = Run(store, "sig.pydoc")
    wait_for_commit(run, proc)
    # Signals that arrive while the interpreter is inside one C call coalesce into one, so
    # (like a person pressing Ctrl-C twice) wait until the first has been acknowledged.
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    reader.start()
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while not any("stopping after the megabatch" in line for line in err_lines) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = "".join(err_lines)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert_consistent(store, run)
    # A rerun resumes after the last commit and continues the same run.
    n_before = len(run.iter_commits())
    proc = start(cfg, tmp_path)
    wait_deadline = time.monotonic() + 120
    while len(run.iter_commits()) <= n_before and time.monotonic() < wait_deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert "resuming at megabatch" in err
    commits = assert_consistent(store, run)
    assert len(commits) > n_before
    assert [c.index for c in commits] == list(range(len(commits)))
    assert [c.batch_start for c in commits] == [40 * i for i in range(len(commits))]


def test_bad_layer_is_one_line_error_before_loading(tiny_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    write_cfg(cfg, tiny_dir, tmp_path / "vault", n_batches=4)
    data = yaml.safe_load(cfg.read_text())
    data["upload_config"]["hooks"] = ["residuals_40"]
    cfg.write_text(yaml.safe_dump(data))
    proc = collect(cfg, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaultsh: error:"), proc.stderr
    assert "residuals_40" in lines[0] and "4 layers" in lines[0]
    assert not (tmp_path / "vault" / "sig.pydoc").exists()


@pytest.mark.slow
def test_default_config_with_real_model_into_s3(s3_server, s3_bucket, tmp_path):
    """The README's main job, pointed at the loopback S3 server."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vaultsh",
            "collect",
            str(REPO / "configs" / "default.yaml"),
            "--headless",
            "--store",
            f"s3://{s3_bucket}",
        ],
        cwd=tmp_path,
        env=env(S3_ENDPOINT_URL=s3_server),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "complete" in proc.stdout
    from vaultsh.megabatch import read_megabatch
    from vaultsh.store.s3 import S3Store

    store = S3Store(s3_bucket, endpoint_url=s3_server)
    cfg = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    run = Run(store, cfg["run_name"])
    summary = run.summary()
    assert sorted(summary.hooks) == sorted(cfg["upload_config"]["hooks"])
    n_mb = cfg["data_config"]["n_batches"] // cfg["upload_config"]["batches_per_upload"]
    for hook, h in summary.hooks.items():
        assert h.megabatches == n_mb and h.uncommitted == 0
        stats = run.read_statistics(hook)
        assert stats.count == h.tokens > 0
        mb = read_megabatch(store, run.committed_files(hook)[0].key)
        assert mb.states.shape[-1] == 576  # SmolLM2-135M's d_model
        assert mb.header.model and "SmolLM2" in mb.header.model
        assert not mb.states.isnan().any()
    meta = run.read_cfg()
    assert meta["model"]["n_layers"] == 30


def test_events_fd_carries_ndjson_events(tiny_dir, tmp_path):
    """A launcher gives the worker a pipe: every event arrives there as one JSON line."""
    from vaultsh.events import decode

    cfg = write_cfg(tmp_path / "cfg.yaml", tiny_dir, tmp_path / "vault", n_batches=6, bpu=3)
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaultsh", "collect", str(cfg), "--events-fd", str(w)],
        cwd=tmp_path,
        env=env(),
        pass_fds=(w,),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(w)
    with os.fdopen(r, "rb") as channel:
        lines = channel.read().splitlines()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    events = [decode(line) for line in lines]
    assert all(e is not None for e in events)
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "done" and types.count("committed") == 2
    assert events[-1]["status"] == "complete" and events[-1]["batches"] == 6
    assert {"progress", "upload", "memory"} <= set(types)
    assert out == ""  # nothing on the terminal: the channel is the interface


def test_hub_id_loads_offline_from_a_filled_cache(tiny_dir, tmp_path):
    """model_name as a hub id + cache_dir works with no network (HF_HUB_OFFLINE=1)."""
    import shutil

    snapshot = tmp_path / "hf" / "models--vaultsh-test--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (tmp_path / "hf" / "models--vaultsh-test--tiny-llama" / "refs").mkdir()
    (tmp_path / "hf" / "models--vaultsh-test--tiny-llama" / "refs" / "main").write_text("0" * 40)
    cfg = tmp_path / "cfg.yaml"
    write_cfg(cfg, tiny_dir, tmp_path / "vault", n_batches=3)
    data = yaml.safe_load(cfg.read_text())
    data["transformer_config"] = {
        "model_name": "vaultsh-test/tiny-llama",
        "dtype": "float32",
        "cache_dir": str(tmp_path / "hf"),
    }
    cfg.write_text(yaml.safe_dump(data))
    proc = collect(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = Run(LocalStore(tmp_path / "vault"), "sig.pydoc")
    assert len(run.iter_commits()) == 1
    assert run.read_cfg()["model_name"] == "vaultsh-test/tiny-llama"


def test_rerunning_a_finished_worker_says_complete_and_writes_nothing(tiny_dir, tmp_path, capsys):
    from vaultsh.cli import main

    cfg = write_cfg(tmp_path / "cfg.yaml", tiny_dir, tmp_path / "vault", n_batches=3)
    assert main(["collect", str(cfg), "--headless", "--machine", "0"]) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "vault").rglob("*")}
    capsys.readouterr()
    assert main(["collect", str(cfg), "--headless", "--machine", "0"]) == 0
    out = capsys.readouterr().out
    assert "worker 0: already complete: 3 batches" in out and "1 megabatches committed" in out, out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "vault").rglob("*")} == before


def test_load_in_8bit_without_bitsandbytes_stops_before_any_worker(tiny_dir, tmp_path, capsys):
    import importlib.util

    from vaultsh.cli import main

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    cfg = write_cfg(tmp_path / "cfg.yaml", tiny_dir, tmp_path / "vault", n_batches=3)
    data = yaml.safe_load(cfg.read_text())
    data["transformer_config"]["kwargs"] = {"load_in_8bit": True}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["collect", str(cfg), "--headless"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "transformer_config.kwargs.load_in_8bit: true needs the package bitsandbytes" in lines[0]
    assert not (tmp_path / "vault").exists()
