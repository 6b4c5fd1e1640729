"""The Textual dashboard: a thin view over a `Supervisor` (or a read-only `StoreWatcher`).

A timer ticks the supervisor a few times a second and redraws from its
snapshot: the latest value of every field, so however many progress events
arrived in between, each redraw costs the same. Keys call the supervisor's
control methods; nothing here starts or reads processes itself.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Footer, RichLog

from vaultsh import fmt
from vaultsh.dashboard.screens import HelpScreen, QuitScreen
from vaultsh.dashboard.widgets import Chart, Charts, SummaryPanel, TitleBar, WorkerTable
from vaultsh.supervise.state import FAILED, STOPPED, LogLine
from vaultsh.supervise.supervisor import SAMPLE_EVERY_S

if TYPE_CHECKING:
    from vaultsh.explore.batch import LatestBatches

LEVEL_STYLE = {"info": "", "warning": "yellow", "error": "bold white on red"}
LEVEL_MARK = {"info": " ", "warning": "!", "error": "✘"}


class Dashboard(App):
    """`vaultsh collect` (controls workers) or `vaultsh watch` (read-only) on one screen."""

    CSS_PATH = str(Path(__file__).with_name("dashboard.tcss"))  # absolute: subclasses live elsewhere
    TITLE = "vaultsh"
    ENABLE_COMMAND_PALETTE = False

    BINDINGS = [
        Binding("p", "pause", "Pause"),
        Binding("P", "pause_all", "Pause all"),
        Binding("s", "stop", "Stop"),
        Binding("S", "stop_all", "Stop all"),
        Binding("r", "restart", "Restart"),
        Binding("l", "toggle_log", "Log"),
        Binding("enter", "worker_log", "Worker log", show=False),
        Binding("escape", "all_logs", "All logs", show=False),
        Binding("v", "batch_view", "View batch", show=False),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]
    PANELS_EVERY_S = 0.5
    CONTROL_ACTIONS = frozenset({"pause", "pause_all", "stop", "stop_all", "restart"})

    def __init__(
        self, source, mode: str = "collect", refresh_s: float = 0.2, wall_clock: Callable[[], float] = time.time, **kw
    ):
        super().__init__(**kw)
        self.source = source
        self.mode = mode
        self.refresh_s = refresh_s
        self.wall_clock = wall_clock
        self.quitting = False
        self.selected_log: int | None = None  # worker whose log file the pane shows; None: all events
        self._version = -1
        self._log_seq = 0
        self._tail_sig: tuple | None = None
        self._tail_checked = 0.0
        self._panels_at = 0.0
        self._panels_dirty = False
        self._title_shown: tuple | None = None
        self._elapsed_shown = ""
        self._history_len: tuple | None = None
        # (wall time the screen showed it) - (worker's event time), seconds: for the benchmark
        self.latencies: deque[float] = deque(maxlen=10000)
        self._shown_progress: dict[int, float] = {}
        self._batches: LatestBatches | None = None  # kept between openings of the batch viewer

    # -- layout -----------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield TitleBar(id="title")
        yield SummaryPanel(id="summary")
        yield WorkerTable(id="workers")
        yield Charts(id="charts")
        with Vertical(id="logbox"):
            yield RichLog(id="log", markup=True, wrap=False, max_lines=2000, auto_scroll=True, min_width=20)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#logbox").border_title = "events: all workers"
        table = self.query_one(WorkerTable)
        table.set_columns(self.size.width)
        self.screen.set_class(self.size.height >= 40, "tall")
        table.focus()
        self.redraw(force=True)
        self.call_after_refresh(self._draw_charts)  # again once laid out: the charts' width sets their span
        self.set_interval(self.refresh_s, self.redraw)

    def on_resize(self, event) -> None:
        self.screen.set_class(event.size.height >= 40, "tall")
        table = self.query_one(WorkerTable)
        if table.set_columns(event.size.width):
            self.redraw(force=True)

    # -- drawing ----------------------------------------------------------
    def redraw(self, force: bool = False) -> None:
        """Tick the source and redraw what changed."""
        if not self.is_running:  # shutting down: the interval may tick once more while the widgets go
            return
        src = self.source
        src.tick()
        workers = src.snapshot()
        totals = src.totals(workers)
        elapsed = fmt.clock(totals.elapsed)
        changed = force or src.version != self._version
        if self.selected_log is not None and not changed and time.monotonic() - self._tail_checked >= 0.5:
            self._draw_log(workers)  # a worker's log file grows without events
        panels_due = time.monotonic() - self._panels_at >= self.PANELS_EVERY_S
        if not changed and elapsed == self._elapsed_shown and not (self._panels_dirty and panels_due):
            self._maybe_exit()
            return
        self._version = src.version
        if changed:
            # Worker rows and the log at the full rate; the run-wide panels twice a second.
            self.query_one(WorkerTable).show(workers)
            self._draw_log(workers)
            self._track_latency(workers)
        note = "stopping: waiting for workers to commit" if self.quitting else ("read-only" if src.read_only else "")
        title = (tuple(sorted(totals.by_state.items())), elapsed, note, self.size.width)
        if force or title != self._title_shown:
            self._title_shown = title
            self.query_one(TitleBar).show(src.info, totals, self.mode, note, self.size.width)
        if force or elapsed != self._elapsed_shown or panels_due:
            self._panels_at = time.monotonic()
            self._panels_dirty = False
            self._elapsed_shown = elapsed
            wide = self.size.width >= 120 and self.size.height >= 40
            self.query_one(SummaryPanel).show(src.info, totals, src.system_memory, wide)
            self._draw_charts()
        elif changed:
            self._panels_dirty = True
        self._maybe_exit()

    def _draw_charts(self) -> None:
        src = self.source
        charts = self.query_one(Charts)
        n = max(10, charts.size.width // 2 - 2)
        sig = (
            n,
            len(src.tokens_history),
            src.tokens_history[-1] if src.tokens_history else None,
            len(src.upload_history),
            src.upload_history[-1] if src.upload_history else None,
        )
        if sig == self._history_len:
            return
        self._history_len = sig
        every = getattr(src, "sample_every_s", SAMPLE_EVERY_S)
        charts.query_one("#chart-tokens", Chart).show(list(src.tokens_history)[-n:], every)
        charts.query_one("#chart-upload", Chart).show(list(src.upload_history)[-n:], every)

    def _draw_log(self, workers) -> None:
        log = self.query_one("#log", RichLog)
        if self.selected_log is None:
            for line in self.source.logs_since(self._log_seq):
                self._log_seq = line.seq
                log.write(self._format_line(line))
            return
        i = self.selected_log
        self._tail_checked = time.monotonic()
        w = next((w for w in workers if w.index == i), None)
        lines = self.source.log_tail(i, 200)
        sig = (len(lines), lines[-1] if lines else None, len(w.log) if w else 0, w.log[-1].seq if w and w.log else 0)
        if sig == self._tail_sig:
            return
        self._tail_sig = sig
        log.clear()
        for text in lines:
            log.write(escape(text))
        if w is not None and w.log:
            log.write("[dim]── events ──[/]")
            for line in w.log:
                log.write(self._format_line(line))

    def _format_line(self, line: LogLine) -> str:
        start = self.source.started_at or line.time
        who = f"w{line.worker}" if line.worker is not None else "--"
        style = LEVEL_STYLE.get(line.level, "")
        text = f"{LEVEL_MARK.get(line.level, ' ')} {escape(line.message)}"
        return f"[dim]{fmt.clock(line.time - start)}[/] [b]{who:>3}[/] " + (f"[{style}]{text}[/]" if style else text)

    def _track_latency(self, workers) -> None:
        fresh = []
        for w in workers:
            t = w.last_progress_time
            if t is not None and t != self._shown_progress.get(w.index):
                self._shown_progress[w.index] = t
                fresh.append(t)
        if fresh:
            self.call_after_refresh(lambda: self.latencies.extend(self.wall_clock() - t for t in fresh))

    def _maybe_exit(self) -> None:
        if self.quitting and not self.source.running():
            self.exit(self.source.exit_code() if hasattr(self.source, "exit_code") else 0)

    # -- actions ----------------------------------------------------------
    def check_action(self, action: str, parameters) -> bool | None:
        if action in self.CONTROL_ACTIONS and self.source.read_only:
            return False  # hidden from the footer; the keys do nothing
        return True

    def _selected(self) -> int | None:
        return self.query_one(WorkerTable).selected

    def _after(self, done, what: str) -> None:
        if not done:
            self.notify(what, severity="warning", timeout=3)
        self.redraw(force=True)

    def _on_running(self, act: Callable[[int], list[int]]) -> None:
        """`act` on the selected worker, which must be running."""
        i = self._selected()
        if i is not None:
            self._after(act(i), f"worker {i} is not running")

    def action_pause(self) -> None:
        self._on_running(self.source.toggle_pause)

    def action_pause_all(self) -> None:
        self._after(self.source.toggle_pause(None), "no worker is running")

    def action_stop(self) -> None:
        self._on_running(self.source.stop)

    def action_stop_all(self) -> None:
        self._after(self.source.stop(None), "no worker is running")

    def action_restart(self) -> None:
        i = self._selected()
        if i is None:
            return
        w = next(w for w in self.source.snapshot() if w.index == i)
        if w.state not in (FAILED, STOPPED):
            self._after(False, f"worker {i} is {w.state}: only a failed or stopped worker can be restarted")
            return
        self._after(self.source.restart(i), f"worker {i} could not be restarted")

    def action_toggle_log(self) -> None:
        box = self.query_one("#logbox")
        box.display = not box.display

    def on_worker_table_opened(self, event: WorkerTable.Opened) -> None:
        self.action_worker_log()

    def action_worker_log(self) -> None:
        i = self._selected()
        if i is None:
            return
        if self.selected_log == i:
            self.action_all_logs()
            return
        self.selected_log = i
        self._tail_sig = None
        path = next((w.log_path for w in self.source.snapshot() if w.index == i), None)
        where = "commits" if self.source.read_only else (path or "no log file")
        box = self.query_one("#logbox")
        box.display = True
        box.border_title = f"worker {i}: {where}  [dim](esc: all workers)[/]"
        self._draw_log(self.source.snapshot())

    def action_all_logs(self) -> None:
        if self.selected_log is None:
            return
        self.selected_log = None
        self.query_one("#logbox").border_title = "events: all workers"
        log = self.query_one("#log", RichLog)
        log.clear()
        self._log_seq = 0
        self._draw_log(self.source.snapshot())

    def action_batch_view(self) -> None:
        """The batch viewer over the newest committed megabatch of a hook of this run."""
        from vaultsh.dashboard.batchview import BatchScreen
        from vaultsh.explore.batch import LatestBatches
        from vaultsh.run import Run

        note = None
        if self._batches is None:
            run = getattr(self.source, "run", None)  # a StoreWatcher holds its Run; a Supervisor knows its URI
            uri = self.source.info.store
            if isinstance(run, Run):
                self._batches = LatestBatches(run)
            elif uri:
                self._batches = LatestBatches(uri)
            else:
                note = "the run's store is not known yet (no worker has started)"
        committed = lambda: self.source.totals().committed  # noqa: E731 - what the workers' events (or watch) say
        self.push_screen(BatchScreen(self._batches, list(self.source.info.hooks), note=note, committed=committed))

    def action_help(self) -> None:
        bindings = [b for b in self.BINDINGS if isinstance(b, Binding)]  # every one here (textual allows tuples too)
        self.push_screen(HelpScreen(bindings, read_only=self.source.read_only))

    async def action_quit(self) -> None:
        if self.quitting:
            self.source.stop(None)  # asked again while stopping: leave at once
            return
        if not self.source.running():
            self.exit(self.source.exit_code() if hasattr(self.source, "exit_code") else 0)
            return

        def chosen(answer: str | None) -> None:
            if answer == "stop":
                self.quitting = True
                self.source.stop(None)
                self.redraw(force=True)
            elif answer == "detach":
                self.exit(0, message="workers left running; follow them with `vaultsh watch`")

        self.push_screen(QuitScreen(), chosen)
