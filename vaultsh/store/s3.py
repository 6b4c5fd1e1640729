"""S3Store: a bucket (and optional key prefix) on S3 or any S3-compatible endpoint.

boto3 is imported lazily: this module is only loaded for `s3://` URIs.

* The client is built once, on first use, honouring `S3_ENDPOINT_URL` (when no
  `endpoint_url` is given) and the standard `AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION` variables
  (region defaults to us-east-1). botocore retries throttling, 5xx and
  connection errors with exponential backoff ("standard" mode, `store/retry.py`).
* `put_file` / `get_file` / large `put_bytes` go through boto3's transfer
  manager: parallel multipart upload and parallel ranged GETs.
* Every boto3/botocore error is translated, in one place (`_s3_errors`), into a
  one-line vaultsh error naming the object and the reason, never containing
  credentials.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from vaultsh.errors import Cancelled, NotFoundError, StoreError, UserError
from vaultsh.store.base import Listing, ObjectInfo, WriteStream, normalize_key
from vaultsh.store.retry import DEFAULT_S3_ATTEMPTS, botocore_retries

if TYPE_CHECKING:  # pragma: no cover
    from boto3.s3.transfer import TransferConfig

_CRED_ENV = "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)"
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_CRED_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_DEFAULT_REGION = "us-east-1"
_WRITE_ACTIONS = {"upload", "delete"}  # a public bucket does not help these

_loader_lock = threading.Lock()
_shared_loader = None


@dataclass(frozen=True)
class S3Credentials:
    """Explicit S3 credentials (instead of boto3's chain: env, config files, instance role). Never printed."""

    access_key: str
    secret_key: str | None = None
    session_token: str | None = None

    def __repr__(self) -> str:
        return "S3Credentials(...)"


def _new_session(credentials: S3Credentials | None = None):
    """A fresh boto3 session (so credentials and env are read anew) sharing one data loader; `credentials`
    replace boto3's own chain.

    Loading botocore's S3 service model costs ~0.15 s per session; the JSON never
    changes within a process, so every S3Store reuses the same loader.
    """
    global _shared_loader
    import boto3
    import botocore.loaders
    import botocore.session

    with _loader_lock:
        if _shared_loader is None:
            _shared_loader = botocore.loaders.create_loader()
        core = botocore.session.get_session()
        core.register_component("data_loader", _shared_loader)
        if credentials is not None:
            core.set_credentials(credentials.access_key, credentials.secret_key, credentials.session_token)
        session = boto3.session.Session(botocore_session=core)
        # boto3 appends its data path to the loader on every session: keep each path once
        paths = _shared_loader.search_paths
        paths[:] = list(dict.fromkeys(paths))
    return session


def _one_line(value: object, secrets: tuple[str, ...] = (), *, limit: int = 300) -> str:
    """`value` on one line, at most `limit` characters, with the env's secrets and `secrets` masked."""
    text = " ".join(str(value).split())
    for secret in (*(os.environ.get(name) for name in _SECRET_ENV), *secrets):  # belt and braces: never echo one
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _root_cause(exc: BaseException) -> BaseException:
    """Unwrap boto3's wrappers (S3UploadFailedError, RetriesExceededError) to the botocore error."""
    seen: set[int] = set()
    cur = exc
    while id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        last = getattr(cur, "last_exception", None)
        if name == "RetriesExceededError" and isinstance(last, BaseException):
            cur = last
            continue
        if name == "S3UploadFailedError":
            nxt = cur.__cause__ or cur.__context__
            if nxt is not None:
                cur = nxt
                continue
        break
    return cur


class S3Store:
    """A store over `s3://bucket[/prefix]`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client=None,
        multipart_threshold: int = 64 << 20,
        multipart_chunksize: int = 16 << 20,
        max_concurrency: int = 16,
        max_attempts: int = DEFAULT_S3_ATTEMPTS,
        connect_timeout: float = 10,
        read_timeout: float = 120,
        unsigned: bool | None = None,
        credentials: S3Credentials | None = None,
    ):
        bucket = (bucket or "").strip()
        if not bucket or "/" in bucket:
            raise StoreError(f"invalid S3 bucket name {bucket!r}: use s3://BUCKET[/PREFIX]")
        self.bucket = bucket
        self.prefix = normalize_key(prefix or "").strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._base = self.prefix + "/" if self.prefix else ""
        self._endpoint_arg = endpoint_url
        self.multipart_threshold = int(multipart_threshold)
        self.multipart_chunksize = int(multipart_chunksize)
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_attempts = max(1, int(max_attempts))
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.credentials = credentials  # kept for a pickled copy's client; never in repr or errors
        if unsigned is None:
            from vaultsh.store import no_sign_request

            unsigned = credentials is None and no_sign_request()
        self.unsigned = bool(unsigned)  # public buckets: no credentials, requests not signed
        self._client = client
        self._lock = threading.Lock()
        self._bucket_seen = False  # a request proved the bucket exists
        self._transfer_config: TransferConfig | None = None

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    # pickling (e.g. to worker processes): the client is rebuilt on first use
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_client"] = None
        state["_lock"] = None
        state["_transfer_config"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- client --------------------------------------------------------------
    @property
    def endpoint_url(self) -> str | None:
        """The endpoint in use (None: AWS's default endpoint, before the client exists)."""
        if self._client is not None:
            url = getattr(getattr(self._client, "meta", None), "endpoint_url", None)
            if url:
                return url
        return self._endpoint_arg or os.environ.get("S3_ENDPOINT_URL") or None

    def _endpoint_desc(self) -> str:
        return self.endpoint_url or "the default AWS S3 endpoint"

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self):
        with self._s3_errors(None, "connect to"):
            import botocore
            from botocore.config import Config

            endpoint = self._endpoint_arg or os.environ.get("S3_ENDPOINT_URL") or None
            session = _new_session(self.credentials)
            region = session.region_name or _DEFAULT_REGION
            s3_opts = {"addressing_style": "path"} if endpoint else {}
            config = Config(
                region_name=region,
                retries=botocore_retries(self.max_attempts),
                max_pool_connections=max(10, self.max_concurrency * 2),
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                s3=s3_opts or None,
                user_agent_extra="vaultsh",
                **({"signature_version": botocore.UNSIGNED} if self.unsigned else {}),
            )
            return session.client("s3", endpoint_url=endpoint, config=config)

    @property
    def transfer_config(self) -> TransferConfig:
        if self._transfer_config is None:
            from boto3.s3.transfer import TransferConfig

            self._transfer_config = TransferConfig(
                multipart_threshold=self.multipart_threshold,
                multipart_chunksize=self.multipart_chunksize,
                max_concurrency=self.max_concurrency,
                use_threads=True,
                preferred_transfer_client="classic",
            )
        return self._transfer_config

    # -- keys ----------------------------------------------------------------
    def _rel(self, key: str) -> str:
        return normalize_key(key).rstrip("/")

    def _full(self, rel: str) -> str:
        return self._base + rel

    def child_uri(self, key: str) -> str:
        rel = self._rel(key)
        return f"s3://{self.bucket}/{self._full(rel)}" if rel else self.uri

    def _write_key(self, key: str) -> tuple[str, str]:
        rel = self._rel(key)
        if not rel:
            raise StoreError(f"refusing to write to the store root itself ({self.uri})")
        if key.endswith("/"):
            raise StoreError(f"invalid key {key!r}: a key ending in '/' names a prefix, not an object")
        return rel, self._full(rel)

    # -- errors --------------------------------------------------------------
    @contextmanager
    def _s3_errors(self, rel: str | None, action: str):
        """Translate every boto3/botocore error raised inside into a vaultsh error."""
        try:
            yield
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated or re-raised below
            err = self._translate(exc, rel, action)
            if err is None:
                raise
            raise err from exc

    def _cred_source(self) -> str:
        """Where this store's credentials come from, for an error that asks to check them."""
        if self.credentials is not None:
            return "the access key and secret passed in (S3Credentials, S3RCache.from_credentials)"
        return f"{_CRED_ENV} or the AWS profile in use"

    def _secrets(self) -> tuple[str, ...]:
        c = self.credentials
        return tuple(s for s in (c.secret_key, c.session_token) if s) if c is not None else ()

    def _translate(self, exc: BaseException, rel: str | None, action: str) -> UserError | None:
        from botocore import exceptions as bce

        cause = _root_cause(exc)
        what = f"s3://{self.bucket}/{self._full(rel)}" if rel else self.uri
        endpoint = self._endpoint_desc()

        if isinstance(cause, bce.ClientError):
            error = cause.response.get("Error", {}) or {}
            code = str(error.get("Code") or "")
            status = (cause.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            message = _one_line(error.get("Message") or "", self._secrets())
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket!r} does not exist (endpoint {endpoint})")
            if code in _NOT_FOUND_CODES or (status == 404 and not code):
                if rel:
                    return NotFoundError(f"no such object: {what}")
                return StoreError(f"bucket {self.bucket!r} does not exist (endpoint {endpoint})")
            if code in _CRED_CODES:
                return StoreError(
                    f"S3 rejected the credentials ({code}) while trying to {action} {what}: "
                    f"check {self._cred_source()} (endpoint {endpoint})"
                )
            if (code in _DENIED_CODES or status == 403) and self.unsigned:
                return StoreError(
                    f"access denied ({code or status}) while trying to {action} {what} with unsigned requests "
                    f"(--no-sign-request / AWS_NO_SIGN_REQUEST): the bucket does not allow this anonymously; "
                    f"drop the option and set {_CRED_ENV}"
                )
            if code in _DENIED_CODES or status == 403:
                return StoreError(
                    f"access denied ({code or status}) while trying to {action} {what}: the credentials "
                    f"were rejected or lack permission; check {self._cred_source()}"
                )
            if code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout") or (
                isinstance(status, int) and status >= 500
            ):
                return StoreError(
                    f"S3 failed to {action} {what} after {self.max_attempts} attempt{'s' if self.max_attempts != 1 else ''}: "
                    f"{code or status}{': ' + message if message else ''}",
                    retryable=True,
                )
            return StoreError(f"S3 could not {action} {what}: {code or status}{': ' + message if message else ''}")
        if isinstance(cause, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)):
            public = "; for a public bucket add --no-sign-request (or set AWS_NO_SIGN_REQUEST=1)"
            return StoreError(
                f"no usable AWS credentials to {action} {what}: set {_CRED_ENV}, "
                f"or configure an AWS profile{public if action not in _WRITE_ACTIONS else ''}"
            )
        if isinstance(cause, bce.NoRegionError):
            return StoreError(f"no AWS region configured for {what}: set AWS_DEFAULT_REGION")
        if isinstance(cause, bce.ReadTimeoutError):
            return StoreError(
                f"S3 endpoint {endpoint} did not answer within {self.read_timeout}s while trying to {action} {what}",
                retryable=True,
            )
        if isinstance(
            cause, (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ConnectionError, bce.HTTPClientError)
        ):
            reason = re.sub(
                r"^\w*Connection\(host=[^)]*\):\s*",
                "",
                _one_line(getattr(cause, "kwargs", {}).get("error") or cause, self._secrets(), limit=200),
            )
            reason = reason.replace("Failed to establish a new connection: ", "")
            return StoreError(
                f"cannot reach S3 endpoint {endpoint}: {reason} (while trying to {action} {what})", retryable=True
            )
        if isinstance(cause, bce.ParamValidationError):
            return StoreError(f"invalid S3 request to {action} {what}: {_one_line(cause, self._secrets())}")
        if isinstance(cause, bce.BotoCoreError):
            return StoreError(f"S3 could not {action} {what}: {_one_line(cause, self._secrets())}")
        if type(cause).__module__.split(".")[0] in ("boto3", "s3transfer"):
            return StoreError(f"S3 could not {action} {what}: {_one_line(cause, self._secrets())}")
        return None

    def _bucket_missing(self) -> bool:
        """After a 404 for a key: is it the bucket that is missing? (HEAD 404s carry no body.)

        Only a 404 for the bucket itself says so; any other answer (e.g. 403 for
        credentials allowed to read objects but not to list the bucket) keeps the 404.
        """
        if self._bucket_seen:
            return False
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - only a clear 404 counts
            response = getattr(_root_cause(exc), "response", None) or {}
            code = str((response.get("Error") or {}).get("Code") or "")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return code in ("NoSuchBucket", "404", "NotFound") or status == 404
        self._bucket_seen = True
        return False

    @contextmanager
    def _reading(self, rel: str, action: str):
        """Like _s3_errors, but a key's 404 is checked against a missing bucket."""
        try:
            with self._s3_errors(rel, action):
                yield
        except NotFoundError:
            if self._bucket_missing():
                raise StoreError(f"bucket {self.bucket!r} does not exist (endpoint {self._endpoint_desc()})") from None
            raise

    # -- writes --------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        rel, full = self._write_key(key)
        if isinstance(data, memoryview):
            data = data.tobytes()
        with self._s3_errors(rel, "upload"):
            if len(data) >= self.multipart_threshold:
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, full, Config=self.transfer_config)
            else:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))

    def put_file(self, key: str, path: str | Path) -> None:
        rel, full = self._write_key(key)
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(2, "No such file", path)
        with self._s3_errors(rel, "upload"):
            self.client.upload_file(path, self.bucket, full, Config=self.transfer_config)

    def put_stream(self, key: str, writer: Callable[[WriteStream], object], durable: bool = True) -> None:
        """Stream what `writer(fileobj)` writes into one object by multipart upload (no local spool):
        the object appears only when complete; a writer that raises leaves nothing, not even parts."""
        from vaultsh.store.s3stream import MultipartSink

        rel, full = self._write_key(key)
        client = self.client
        sink = MultipartSink(
            client,
            self.bucket,
            full,
            self.multipart_chunksize,
            max_in_flight=min(8, self.max_concurrency),
            threshold=self.multipart_threshold,
        )
        try:
            with self._s3_errors(rel, "upload"):
                writer(sink)
                sink.finish()
        except BaseException:
            sink.abort()
            raise

    # -- reads ---------------------------------------------------------------
    def _read_key(self, key: str) -> tuple[str, str]:
        rel = self._rel(key)
        if not rel:
            raise NotFoundError(f"no such object: {self.uri} (the store root is not an object)")
        if key.endswith("/"):
            # A prefix is never an object (as on LocalStore, where it is a directory).
            raise NotFoundError(f"no such object: {self.child_uri(rel)}/ (a prefix, not an object)")
        return rel, self._full(rel)

    def get_bytes(self, key: str) -> bytes:
        rel, full = self._read_key(key)
        with self._reading(rel, "download"):
            resp = self.client.get_object(Bucket=self.bucket, Key=full)
            with resp["Body"] as body:
                return body.read()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise StoreError(f"invalid range {start}+{length} for {key!r}")
        rel, full = self._read_key(key)
        if length == 0:
            self.head(key)  # same NotFoundError as every other read
            return b""
        with self._reading(rel, "read a range of"):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={start}-{start + length - 1}")
            except Exception as exc:
                cause = _root_cause(exc)
                response = getattr(cause, "response", None) or {}
                code = (response.get("Error") or {}).get("Code")
                status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
                if code == "InvalidRange" or status == 416:
                    return b""  # the range starts at or past the end of the object
                raise
            with resp["Body"] as body:
                data = body.read()
        if not resp.get("ContentRange") and len(data) > length:  # an endpoint that ignored Range
            data = data[start : start + length]
        return data

    def read_into(self, key: str, start: int, buf: memoryview, stop: threading.Event | None = None) -> int:
        """One ranged GET copied into `buf` as it arrives: from the socket straight into the buffer when
        the body is plain (identity encoding, a Content-Length), else 1 MB at a time; no whole-range copy."""
        if start < 0:
            raise StoreError(f"invalid range start {start} for {key!r}")
        rel, full = self._read_key(key)
        n = len(buf)
        if n == 0:
            self.head(key)
            return 0
        with self._reading(rel, "read a range of"):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={start}-{start + n - 1}")
            except Exception as exc:
                response = getattr(_root_cause(exc), "response", None) or {}
                status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
                if (response.get("Error") or {}).get("Code") == "InvalidRange" or status == 416:
                    return 0  # the object is shorter than the caller thought
                raise
            body = resp["Body"]
            try:
                if start and not resp.get("ContentRange"):  # an endpoint that ignored Range
                    body.close()
                    data = self.get_range(key, start, n)
                    buf[: len(data)] = data
                    return len(data)
                fp = _plain_socket_stream(body)
                got = 0
                while got < n:
                    if stop is not None and stop.is_set():
                        raise Cancelled()
                    if fp is not None:
                        k = fp.readinto(buf[got : got + min(_READINTO_CHUNK, n - got)])
                    else:
                        chunk = body.read(min(_READ_CHUNK, n - got))
                        k = len(chunk)
                        buf[got : got + k] = chunk
                    if not k:
                        break
                    got += k
                if fp is not None and fp.isclosed():
                    body._raw_stream.release_conn()  # fully read: the connection can be reused
                return got
            finally:
                body.close()

    def get_file(self, key: str, path: str | Path) -> None:
        rel, full = self._read_key(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._reading(rel, "download"):
            self.client.download_file(self.bucket, full, os.fspath(dest), Config=self.transfer_config)

    def open_read(self, key: str) -> BinaryIO:
        rel, full = self._read_key(key)
        with self._reading(rel, "open"):
            return self.client.get_object(Bucket=self.bucket, Key=full)["Body"]

    def head(self, key: str) -> ObjectInfo:
        rel, full = self._read_key(key)
        with self._reading(rel, "stat"):
            resp = self.client.head_object(Bucket=self.bucket, Key=full)
        self._bucket_seen = True
        etag = resp.get("ETag")
        return ObjectInfo(
            rel,
            int(resp.get("ContentLength", 0)),
            resp.get("LastModified"),
            etag.strip('"') if isinstance(etag, str) else None,
        )

    def exists(self, key: str) -> bool:
        try:
            rel = self._rel(key)
        except StoreError:
            return False
        if not rel or key.endswith("/"):
            return False
        try:
            self.head(rel)
        except NotFoundError:
            return False
        return True

    # -- listing -------------------------------------------------------------
    def _pages(self, full_prefix: str, delimiter: str | None, action: str):
        kwargs = {"Bucket": self.bucket, "Prefix": full_prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        with self._s3_errors(None, action):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(**kwargs):
                self._bucket_seen = True
                yield page

    def _info(self, obj: dict) -> ObjectInfo | None:
        full = obj["Key"]
        if not full.startswith(self._base) or full.endswith("/"):
            return None  # outside the prefix, or a zero-byte "directory marker"
        return ObjectInfo(full[len(self._base) :], int(obj.get("Size", 0)), obj.get("LastModified"))

    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        prefix = normalize_key(prefix)
        for page in self._pages(self._base + prefix, None, "list"):
            for obj in page.get("Contents", ()) or ():
                info = self._info(obj)
                if info is not None:
                    yield info

    def list_dir(self, prefix: str = "") -> Listing:
        prefix = normalize_key(prefix)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        prefixes: list[str] = []
        objects: list[ObjectInfo] = []
        for page in self._pages(self._base + prefix, "/", "list"):
            for cp in page.get("CommonPrefixes", ()) or ():
                p = cp.get("Prefix", "")
                if p.startswith(self._base):
                    prefixes.append(p[len(self._base) :])
            for obj in page.get("Contents", ()) or ():
                info = self._info(obj)
                if info is not None:
                    objects.append(info)
        prefixes.sort()
        objects.sort(key=lambda o: o.key)
        return Listing(prefixes, objects)

    def delete(self, key: str) -> None:
        rel = self._rel(key)
        if not rel or key.endswith("/"):
            return
        with self._s3_errors(rel, "delete"):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(rel))


_READ_CHUNK = 1 << 20  # bytes copied per read() from an HTTP body
_READINTO_CHUNK = 8 << 20  # bytes read straight into the buffer per call (a stop is seen between calls)


def _plain_socket_stream(body):
    """The http.client response under botocore's StreamingBody when the body can be read into a
    buffer directly (identity encoding, a Content-Length, not chunked); else None (use body.read())."""
    raw = getattr(body, "_raw_stream", None)  # urllib3's HTTPResponse
    fp = getattr(raw, "_fp", None)  # http.client.HTTPResponse
    if fp is None or not hasattr(fp, "readinto") or not hasattr(raw, "release_conn"):
        return None
    headers = getattr(raw, "headers", None) or {}
    if (headers.get("content-encoding") or "identity").lower() != "identity" or getattr(raw, "chunked", True):
        return None
    if getattr(raw, "_fp_bytes_read", 1) != 0 or getattr(fp, "length", None) is None:
        return None
    return fp
