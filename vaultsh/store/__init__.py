"""Storage: one protocol, a local-directory store and an S3 store.

`open_store(uri)` picks the implementation from the URI:
`s3://bucket/prefix` -> S3Store, anything else -> LocalStore (a path).
"""

from __future__ import annotations

from vaultsh.store.base import Listing, ObjectInfo, Store, join_key, normalize_key
from vaultsh.store.local import LocalStore

__all__ = ["Listing", "ObjectInfo", "Store", "LocalStore", "open_store", "split_uri", "join_key", "normalize_key"]


def is_s3_uri(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/a/b` into ("s3://bucket", "a/b"); a path into (path, "")."""
    uri = str(uri)
    if is_s3_uri(uri):
        rest = uri[len("s3://"):]
        bucket, _, key = rest.partition("/")
        return f"s3://{bucket}", key
    return uri, ""


def open_store(uri: str, create: bool = True) -> Store:
    """Open the store rooted at `uri` (an `s3://bucket[/prefix]` URI or a local path)."""
    uri = str(uri)
    if is_s3_uri(uri):
        from vaultsh.store.s3 import S3Store

        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        return S3Store(bucket, prefix)
    return LocalStore(uri, create=create)


def open_location(uri: str) -> tuple[Store, str]:
    """Open the store that holds `uri` and return (store, key of uri inside it).

    For S3 the store is the bucket and the key the rest of the URI; for a local
    path the store is the filesystem root (read-only use) and the key the
    resolved path, so files, runs and hook dirs can all be addressed and their
    parents reached.
    """
    from pathlib import Path

    uri = str(uri)
    if is_s3_uri(uri):
        root, key = split_uri(uri)
        return open_store(root), key.strip("/")
    path = Path(uri).expanduser().resolve()
    if not path.exists():
        from vaultsh.errors import NotFoundError

        raise NotFoundError(f"{uri}: no such file or directory")
    return LocalStore(path.anchor, create=False), path.relative_to(path.anchor).as_posix()
