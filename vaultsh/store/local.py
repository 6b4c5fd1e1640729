"""LocalStore: a directory on disk, the embedded default store."""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterator

from vaultsh.errors import NotFoundError, StoreError
from vaultsh.store.base import Listing, ObjectInfo, normalize_key

_TMP_SUFFIX = ".vaultsh-tmp"
_COPY_CHUNK = 8 << 20


class LocalStore:
    """A store over a local directory.

    Writes go to a temp file in the target directory, are fsynced and renamed
    into place, so a crash never leaves a half-written file under a final name.
    Keys can never resolve outside the root: '..', absolute keys and symlinks
    inside the root are rejected.
    """

    def __init__(self, root: str | Path, create: bool = True):
        root = Path(root).expanduser()
        if create:
            root.mkdir(parents=True, exist_ok=True)
        elif not root.is_dir():
            raise NotFoundError(f"local store {str(root)!r} does not exist or is not a directory")
        self.root = root.resolve()
        self.uri = str(self.root)

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

    # -- writes ------------------------------------------------------------
    def _atomic_write(self, key: str, write) -> None:
        path = self._path(key)
        if not normalize_key(key).rstrip("/"):
            raise StoreError("refusing to write to the store root itself")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=_TMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | Path) -> None:
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, _COPY_CHUNK)

        self._atomic_write(key, copy)

    def put_stream(self, key: str, writer) -> None:
        """Atomically store what `writer(fileobj)` writes (no intermediate copy)."""
        self._atomic_write(key, writer)

    # -- reads -------------------------------------------------------------
    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError(f"no such object: {self.child_uri(key)}")
        return path

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise StoreError(f"invalid range {start}+{length} for {key!r}")
        with open(self._existing(key), "rb") as f:
            f.seek(start)
            return f.read(length)

    def get_file(self, key: str, path: str | Path) -> None:
        src = self._existing(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def open_read(self, key: str) -> BinaryIO:
        return open(self._existing(key), "rb")

    def head(self, key: str) -> ObjectInfo:
        path = self._existing(key)
        st = path.stat()
        return ObjectInfo(normalize_key(key), st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def exists(self, key: str) -> bool:
        try:
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
                if not key.startswith(prefix) or os.path.islink(full):
                    continue
                found.append((key, os.stat(full)))
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
                prefixes.append(prefix + entry.name + "/")
            elif entry.is_file():
                st = entry.stat()
                objects.append(ObjectInfo(prefix + entry.name, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc)))
        return Listing(prefixes, objects)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink()
