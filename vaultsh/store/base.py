"""The one storage protocol everything above the store is written against.

Keys are relative, '/'-separated paths under the store's root (for S3 the root
is `bucket/prefix`, for a local store a directory). A "directory" is a key
prefix ending in '/'.
"""

from __future__ import annotations

import posixpath
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from vaultsh.errors import StoreError


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the store root), size and mtime."""

    key: str
    size: int
    mtime: datetime | None = None
    etag: str | None = None  # changes when the object is replaced (S3's ETag; size and mtime locally)

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)


@dataclass(frozen=True)
class Listing:
    """One level of a listing: sub-prefixes (ending in '/') and objects."""

    prefixes: list[str]
    objects: list[ObjectInfo]


class WriteStream(Protocol):
    """What a `put_stream` writer writes to: LocalStore's temp file, S3Store's multipart upload (s3stream)."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...
    def tell(self) -> int: ...
    def flush(self) -> None: ...


@runtime_checkable
class Store(Protocol):
    """What every store offers. Writes are atomic: a reader never sees half an object."""

    uri: str  # the root, e.g. "s3://bucket/prefix" or "/abs/path"

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store `data` under `key`, replacing any existing object."""

    def put_file(self, key: str, path: str | Path) -> None:
        """Store the local file at `path` under `key` (parallel multipart on S3)."""

    def put_stream(self, key: str, writer: Callable[[WriteStream], object], durable: bool = True) -> None:
        """Store whatever `writer(fileobj)` writes, atomically.

        LocalStore streams into a temp file that is renamed into place (fsynced
        unless `durable=False`); S3Store streams it as a multipart upload while it
        is written, no local spool (durable once stored, whatever `durable` says).
        """

    def get_bytes(self, key: str) -> bytes:
        """The whole object. Raises NotFoundError."""

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from offset `start` (fewer at the end of the object)."""

    def read_into(self, key: str, start: int, buf: memoryview, stop: threading.Event | None = None) -> int:
        """Read bytes start..start+len(buf) of `key` straight into `buf`; returns how many there were
        (fewer: the object is shorter). Raises NotFoundError, or Cancelled once `stop` is set."""

    def get_file(self, key: str, path: str | Path) -> None:
        """Download the object to a local file (parallel ranged GETs on S3)."""

    def open_read(self, key: str) -> BinaryIO:
        """A streaming, read-only file object over the object."""

    def head(self, key: str) -> ObjectInfo:
        """Size, mtime and etag of one object. Raises NotFoundError."""

    def exists(self, key: str) -> bool:
        """True when an object is stored under exactly this key."""

    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under `prefix`, recursively, in key order, page by page."""

    def list_dir(self, prefix: str = "") -> Listing:
        """One level under `prefix`: sub-prefixes and the objects directly in it."""

    def delete(self, key: str) -> None:
        """Remove one object; a missing key is not an error."""

    def child_uri(self, key: str) -> str:
        """The full URI of `key`, for messages and cross-store references."""


def normalize_key(key: str) -> str:
    """Validate a relative key and return it without leading './' or doubled slashes.

    Rejects absolute keys, '..' components, backslashes and NUL bytes, so a key
    read from a bucket can never address anything outside the store's root.
    """
    if not isinstance(key, str):
        raise StoreError(f"invalid key {key!r}: keys are strings")
    if "\x00" in key or "\\" in key:
        raise StoreError(f"invalid key {key!r}: contains a NUL byte or backslash")
    if key.startswith("/"):
        raise StoreError(f"invalid key {key!r}: keys are relative to the store root")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StoreError(f"invalid key {key!r}: '..' is not allowed in keys")
    out = "/".join(parts)
    if key.endswith("/") and out:
        out += "/"
    return out


def join_key(*parts: str) -> str:
    """Join key parts with '/', ignoring empty parts."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))
