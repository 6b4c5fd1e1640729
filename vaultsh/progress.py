"""Headless progress: turns worker events into a rich progress display.

The same events (vaultsh/events.py), folded into the same per-worker state,
feed the dashboard; this is the printer for `--headless`, scripts and clusters.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from vaultsh import fmt
from vaultsh.events import Done, Event, Note, Start, WorkerState, as_event, fold

_QUIET = frozenset({"start", "committed"})  # notes the bars already show (the start line is the printer's own)
_STYLE = {"warning": "yellow", "error": "red"}


class HeadlessPrinter:
    """Callback for worker events (typed or wire dicts): one progress bar per worker, notes logged above."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]w{task.fields[worker]}[/] {task.fields[state]:<8}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tokens]} tok {task.fields[rate]}/s"),
            TextColumn("mb {task.fields[committed]} q {task.fields[queue]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._tasks: dict[int, TaskID] = {}
        self.workers: dict[int, WorkerState] = {}
        self.last_done: dict[int, Done] = {}

    def __enter__(self) -> HeadlessPrinter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def _task(self, worker: int) -> TaskID:
        if worker not in self._tasks:
            self.workers[worker] = WorkerState(worker)
            self._tasks[worker] = self.progress.add_task(
                "", total=None, worker=worker, state="starting", tokens="0", rate="0", committed=0, queue=0
            )
        return self._tasks[worker]

    def __call__(self, event: Event | dict) -> None:
        e = as_event(event)
        i = e.worker if e.worker is not None else 0
        task = self._task(i)
        w = self.workers[i]
        notes = fold(w, e, time.monotonic())
        if isinstance(e, Start):
            self.console.log(
                f"worker {i}: run {escape(e.run or '?')} -> {escape(e.store or '?')}  "
                f"hooks: {escape(', '.join(e.hooks or []))}"
            )
        elif isinstance(e, Done):
            self.last_done[i] = e
        for note in notes:
            self._log(i, note)
        state = w.done_status or (f"loading {w.detail}" if w.state == "loading" else w.state)
        self.progress.update(
            task,
            completed=w.batches,
            total=w.total_batches,
            state=state,
            tokens=fmt.count(w.tokens),
            rate=fmt.count(w.tokens_per_s),
            committed=w.committed,
            queue=w.queued,
        )

    def _log(self, i: int, note: Note) -> None:
        if note.kind in _QUIET:
            return
        style = _STYLE.get(note.level)
        text = f"worker {i}: " + (f"{note.level}: " if style else "") + escape(note.message)
        self.console.log(f"[{style}]{text}[/]" if style else text)
