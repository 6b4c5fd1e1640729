"""One worker subprocess: its own session, logs to a file, events on a pipe.

The worker never sees the terminal: stdin is /dev/null, stdout and stderr are
appended to `log_path`, and its NDJSON events arrive on a dedicated pipe whose
write end it gets as `--events-fd N`. A reader thread turns lines into events
so nothing here blocks the caller.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import psutil

EVENTS_FD_PLACEHOLDER = "{events_fd}"
READ_COALESCE_S = 0.02  # events wait at most this long in the pipe (far below one screen refresh)


class WorkerHandle(Protocol):
    """What the supervisor needs of a worker, real process or test double (it only reads `pid` and `log_path`)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def log_path(self) -> str | None: ...
    def start(self, on_lines: Callable[[list[bytes]], None]) -> None: ...
    def poll(self) -> int | None: ...
    def send(self, sig: int, group: bool = False) -> bool: ...
    def memory(self) -> tuple[int, int] | None: ...


class WorkerProcess:
    """A worker started from `argv` (where "{events_fd}" is replaced by the pipe's fd)."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: str | Path,
        env: dict | None = None,
        cwd: str | None = None,
        die_with_parent: bool = False,
    ):
        self.argv = list(argv)
        self.log_path = str(log_path)
        self.env = env
        self.cwd = cwd
        self.die_with_parent = die_with_parent  # Linux: SIGTERM the worker when the spawning thread's process dies
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._ps: psutil.Process | None = None  # keyed by pid + create time
        self._reader: threading.Thread | None = None

    def start(self, on_lines: Callable[[list[bytes]], None]) -> None:
        """Spawn the worker; `on_lines` is called from a reader thread with batches of raw event lines."""
        read_fd, write_fd = os.pipe()
        os.set_inheritable(write_fd, True)
        argv = [a.replace(EVENTS_FD_PLACEHOLDER, str(write_fd)) for a in self.argv]
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab", buffering=0)
        try:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} started: {' '.join(argv)}\n".encode())
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                start_new_session=True,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=die_with_parent_preexec() if self.die_with_parent else None,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
            log.close()
        self.pid = self._proc.pid
        self._reader = threading.Thread(
            target=self._read, args=(read_fd, on_lines), daemon=True, name=f"events-{self.pid}"
        )
        self._reader.start()

    @staticmethod
    def _read(fd: int, on_lines: Callable[[list[bytes]], None]) -> None:
        """Read whole lines in batches: after each read, wait a moment so a busy worker's
        events arrive many per wake-up instead of one thread switch per event."""
        pending = b""
        try:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                pending += chunk
                lines = pending.split(b"\n")
                pending = lines.pop()
                if lines:
                    on_lines(lines)
                time.sleep(READ_COALESCE_S)
            if pending.strip():
                on_lines([pending])
        finally:
            os.close(fd)

    def reader_done(self, timeout: float = 0.0) -> bool:
        """True once every event the worker wrote has been read."""
        if self._reader is None:
            return True
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def poll(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def send(self, sig: int, group: bool = False) -> bool:
        """Signal the worker (or its whole process group); False when it is already gone."""
        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            if group:
                os.killpg(self._proc.pid, sig)  # its own session: pgid == pid
            else:
                self._proc.send_signal(sig)
        except ProcessLookupError:
            return False
        return True

    def memory(self) -> tuple[int, int] | None:
        """(RSS of the worker, summed RSS of its children) in bytes; None when it is gone."""
        import psutil

        if self.pid is None or self.poll() is not None:
            return None
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            rss = self._ps.memory_info().rss
            children = 0
            for child in self._ps.children(recursive=True):
                try:
                    children += child.memory_info().rss
                except psutil.Error:
                    pass
            return rss, children
        except psutil.Error:
            return None


def die_with_parent_preexec():
    """Linux: a preexec function that has the child SIGTERMed when its parent dies (no orphans); else None.

    libc is loaded here, before the fork: the child only makes the one prctl call.
    """
    import sys

    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigterm = int(signal.SIGTERM)
    return lambda: prctl(1, sigterm)  # PR_SET_PDEATHSIG


def last_log_line(path: str | None, limit: int = 8192) -> str | None:
    """The last non-empty line of a log file (the usual place a crash says why)."""
    lines = tail_lines(path, 20, limit)
    for line in reversed(lines):
        if line.strip() and not line.startswith("--- "):
            return line.strip()
    return None


def tail_lines(path: str | None, n: int = 50, limit: int = 65536) -> list[str]:
    """The last `n` lines of a text file (at most `limit` bytes read); [] when unreadable."""
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").replace("\r", "\n")
    lines = text.splitlines()
    if size > limit and lines:
        lines = lines[1:]  # the first one is cut
    return lines[-n:]


def tree_memory(pids: list[int]) -> dict[int, tuple[int, int]]:
    """{pid: (its RSS, summed RSS of its descendants)} for live `pids`, from one scan of the process table."""
    import psutil

    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info.get("ppid")
        if ppid:
            children.setdefault(ppid, []).append(proc.pid)

    def rss(pid: int) -> int | None:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return None

    out: dict[int, tuple[int, int]] = {}
    for pid in pids:
        own = rss(pid)
        if own is None:
            continue
        total, stack = 0, list(children.get(pid, ()))
        while stack:
            child = stack.pop()
            total += rss(child) or 0
            stack.extend(children.get(child, ()))
        out[pid] = (own, total)
    return out
