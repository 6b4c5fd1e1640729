"""Headless progress: turns worker events into a rich progress display.

The same event stream (collector/events.py) feeds the dashboard; this is the
printer for `--headless`, scripts and clusters.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class HeadlessPrinter:
    """Callback for worker events: one progress bar per worker, warnings/errors logged above."""

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
        self.last_done: dict[int, dict] = {}

    def __enter__(self) -> "HeadlessPrinter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def _task(self, worker: int) -> TaskID:
        if worker not in self._tasks:
            self._tasks[worker] = self.progress.add_task(
                "", total=None, worker=worker, state="starting", tokens="0", rate="0", committed=0, queue=0
            )
        return self._tasks[worker]

    def __call__(self, event: dict) -> None:
        w = event.get("worker", 0)
        task = self._task(w)
        kind = event["type"]
        if kind == "start":
            self.progress.update(task, total=event.get("n_batches"), state="starting")
            self.console.log(f"worker {w}: run {event['run']} -> {event['store']}  hooks: {', '.join(event['hooks'])}")
        elif kind == "loading":
            self.progress.update(task, state=f"loading {event['what']}")
        elif kind == "resume":
            self.console.log(f"worker {w}: resuming at megabatch {event['from_megabatch']} (batch {event['from_batch']})")
            self.progress.update(task, completed=event["from_batch"])
        elif kind == "progress":
            self.progress.update(
                task, completed=event["batches"], total=event["total_batches"], state="running",
                tokens=_short(event["tokens"]), rate=_short(event["tokens_per_s"]),
            )
        elif kind == "upload":
            self.progress.update(task, queue=event["queued"])
        elif kind == "committed":
            self.progress.update(task, committed=event["megabatch"] + 1)
        elif kind == "warning":
            self.console.log(f"[yellow]worker {w}: warning: {event['message']}[/]")
        elif kind == "error":
            self.console.log(f"[red]worker {w}: error: {event['message']}[/]")
        elif kind == "stopping":
            self.progress.update(task, state="stopping")
            self.console.log(f"worker {w}: stopping: finishing megabatch {event.get('megabatch')} "
                             f"({event.get('filled')}/{event.get('batches_per_upload')} batches), then exit")
        elif kind == "done":
            self.last_done[w] = event
            if event.get("already_complete"):
                self.console.log(f"worker {w}: shard already complete ({event['batches']} batches, "
                                 f"{event['megabatches']} megabatches committed); nothing to do")
            self.progress.update(task, state=event["status"])


def _short(n: float) -> str:
    """12345 -> '12.3k' (compact, for a progress line)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"
