"""Storage: one protocol, a local-directory store and an S3 store.

`open_store(uri)` picks the implementation from the URI:
`s3://bucket/prefix` -> S3Store, anything else -> LocalStore (a path).

Environment (S3): `S3_ENDPOINT_URL` and the `AWS_*` variables (read by S3Store),
`S3_BUCKET_NAME` (the default bucket, see `default_s3_uri`),
`VAULTSH_S3_MAX_ATTEMPTS` (attempts per S3 request, retries included; default 8; see `store/retry.py`)
and `AWS_NO_SIGN_REQUEST=1` (unsigned requests, for public buckets; the read
commands' `--no-sign-request` sets it).
"""

from __future__ import annotations

import os

from vaultsh.store.base import Listing, ObjectInfo, Store, join_key, normalize_key
from vaultsh.store.local import LocalStore
from vaultsh.store.retry import s3_attempts_from_env

__all__ = [
    "Listing",
    "ObjectInfo",
    "Store",
    "LocalStore",
    "open_store",
    "open_location",
    "default_s3_uri",
    "split_uri",
    "s3_location",
    "join_key",
    "normalize_key",
]

NO_SIGN_ENV = "AWS_NO_SIGN_REQUEST"


def no_sign_request() -> bool:
    """Whether S3 requests go unsigned (`AWS_NO_SIGN_REQUEST` is 1/true/yes/on)."""
    return os.environ.get(NO_SIGN_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def add_no_sign_request(parser, note: str = "") -> None:
    """The read commands' `--no-sign-request` (as in the AWS CLI)."""
    parser.add_argument(
        "--no-sign-request",
        action="store_true",
        help=f"send S3 requests unsigned, to read a public bucket without credentials (same as {NO_SIGN_ENV}=1){note}",
    )


def apply_no_sign_request(args) -> None:
    """`--no-sign-request` given: every store opened from here on (and child processes) sends unsigned requests."""
    if getattr(args, "no_sign_request", False):
        os.environ[NO_SIGN_ENV] = "1"


def is_s3_uri(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/a/b` into ("s3://bucket", "a/b"); a path into (path, "")."""
    uri = str(uri)
    if is_s3_uri(uri):
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        return f"s3://{bucket}", key
    return uri, ""


def s3_location(uri: str) -> tuple[str, str]:
    """Split an s3:// URI into (its bucket's URI, the key it names, validated and without slashes at its ends)."""
    from vaultsh.errors import StoreError

    root, key = split_uri(uri)
    try:
        return root, normalize_key(key).strip("/")
    except StoreError as exc:
        raise StoreError(f"invalid S3 URI {uri!r}: {str(exc).split(': ', 1)[-1]}") from None


def default_s3_uri() -> str:
    """`s3://$S3_BUCKET_NAME` (Activault's variable), for commands given no URI."""
    from vaultsh.errors import UserError

    name = os.environ.get("S3_BUCKET_NAME", "").strip()
    if name.startswith("s3://"):
        name = name[len("s3://") :]
    name = name.strip("/")
    if not name:
        raise UserError("set S3_BUCKET_NAME or give an s3:// URI")
    return f"s3://{name}"


def _s3_options() -> dict:
    """S3Store constructor options taken from the environment."""
    attempts = s3_attempts_from_env()
    return {} if attempts is None else {"max_attempts": attempts}


def open_store(uri: str, create: bool = True) -> Store:
    """Open the store rooted at `uri` (an `s3://bucket[/prefix]` URI or a local path)."""
    uri = str(uri)
    if is_s3_uri(uri):
        from vaultsh.store.s3 import S3Store

        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        return S3Store(bucket, prefix, **_s3_options())
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
        root, key = s3_location(uri)
        return open_store(root), key
    path = Path(uri).expanduser().resolve()
    if not path.exists():
        from vaultsh.errors import NotFoundError

        raise NotFoundError(f"{uri}: no such file or directory")
    return LocalStore(path.anchor, create=False), path.relative_to(path.anchor).as_posix()
