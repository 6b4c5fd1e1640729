"""LocalStore: a directory on disk, the embedded default store."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from vaultsh.errors import Cancelled, NotFoundError, StoreError
from vaultsh.store.base import Listing, ObjectInfo, normalize_key

_TMP_SUFFIX = ".vaultsh-tmp"
_COPY_CHUNK = 8 << 20
_MKDIR_ATTEMPTS = 8  # a concurrent delete may prune a directory we just created


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere: the classic set-and-restore (not thread-safe, but brief)
    os.umask(old)
    return old


def _new_file_mode() -> int:
    """The mode open(path, "w") would give a new file: 0o666 minus the umask."""
    return 0o666 & ~_umask()


def _chmod_fd(fd: int, path: str) -> None:
    mode = _new_file_mode()
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # pragma: no cover - Windows before 3.13
        os.chmod(path, mode)


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new hidden temp file in `path`'s directory, (fd, name), to be renamed onto `path` once written."""
    return tempfile.mkstemp(prefix="." + path.name + ".", suffix=_TMP_SUFFIX, dir=path.parent)


@contextmanager
def _removed_on_error(tmp: str) -> Iterator[None]:
    """Delete the temp file `tmp` if the block raises (anything, an interrupt too), then let the error go on."""
    try:
        yield
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _fsync_dir(path: str | Path) -> None:
    """Make a rename/create inside `path` durable (best effort where directories can't be fsynced)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems that refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _has_objects(path: str | Path) -> bool:
    """True when some regular (non-temp, non-symlink) file lies anywhere below `path`."""
    stack = [os.fspath(path)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                if entry.is_symlink() or entry.name.endswith(_TMP_SUFFIX):
                    continue
                if entry.is_file(follow_symlinks=False):
                    return True
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return False


class LocalStore:
    """A store over a local directory.

    Writes go to a temp file in the target directory, are fsynced, given the
    usual 0o666-minus-umask mode and renamed into place (and the directory is
    fsynced), so a crash never leaves a half-written file under a final name.
    Keys can never resolve outside the root: '..', absolute keys and symlinks
    inside the root are rejected.

    S3 semantics where a filesystem differs: a "directory" exists only while
    some object lies under it (deleting the last object removes the emptied
    directories; `list_dir` never reports a prefix with no objects), a key
    ending in '/' never names an object, and a key cannot be both an object and
    a prefix (`a` and `a/b`): storing the second raises StoreError naming the first.
    """

    def __init__(self, root: str | Path, create: bool = True):
        root = Path(root).expanduser()
        if create:
            root.mkdir(parents=True, exist_ok=True)
        elif not root.is_dir():
            raise NotFoundError(f"local store {str(root)!r} does not exist or is not a directory")
        self.root = root.resolve()
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    # -- paths -------------------------------------------------------------
    def _path(self, key: str) -> Path:
        key = normalize_key(key).rstrip("/")
        path = self.root / key if key else self.root
        # Refuse symlinks anywhere between the root and the target.
        cur = self.root
        for part in Path(key).parts if key else ():
            cur = cur / part
            if cur.is_symlink():
                raise StoreError(f"refusing key {key!r}: {part!r} is a symlink inside the store")
        return path

    def child_uri(self, key: str) -> str:
        return str(self._path(key))

    def _object_key(self, key: str) -> str | None:
        """The normalized key when it can name an object (not the root, not ending in '/')."""
        norm = normalize_key(key)
        if not norm or norm.endswith("/"):
            return None
        return norm

    # -- writes ------------------------------------------------------------
    def _clash(self, key: str, other: str, other_is_dir: bool) -> StoreError:
        if other_is_dir:
            why = f"{other!r} is a prefix (directory) holding other objects"
        else:
            why = f"{other!r} is already an object, so it cannot also be a prefix (directory)"
        return StoreError(f"cannot store {key!r} in {self.uri}: {why}")

    def _make_parents(self, key: str) -> list[Path]:
        """Create the directories above `key`; returns the ones created (outermost first)."""
        created: list[Path] = []
        cur = self.root
        parts = key.split("/")[:-1]
        for i, part in enumerate(parts):
            cur = cur / part
            for _attempt in range(_MKDIR_ATTEMPTS):
                try:
                    os.mkdir(cur)
                    created.append(cur)
                    break
                except FileExistsError:
                    try:
                        mode = os.lstat(cur).st_mode  # one snapshot: a concurrent prune/mkdir can't mislead
                    except FileNotFoundError:
                        continue  # a concurrent delete pruned the directory after our mkdir failed: again
                    if stat.S_ISDIR(mode):
                        break
                    raise self._clash(key, "/".join(parts[: i + 1]), other_is_dir=False) from None
                except NotADirectoryError:  # pragma: no cover - caught by the FileExistsError above
                    raise self._clash(key, "/".join(parts[:i]), other_is_dir=False) from None
        return created

    def _atomic_write(self, key: str, write, durable: bool = True) -> None:
        norm = normalize_key(key)
        if not norm:
            raise StoreError("refusing to write to the store root itself")
        if norm.endswith("/"):
            raise StoreError(f"invalid key {key!r}: ends in '/' (a prefix), which cannot name an object")
        path = self._path(norm)
        if path.is_dir():
            try:
                os.rmdir(path)  # an empty directory is no prefix (S3 semantics): replace it
            except OSError:
                raise self._clash(norm, norm + "/", other_is_dir=True) from None
        created: list[Path] = []
        for attempt in range(_MKDIR_ATTEMPTS):
            try:
                created += self._make_parents(norm)
                fd, tmp = _temp_beside(path)
                break
            except FileNotFoundError:  # a concurrent delete pruned an (empty) parent: again
                if attempt == _MKDIR_ATTEMPTS - 1:
                    raise
        with _removed_on_error(tmp):
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                _chmod_fd(f.fileno(), tmp)  # mkstemp makes 0600; give what open() would
                if durable:
                    os.fsync(f.fileno())
            try:
                os.replace(tmp, path)
            except IsADirectoryError:  # a concurrent writer made `key/` meanwhile
                raise self._clash(norm, norm + "/", other_is_dir=True) from None
            except OSError as exc:
                if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST) and path.is_dir():
                    raise self._clash(norm, norm + "/", other_is_dir=True) from None
                raise
        if not durable:
            return
        _fsync_dir(path.parent)  # the rename itself is durable
        for d in created:  # and so are the directories this write created
            _fsync_dir(d.parent)

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | Path) -> None:
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, _COPY_CHUNK)

        self._atomic_write(key, copy)

    def put_stream(self, key: str, writer, durable: bool = True) -> None:
        """Atomically store what `writer(fileobj)` writes (no intermediate copy).

        `durable=False` skips the fsyncs: the object still appears whole or not
        at all to readers and after a crash of this process, but a power loss
        may leave it empty or short (for derived files that can be checked and
        rewritten, such as export shards).
        """
        self._atomic_write(key, writer, durable)

    # -- reads -------------------------------------------------------------
    def _existing(self, key: str) -> Path:
        norm = self._object_key(key)
        path = self._path(key)
        if norm is None or not path.is_file():
            what = self.child_uri(key) + ("/" if normalize_key(key).endswith("/") else "")
            if path.is_dir():
                raise NotFoundError(f"no such object: {what} (a directory, not an object)")
            raise NotFoundError(f"no such object: {what}")
        return path

    def _read_error(self, key: str, exc: OSError) -> StoreError:
        if isinstance(exc, FileNotFoundError):  # removed between the check and the open
            return NotFoundError(f"no such object: {self.child_uri(key)}")
        return StoreError(f"cannot read {self.child_uri(key)}: {exc.strerror or exc}")

    def get_bytes(self, key: str) -> bytes:
        path = self._existing(key)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise self._read_error(key, exc) from None

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise StoreError(f"invalid range {start}+{length} for {key!r}")
        path = self._existing(key)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(length)
        except OSError as exc:
            raise self._read_error(key, exc) from None

    def read_into(self, key: str, start: int, buf: memoryview, stop=None) -> int:
        if start < 0:
            raise StoreError(f"invalid range start {start} for {key!r}")
        path = self._existing(key)
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(start)
                got = 0
                while got < len(buf):
                    if stop is not None and stop.is_set():
                        raise Cancelled()
                    n = f.readinto(buf[got:])
                    if not n:
                        break
                    got += n
        except OSError as exc:
            raise self._read_error(key, exc) from None
        return got

    def get_file(self, key: str, path: str | Path) -> None:
        """Copy the object to `path` through a temp file renamed into place (atomic)."""
        src = self._existing(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            fsrc = open(src, "rb")
        except OSError as exc:
            raise self._read_error(key, exc) from None
        with fsrc:
            fd, tmp = _temp_beside(dest)
            with _removed_on_error(tmp):
                with os.fdopen(fd, "wb") as fdst:
                    shutil.copyfileobj(fsrc, fdst, _COPY_CHUNK)
                    _chmod_fd(fdst.fileno(), tmp)
                os.replace(tmp, dest)

    def open_read(self, key: str) -> BinaryIO:
        path = self._existing(key)
        try:
            return open(path, "rb")
        except OSError as exc:
            raise self._read_error(key, exc) from None

    def head(self, key: str) -> ObjectInfo:
        path = self._existing(key)
        try:
            st = path.stat()
        except OSError as exc:
            raise self._read_error(key, exc) from None
        return ObjectInfo(
            normalize_key(key),
            st.st_size,
            datetime.fromtimestamp(st.st_mtime, timezone.utc),
            f"{st.st_size:x}-{st.st_mtime_ns:x}",
        )

    def exists(self, key: str) -> bool:
        try:
            if self._object_key(key) is None:
                return False
            return self._path(key).is_file()
        except StoreError:
            return False

    # -- listing -----------------------------------------------------------
    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        prefix = normalize_key(prefix)
        # Walk the deepest directory the prefix names, then filter by the rest.
        dir_part = prefix[: prefix.rfind("/") + 1]
        base = self._path(dir_part) if dir_part else self.root
        if not base.is_dir():
            return
        found: list[tuple[str, os.stat_result]] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            for name in filenames:
                if name.endswith(_TMP_SUFFIX):
                    continue
                key = rel_dir + name
                full = os.path.join(dirpath, name)
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(full, follow_symlinks=False)
                except FileNotFoundError:  # deleted while listing
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                found.append((key, st))
        for key, st in sorted(found):
            yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def list_dir(self, prefix: str = "") -> Listing:
        prefix = normalize_key(prefix)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return Listing([], [])
        prefixes, objects = [], []
        for entry in sorted(os.scandir(base), key=lambda e: e.name):
            if entry.is_symlink() or entry.name.endswith(_TMP_SUFFIX):
                continue
            if entry.is_dir():
                # S3 has no empty "directories": only a prefix some object lies under is one.
                if _has_objects(entry.path):
                    prefixes.append(prefix + entry.name + "/")
            elif entry.is_file():
                try:
                    st = entry.stat()
                except FileNotFoundError:  # deleted while listing
                    continue
                objects.append(
                    ObjectInfo(prefix + entry.name, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))
                )
        return Listing(prefixes, objects)

    def delete(self, key: str) -> None:
        """Remove one object and the directories it leaves empty; a missing key is not an error."""
        if self._object_key(key) is None:
            normalize_key(key)  # still reject invalid keys
            return
        path = self._path(key)
        if not path.is_file():
            return
        try:
            path.unlink()
        except FileNotFoundError:
            return
        self._prune(path.parent)

    def _prune(self, directory: Path) -> None:
        """Remove `directory` and its ancestors while they are empty, up to (not including) the root."""
        cur = directory
        while cur != self.root and self.root in cur.parents:
            try:
                os.rmdir(cur)
            except OSError:  # not empty (or already gone, or not ours to remove)
                return
            cur = cur.parent
