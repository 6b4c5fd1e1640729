"""`get`: downloads with progress, written only inside the target directory.

A key is untrusted: S3 stores `run/../../x` or `a\\b` as ordinary names. Every
local path is built from key components that are checked one by one (no '',
'.', '..', backslash, NUL or control characters), then resolved and checked to
lie inside the target directory (a symlink inside it cannot redirect the
write). Each file is written to a temp file next to its destination and
renamed into place only when every byte arrived, so a truncated download
never leaves a file under the final name.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vaultsh.errors import StoreError, UserError

CHUNK = 8 << 20
THREADS = 8


def unsafe_reason(part: str) -> str | None:
    """Why a key component cannot be a local file or directory name (None when it can)."""
    if part in ("", ".", ".."):
        return f"component {part!r}"
    if "\\" in part or "\x00" in part:
        return "a backslash or NUL byte"
    if not part.isprintable():
        return "control characters"
    return None


def local_path(target_dir: Path, rel_key: str) -> Path:
    """`target_dir/rel_key` after checking every component; raises UserError when unsafe."""
    parts = rel_key.split("/")
    for p in parts:
        why = unsafe_reason(p)
        if why is not None:
            raise UserError(f"refusing key {rel_key!r}: {why} would leave {target_dir}")
    dest = target_dir.joinpath(*parts)
    inside(target_dir, dest)
    return dest


def inside(target_dir: Path, dest: Path) -> None:
    """Raise unless `dest` (its existing part resolved, symlinks followed) lies inside `target_dir`."""
    root = target_dir.resolve()
    probe = dest.parent.resolve()
    if probe != root and root not in probe.parents:
        raise UserError(f"refusing to write {dest}: it resolves outside {target_dir}")
    if dest.is_symlink():
        raise UserError(f"refusing to write {dest}: it is a symlink")


def download(store, key: str, size: int, dest: Path, on_bytes: Callable[[int], object], uri: str) -> int:
    """Fetch `key` (`size` bytes) into `dest` with parallel ranged reads; returns the bytes written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    inside(dest.parent, dest)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.vaultsh-part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        ranges = [(s, min(CHUNK, size - s)) for s in range(0, size, CHUNK)]

        def fetch(r: tuple[int, int]) -> None:
            start, length = r
            data = store.get_range(key, start, length)
            if len(data) != length:
                raise StoreError(f"truncated download of {uri}: got {start + len(data):,} of {size:,} bytes")
            os.pwrite(fd, data, start)
            on_bytes(length)

        if len(ranges) <= 1:
            for r in ranges:
                fetch(r)
        else:
            ex = ThreadPoolExecutor(max_workers=min(THREADS, len(ranges)))
            try:
                for _ in ex.map(fetch, ranges):
                    pass
            except BaseException:  # Ctrl-C or a failed range: drop the queued ranges, don't fetch them
                ex.shutdown(wait=True, cancel_futures=True)
                raise
            ex.shutdown(wait=True)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)
    os.replace(tmp, dest)
    return size
