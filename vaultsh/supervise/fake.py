"""Stand-ins for worker processes: a scripted handle (no process) and a fake-worker launcher.

Used by the tests, the dashboard benchmark and documentation screenshots, so
the dashboard can be driven deterministically without a model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from vaultsh.events import make_event
from vaultsh.supervise.process import EVENTS_FD_PLACEHOLDER, WorkerProcess


class FakeHandle:
    """A worker handle with no process: records signals; the test decides when it exits."""

    def __init__(self, index: int, log_path: str | None = None, pid: int | None = None):
        self.index = index
        self.log_path = log_path
        self.pid = pid
        self.signals: list[tuple[int, bool]] = []
        self.started = False
        self.code: int | None = None

    def start(self, on_lines) -> None:
        self.started = True

    def poll(self) -> int | None:
        return self.code

    def send(self, sig: int, group: bool = False) -> bool:
        if self.code is not None:
            return False
        self.signals.append((sig, group))
        return True

    def memory(self) -> tuple[int, int] | None:
        return None

    def exit(self, code: int) -> None:
        self.code = code


class FakeLauncher:
    """launcher(i) -> FakeHandle; keeps every handle it made (latest last) per worker."""

    def __init__(self, log_dir: Path | None = None):
        self.log_dir = log_dir
        self.handles: dict[int, list[FakeHandle]] = {}

    def __call__(self, i: int) -> FakeHandle:
        log = str(self.log_dir / f"worker-{i}.log") if self.log_dir is not None else None
        h = FakeHandle(i, log_path=log, pid=4000 + i)
        self.handles.setdefault(i, []).append(h)
        return h

    def latest(self, i: int) -> FakeHandle:
        return self.handles[i][-1]


def event(type_: str, worker: int, time: float = 0.0, **fields) -> dict:
    """A protocol event with a fixed time (deterministic tests)."""
    e = make_event(type_, worker, **fields)
    e["time"] = time
    return e


def fakeworker_launcher(log_dir: Path, python: str = sys.executable, **opts) -> Callable[[int], WorkerProcess]:
    """Launch `python -m vaultsh.supervise.fakeworker` with `opts` (rate=, batches=, fail_after=...)."""

    def launch(i: int) -> WorkerProcess:
        argv = [python, "-m", "vaultsh.supervise.fakeworker", "--worker", str(i), "--events-fd", EVENTS_FD_PLACEHOLDER]
        for k, v in opts.items():
            if v is not None:
                argv += [f"--{k.replace('_', '-')}", str(v)]
        return WorkerProcess(argv, Path(log_dir) / f"worker-{i}.log")

    return launch
