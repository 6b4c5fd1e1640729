"""Where the data goes: store URIs, Activault's `bucket_name`, `$VAULTSH_STORE`.

Order of precedence (see `resolve_storage_uri`): ``VAULTSH_STORE`` when set
and non-empty, else `storage.uri`, else `data_config.bucket_name` (a bare
bucket name is ``s3://NAME``; something path-like is a local directory),
else ``./vault``.
"""

from __future__ import annotations

import os
import re

from collector.config.errors import field_error

STORE_ENV = "VAULTSH_STORE"
DEFAULT_STORE = "./vault"


def looks_like_path(s: str) -> bool:
    return (
        s in (".", "..")
        or s.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", s))
    )


_BUCKET_RX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_uri(v: str) -> str:
    s = v.strip()
    if not s:
        raise field_error("is not allowed (write s3://bucket/prefix or a local path)")
    if s.startswith("file://"):
        s = s[len("file://") :] or "/"
    if "://" in s:
        if not s.startswith("s3://"):
            scheme = s.split("://", 1)[0]
            raise field_error(
                "uses an unsupported scheme '{scheme}' (write s3://bucket/prefix or a local path)", scheme=scheme
            )
        bucket = s[len("s3://") :].split("/", 1)[0]
        if not _BUCKET_RX.match(bucket):
            raise field_error("has no valid bucket name (write s3://bucket or s3://bucket/prefix)")
        return s.rstrip("/")
    return s


def storage_uri_for_bucket(bucket_name: str) -> str:
    """Activault's `data_config.bucket_name` as a store URI.

    A bare bucket name ("main", "main/prefix") is S3; a path-like value
    ("./x", "/x", "~/x", ".") is a local directory; "s3://..." stays as is.
    """
    s = bucket_name.strip()
    if s.startswith(("s3://", "file://")) or looks_like_path(s):
        return s
    return f"s3://{s}"


def check_bucket_name(v: str | None) -> str | None:
    if v is None:
        return v
    s = v.strip()
    if not s:
        raise field_error("is not allowed (a bucket name, s3://bucket/prefix or a local path)")
    uri = storage_uri_for_bucket(s)
    if uri.startswith("s3://") and not s.startswith("s3://"):
        bucket = s.split("/", 1)[0]
        if not _BUCKET_RX.match(bucket):
            raise field_error(
                "is not a bucket name (letters, digits, '.', '-', '_'; write ./dir for a local directory)"
            )
    check_uri(uri)
    return s


def resolve_storage_uri(
    uri: str | None, bucket_name: str | None, data_label: str
) -> tuple[str | None, str | None, str | None]:
    """(store URI, where it was written or None for `storage.uri`/the default, error or None).

    `uri` is `storage.uri` (already checked), `bucket_name` the data section's
    `bucket_name` (already checked) and `data_label` how that section was spelled.
    """
    env = os.environ.get(STORE_ENV, "").strip()
    if env:
        try:
            return check_uri(env), STORE_ENV, None
        except Exception:
            return (
                None,
                STORE_ENV,
                f"{STORE_ENV}: {env!r} is not a store URI (write s3://bucket/prefix or a local path)",
            )
    if uri is not None:
        return uri, None, None
    if bucket_name:
        return check_uri(storage_uri_for_bucket(bucket_name)), f"{data_label}.bucket_name", None
    return DEFAULT_STORE, None, None
