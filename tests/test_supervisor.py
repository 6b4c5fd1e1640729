"""The headless run supervisor, without textual: state from events, and real worker subprocesses
(the protocol-speaking fake worker; the tiny-model workers are driven in tests/test_dashboard.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vaultsh.errors import UserError
from vaultsh.supervise import RunInfo, Supervisor
from vaultsh.supervise.fake import FakeLauncher, event, fakeworker_launcher
from vaultsh.supervise.spawn import default_concurrency, parse_machines
from vaultsh.supervise.state import EventLog, WorkerStatus, apply_event

REPO = Path(__file__).resolve().parents[1]


def wait_until(pred, sup: Supervisor, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sup.tick()
        if pred():
            return
        time.sleep(0.05)
    states = [(w.index, w.state, w.batches, w.last_error) for w in sup.snapshot()]
    raise AssertionError(f"timed out waiting for {what}: {states}")


def state(sup: Supervisor, i: int) -> WorkerStatus:
    return next(w for w in sup.snapshot() if w.index == i)


# -- pure state ------------------------------------------------------------
def test_events_drive_the_state_machine():
    w, log = WorkerStatus(3), EventLog()
    apply_event(w, event("start", 3, n_batches=10, pid=77, run="r", model="m", hooks=["h"], store="s"), log, 0)
    assert (w.state, w.total_batches, w.pid) == ("starting", 10, 77)
    apply_event(w, event("loading", 3, what="model", detail="m"), log, 0)
    assert w.state == "loading" and w.detail == "model"
    apply_event(w, event("resume", 3, from_megabatch=2, from_batch=4), log, 0)
    assert (w.batches, w.committed) == (4, 2) and "resuming at megabatch 2" in log.lines[-1].message
    apply_event(
        w, event("progress", 3, 5.0, batches=6, total_batches=10, tokens=600, tokens_per_s=100.0, megabatch=3), log, 0
    )
    assert w.state == "running" and w.fraction == 0.6
    assert w.eta_s == pytest.approx(4 * 100 / 100.0)  # 4 batches left at 100 tokens each, 100 tok/s
    apply_event(w, event("committed", 3, megabatch=2, batch_start=4, batch_end=6, tokens=200, bytes=1000), log, 0)
    assert (w.committed, w.committed_bytes) == (3, 1000)
    apply_event(
        w, event("progress", 3, batches=10, total_batches=10, tokens=1000, tokens_per_s=100.0, megabatch=5), log, 0
    )
    assert w.state == "uploading"  # every batch ran; the last megabatches are still going up
    apply_event(w, event("warning", 3, message="slow\nstore \x1b[31m"), log, 0)
    assert w.warnings == 1 and log.lines[-1].message == "slow store \\x1b[31m"  # one line, inert
    apply_event(w, event("done", 3, status="complete", batches=10, tokens=1000, megabatches=5, elapsed=1.0), log, 0)
    assert w.state == "done" and w.tokens_per_s == 0


def test_a_stop_from_elsewhere_shows_as_stopping():
    """A worker stopped by a signal the supervisor did not send (Slurm, kill) says so with a `stopping` event."""
    from vaultsh.progress import HeadlessPrinter

    w, log = WorkerStatus(1), EventLog()
    apply_event(
        w, event("progress", 1, batches=3, total_batches=10, tokens=300, tokens_per_s=50.0, megabatch=1), log, 0
    )
    apply_event(w, event("stopping", 1, megabatch=1, filled=1, batches_per_upload=2), log, 0)
    assert w.state == "stopping" and "finishing megabatch 1 (1/2 batches)" in log.lines[-1].message
    apply_event(
        w, event("progress", 1, batches=4, total_batches=10, tokens=400, tokens_per_s=50.0, megabatch=2), log, 0
    )
    assert w.state == "stopping"  # progress while it finishes does not make it "running" again
    apply_event(w, event("done", 1, status="stopped", batches=4, tokens=400, megabatches=2, elapsed=1.0), log, 0)
    assert w.state == "stopped"
    import io

    from rich.console import Console

    out = io.StringIO()
    with HeadlessPrinter(Console(file=out, width=200)) as printer:
        printer(event("stopping", 1, megabatch=1, filled=1, batches_per_upload=2))
    assert "worker 1: stopping: finishing megabatch 1 (1/2 batches), then exit" in out.getvalue()


def test_fake_source_pause_stop_restart_and_exit_codes():
    """Control calls become the right signals; exits settle into the right states."""
    t = [100.0]
    launcher = FakeLauncher()
    sup = Supervisor(launcher, [0, 1, 2], concurrency=2, clock=lambda: t[0], sample_memory=False, info=RunInfo(run="r"))
    sup.start()
    assert [w.state for w in sup.snapshot()] == ["starting", "starting", "queued"]
    h0 = launcher.latest(0)
    assert sup.pause(0) == [0] and h0.signals[-1] == (signal.SIGSTOP, True)
    assert state(sup, 0).state == "paused"
    sup.feed(event("progress", 0, batches=1, total_batches=4, tokens=10, tokens_per_s=5.0, megabatch=0))
    assert state(sup, 0).state == "paused"  # a late event does not un-pause the view
    assert sup.resume(0) == [0] and h0.signals[-1] == (signal.SIGCONT, True)
    assert state(sup, 0).state == "running"
    # a worker that exits 0 after done/complete is done, and frees a slot for the queued one
    sup.feed(event("done", 0, status="complete", batches=4, tokens=40, megabatches=1, elapsed=1.0))
    h0.exit(0)
    sup.tick()
    assert [w.state for w in sup.snapshot()] == ["done", "starting", "starting"]
    # crash with no done event: failed, the reason is the exit
    launcher.latest(1).exit(-9)
    sup.tick()
    w1 = state(sup, 1)
    assert w1.state == "failed" and w1.last_error == "killed by SIGKILL"
    assert any("worker 1 failed: killed by SIGKILL" in line.message for line in sup.logs_since(0))
    # stop: SIGTERM (and SIGCONT when paused); twice: SIGTERM again
    h2 = launcher.latest(2)
    sup.pause(2)
    assert sup.stop(2) == [2] and h2.signals[-2:] == [(signal.SIGTERM, False), (signal.SIGCONT, True)]
    assert state(sup, 2).state == "stopping"
    sup.stop(2)
    assert h2.signals[-1] == (signal.SIGTERM, False)
    sup.feed(event("done", 2, status="stopped", batches=2, tokens=20, megabatches=0, elapsed=1.0))
    h2.exit(0)
    sup.tick()
    assert state(sup, 2).state == "stopped"
    # restart only what ended badly or was stopped
    assert not sup.restart(0)
    assert sup.restart(1) and len(launcher.handles[1]) == 2
    assert state(sup, 1).state == "starting" and state(sup, 1).restarts == 1 and state(sup, 1).last_error is None
    assert not sup.finished
    launcher.latest(1).exit(1)
    sup.tick()
    assert sup.finished and sup.exit_code() == 1
    assert "run finished" in sup.logs_since(0)[-1].message


def test_machines_and_default_concurrency():
    assert parse_machines("0-3", 8) == [0, 1, 2, 3]
    assert parse_machines("5, 0-1,1", 8) == [0, 1, 5]
    for bad, why in [("0-9", "out of range"), ("3-1", "empty"), ("a", "not allowed"), ("", "not allowed")]:
        with pytest.raises(UserError, match=why):
            parse_machines(bad, 8)
    assert default_concurrency(4, gpus=2, cpus=64) == 2
    assert default_concurrency(1, gpus=8, cpus=64) == 1
    assert default_concurrency(8, gpus=0, cpus=2) == 1
    assert default_concurrency(8, gpus=0, cpus=32) == 4


def test_supervisor_does_not_import_textual():
    code = (
        "import sys, vaultsh.supervise, vaultsh.supervise.watcher, vaultsh.supervise.spawn, vaultsh.progress\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- real subprocesses: the fake worker --------------------------------------
def test_processes_pause_stop_kill_restart(tmp_path):
    """Own sessions, logs in files, events on the pipe; kill -9 shows failed and the others go on."""
    sup = Supervisor(fakeworker_launcher(tmp_path / "logs", rate=100, batches=100000, per_megabatch=20), [0, 1, 2])
    sup.start()
    try:
        wait_until(lambda: all(w.state == "running" and w.batches > 5 for w in sup.snapshot()), sup, what="running")
        pids = {w.index: w.pid for w in sup.snapshot()}
        for _i, pid in pids.items():
            assert os.getpgid(pid) == pid and os.getsid(pid) == pid  # own session, own group
        assert (tmp_path / "logs" / "worker-0.log").exists()

        # pause: the process is stopped and sends nothing
        sup.pause(0)
        wait_until(lambda: psutil.Process(pids[0]).status() == psutil.STATUS_STOPPED, sup, what="SIGSTOP")
        time.sleep(0.1)  # what it wrote just before the signal may still be in the pipe
        sup.tick()
        frozen = state(sup, 0).batches
        time.sleep(0.3)
        sup.tick()
        assert state(sup, 0).batches == frozen and state(sup, 0).state == "paused"
        sup.resume(0)
        wait_until(lambda: state(sup, 0).batches > frozen + 3, sup, what="resumed progress")

        # kill -9 from outside: failed with the reason, the others keep going
        os.kill(pids[1], signal.SIGKILL)
        wait_until(lambda: state(sup, 1).state == "failed", sup, what="failed")
        assert state(sup, 1).last_error == "killed by SIGKILL"
        before = {i: state(sup, i).batches for i in (0, 2)}
        wait_until(lambda: all(state(sup, i).batches > before[i] + 3 for i in (0, 2)), sup, what="others continue")
        assert state(sup, 1).rss is None or state(sup, 1).state == "failed"
        assert state(sup, 0).rss and state(sup, 0).rss > 1_000_000  # psutil RSS of a live worker

        # graceful stop: the worker finishes its "megabatch", says done/stopped, exits 0
        sup.stop(2)
        wait_until(lambda: state(sup, 2).exit_code is not None, sup, what="stopped")
        w2 = state(sup, 2)
        assert w2.exit_code == 0 and w2.batches % 20 == 0 and w2.committed == w2.batches // 20

        # restart the failed one: a new process with a new pid
        assert sup.restart(1)
        wait_until(lambda: state(sup, 1).state == "running", sup, what="restarted")
        assert state(sup, 1).pid != pids[1] and state(sup, 1).restarts == 1
        assert (tmp_path / "logs" / "worker-1.log").read_text().count("started:") == 2
    finally:
        sup.stop(None)
        sup.wait(timeout=20)
    assert sup.finished and {w.state for w in sup.snapshot()} == {"stopped"}


def test_crash_message_comes_from_the_error_event(tmp_path):
    sup = Supervisor(fakeworker_launcher(tmp_path, rate=500, batches=1000, fail_after=30), [0])
    sup.start()
    assert sup.wait(timeout=30)
    w = state(sup, 0)
    assert w.state == "failed" and w.exit_code == 1
    assert w.last_error == "RuntimeError: fake failure at batch 30"
    assert "fake failure" in (tmp_path / "worker-0.log").read_text()


def test_headless_collect_with_several_workers_uses_the_supervisor(tmp_path, capsys):
    """`vaultsh collect --headless` with several workers: the printer is fed by the supervisor's events."""
    from vaultsh.subcommands.collect import _headless

    info = RunInfo(run="fake.run", store="mem://fake/fake.run")
    launcher = fakeworker_launcher(tmp_path, rate=400, batches=60, per_megabatch=20)
    code = _headless(launcher, [0, 1, 2], 2, info, tmp_path)
    out = capsys.readouterr()
    assert code == 0
    for i in range(3):
        assert f"worker {i}: done: 60 batches, 30,720 tokens, 3 megabatches committed" in out.out
    assert "total: 92,160 tokens, 9 megabatches" in out.out
    assert "3 worker(s), 2 at a time" in out.err and "run finished (3 done)" in out.err
    assert sorted(p.name for p in tmp_path.glob("worker-*.log")) == ["worker-0.log", "worker-1.log", "worker-2.log"]
