"""The shell's state: the store, where we are, caches, consoles and confirmations.

The store is the root the user can move in: for `s3://bucket/...` the bucket;
for a local path the store directory (when the path is a run or a hook
directory, the directory holding the run). The current directory `cwd` is a
key prefix relative to that root, without leading or trailing '/'
("" is the root).
"""

from __future__ import annotations

import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from vaultsh.errors import NotFoundError, StoreError, UserError
from vaultsh.run import CFG, INTERNAL, METADATA, CommitRecord, Run, megabatch_format
from vaultsh.store import Listing, Store, normalize_key
from vaultsh.terminal import collapse, safe_text

LISTING_TTL_S = 5.0  # completion and ls share listings for this long
COMMITS_TTL_S = 30.0  # a run's commit records (index -> file) for inspect/ls -l


class TTLCache:
    """A small thread-safe cache whose entries expire (completion runs in another thread)."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._data: dict = {}
        self._lock = threading.Lock()

    def get(self, key, compute: Callable[[], object], fresh: bool = False):
        if not fresh:
            with self._lock:
                hit = self._data.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.ttl:
                return hit[1]
        value = compute()
        with self._lock:
            self._data[key] = (time.monotonic(), value)
        return value

    def peek(self, key):
        with self._lock:
            hit = self._data.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        return None

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def open_shell_location(uri: str) -> tuple[Store, str]:
    """(store, cwd) for a URI given on the command line."""
    from vaultsh.store import is_s3_uri, open_location

    uri = str(uri)
    if is_s3_uri(uri):
        return open_location(uri)
    path = Path(uri).expanduser()
    if not path.exists():
        raise NotFoundError(f"{uri}: no such file or directory")
    path = path.resolve()
    if path.is_file():  # a file opens the directory holding it
        path = path.parent
    cwd_parts: list[str] = []
    # A run directory (cfg.json / _vaultsh) opens its parent as the root; a hook directory its grandparent.
    root = path
    if _looks_like_run_dir(path):
        root, cwd_parts = path.parent, [path.name]
    elif (path / METADATA).is_file() and _looks_like_run_dir(path.parent):
        root, cwd_parts = path.parent.parent, [path.parent.name, path.name]
    from vaultsh.store import LocalStore

    return LocalStore(root, create=False), "/".join(cwd_parts)


def _looks_like_run_dir(path: Path) -> bool:
    return (path / CFG).is_file() or (path / INTERNAL).is_dir()


class ShellContext:
    """Everything a command handler may use. Handlers never print; they return results."""

    def __init__(
        self,
        store: Store,
        cwd: str,
        out: Console,
        err: Console,
        *,
        interactive: bool,
        ask: Callable[[str], str | None] | None = None,
    ):
        self.store = store
        self.cwd = cwd
        self.prev_cwd: str | None = None
        self.out = out
        self.err = err
        self.interactive = interactive
        self._ask = ask
        self.listings = TTLCache(LISTING_TTL_S)
        self.commits = TTLCache(COMMITS_TTL_S)
        self._commit_records: dict[tuple[str, str], dict] = {}  # per run: records read so far (Run.iter_commits known=)
        self._commit_lock = threading.Lock()

    # -- locations -----------------------------------------------------------
    @property
    def root_uri(self) -> str:
        return self.store.uri.rstrip("/") or "/"

    def display(self, key: str | None = None, directory: bool = False) -> str:
        """The URI (or local path) of `key`: `s3://bucket/run/hook`; the root shows as `s3://bucket/`."""
        key = self.cwd if key is None else key
        base = self.root_uri
        if not key:
            return base if base.endswith("/") else base + "/"
        return f"{base.rstrip('/')}/{key}" + ("/" if directory else "")

    def location(self) -> str:
        return self.display(self.cwd)

    def resolve(self, arg: str | None) -> str:
        """A key (relative to the store root, no slashes at the ends) for a path typed by the user.

        Relative paths start at the current directory; `/x` (or the store's own
        URI/path) starts at the root; `..` may climb to the root but never above it.
        """
        if arg is None or arg == "":
            return self.cwd
        raw = str(arg)
        root = self.root_uri
        if raw.startswith("s3://"):
            if not (raw == root or raw.startswith(root.rstrip("/") + "/")):
                raise UserError(f"{raw}: not in this store ({self.display('')}); open it with `vaultsh s3 {raw}`")
            path = raw[len(root) :]
            parts: list[str] = []
        elif not root.startswith("s3://") and (raw == root or raw.startswith(root.rstrip("/") + "/")):
            path = raw[len(root) :]
            parts = []
        elif raw.startswith("/"):
            path = raw
            parts = []
        else:
            path = raw
            parts = self.cwd.split("/") if self.cwd else []
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise UserError(f"{raw}: outside the store root {self.display('')}")
                parts.pop()
                continue
            parts.append(part)
        key = "/".join(parts)
        try:
            normalize_key(key)
        except StoreError as exc:
            raise UserError(f"{raw}: {str(exc).split(': ', 1)[-1]}") from None
        return key

    # -- listings --------------------------------------------------------------
    def list_dir(self, key: str, fresh: bool = False) -> Listing:
        """One level under directory `key` (cached for completion; `fresh` refetches)."""
        prefix = key + "/" if key else ""
        return self.listings.get((self.store.uri, prefix), lambda: self.store.list_dir(prefix), fresh=fresh)

    def is_dir(self, key: str) -> bool:
        """True when some object lies under `key/` (the root always counts)."""
        if not key:
            return True
        cached = self.listings.peek((self.store.uri, key + "/"))
        if cached is not None and (cached.prefixes or cached.objects):
            return True
        for _ in self.store.iter_objects(key + "/"):
            return True
        return False

    def is_file(self, key: str) -> bool:
        return bool(key) and self.store.exists(key)

    def invalidate(self) -> None:
        self.listings.clear()
        self.commits.clear()

    # -- runs and hooks ----------------------------------------------------------
    def dir_kind(self, key: str, listing: Listing | None = None) -> str:
        """'run', 'hook' or 'dir' for directory `key`, from its listing."""
        if not key:
            return "dir"
        listing = listing if listing is not None else self.list_dir(key)
        names = {o.key.rsplit("/", 1)[-1] for o in listing.objects}
        if CFG in names or any(p.rstrip("/").rsplit("/", 1)[-1] == INTERNAL for p in listing.prefixes):
            return "run"
        if "/" in key and (METADATA in names or any(megabatch_format(n) for n in names)):
            return "hook"
        return "dir"

    def hook_of(self, key: str) -> tuple[str, str] | None:
        """(run, hook) when directory `key` is a hook directory of a run."""
        if "/" not in key or self.dir_kind(key) != "hook":
            return None
        run, hook = posixpath.split(key)
        return run, hook

    def run_commits(self, run: str, fresh: bool = False) -> list[CommitRecord]:
        """The run's commit records (cached for a while; `fresh` lists again). A refresh reads only
        the records that are new or changed since the last one: cheap on a big run that keeps growing."""

        def read() -> list[CommitRecord]:
            with self._commit_lock:
                known = self._commit_records.setdefault((self.store.uri, run), {})
                return Run(self.store, run).iter_commits(known=known)

        return self.commits.get((self.store.uri, run), read, fresh=fresh)

    def committed_files(self, run: str, hook: str):
        return Run(self.store, run).committed_files(hook, self.run_commits(run))

    # -- interaction -------------------------------------------------------------
    def error(self, message: str) -> None:
        """One `error: ...` line on the error console, the message made inert and kept on one line."""
        self.err.print(
            f"error: {safe_text(collapse(message))}", style="red", markup=False, highlight=False, soft_wrap=True
        )

    def ask(self, question: str) -> str | None:
        """A line typed by the user, or None (EOF, Ctrl-C, or no terminal to ask on)."""
        if self._ask is None:
            return None
        return self._ask(question)

    def confirm(self, question: str) -> bool:
        if self._ask is None:
            raise UserError(
                "this needs a confirmation typed in the interactive shell (`vaultsh s3`), not in batch mode"
            )
        answer = self.ask(question)
        return answer is not None and answer.strip().lower() in ("y", "yes")

    @contextmanager
    def progress(self, *columns, total: float | None = None, description: str = "") -> Iterator[Callable[..., None]]:
        """A transient rich progress display on the error console (when it is a terminal);
        yields `update(completed=, total=, advance=, **fields)`."""
        from rich.progress import Progress

        if not self.err.is_terminal:  # pipes and tests: no progress display at all
            yield lambda *args, **kwargs: None
            return
        prog = Progress(*columns, console=self.err, transient=True)
        with prog:
            task = prog.add_task(description, total=total)

            def update(
                completed: float | None = None, total: float | None = None, advance: float | None = None, **fields
            ):
                kw = dict(fields)
                if completed is not None:
                    kw["completed"] = completed
                if total is not None:
                    kw["total"] = total
                if advance is not None:
                    kw["advance"] = advance
                prog.update(task, **kw)

            yield update
