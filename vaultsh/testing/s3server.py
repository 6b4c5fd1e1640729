"""A moto S3 server on loopback for the S3 benchmarks and tests, and a byte-counting TCP relay.

The server is moto's ThreadedMotoServer on 127.0.0.1 (an OS-chosen free port),
run in a child Python process by default: moto and the benchmarked client then
each have their own interpreter (and GIL), so the client's timings are not
inflated by the server's Python work competing for the same lock, which is
closer to a real remote endpoint. `VAULTSH_BENCH_MOTO=thread` runs it in a
thread of the benchmark process instead.

    from vaultsh.testing import s3server
    url = s3server.endpoint()          # started once per process, stopped at exit
    bucket = s3server.new_bucket()
    with s3server.CountingRelay(url) as relay:
        store = S3Store(bucket, endpoint_url=relay.url)
        ...
        relay.bytes_up, relay.bytes_down

Nothing here can reach real AWS: `endpoint()` puts fake credentials in this
process's environment (the benchmark process's only), points the AWS config
files at a path that does not exist and disables the instance-metadata lookup;
every client is given the loopback endpoint explicitly. This module imports
nothing from tests/ or benchmarks/; tests/conftest.py takes its fake
credentials and the moto speed-up from here.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import uuid

FAKE_CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
AWS_ENV_TO_UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "S3_ENDPOINT_URL",
    "AWS_REGION",
    "S3_BUCKET_NAME",
    "AWS_CA_BUNDLE",
)
_START_TIMEOUT_S = 120


def use_fake_credentials() -> None:
    """Fake AWS credentials for this process; no real AWS config file is ever read."""
    for name in AWS_ENV_TO_UNSET:
        os.environ.pop(name, None)
    os.environ.update(FAKE_CREDS)
    missing = os.path.join(tempfile.gettempdir(), f"vaultsh-bench-no-aws-{uuid.uuid4().hex}")
    os.environ["AWS_CONFIG_FILE"] = os.path.join(missing, "config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(missing, "credentials")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def speed_up_moto_dispatch() -> None:
    """moto re-lists its package directory (~180 stat calls) on every request to find the
    backend; the answer never changes, so cache it. A pure speed-up; skipped silently
    if a moto release renames the function."""
    try:
        import moto.backends as backends
    except ImportError:  # pragma: no cover
        return
    original = getattr(backends, "list_of_moto_modules", None)
    if original is None or getattr(original, "_vaultsh_cached", False):
        return
    modules = tuple(original())

    def cached():
        return iter(modules)

    cached._vaultsh_cached = True  # type: ignore[attr-defined]  # marks moto as patched
    backends.list_of_moto_modules = cached


class _RangeReader:
    """Stands in for a moto key's value in a ranged GET: len() is the object size and a
    slice reads only those bytes from the key's buffer."""

    def __init__(self, key):
        self.key = key
        self.size = key.size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item):
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("only contiguous slices are supported")
        start, stop, _ = item.indices(self.size)
        if stop <= start:
            return b""
        with self.key.lock:
            self.key._value_buffer.seek(start)
            return self.key._value_buffer.read(stop - start)


_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
_tls = threading.local()


def _serve_ranges_in_place() -> bool:
    """Make moto read only the requested bytes for a ranged GET.

    Stock moto (5.x) reads the whole object for every ranged GET and slices it, so
    a download in P ranged parts costs P whole-object reads on the server:
    quadratic, unlike S3, and it would make the benchmark measure moto's slicing
    rather than the client. Only a plain `Range: bytes=A-B` / `bytes=A-` GET
    (A <= B) of a whole object is changed; everything else is moto's own code.
    Returns False (and changes nothing) if moto's internals are not as expected.
    """
    try:
        from moto.s3.models import FakeKey
        from moto.s3.responses import S3Response
    except ImportError:  # pragma: no cover
        return False
    value_prop = FakeKey.__dict__.get("value")
    get_object = getattr(S3Response, "get_object", None)
    if not isinstance(value_prop, property) or value_prop.fget is None or get_object is None:
        return False
    stock_value = value_prop.fget
    if getattr(get_object, "_vaultsh_ranges", False):
        return True
    if not hasattr(FakeKey, "size") or not hasattr(S3Response, "_handle_range_header"):
        return False

    def value(self):
        if getattr(_tls, "ranged", False):
            _tls.ranged = False  # only the body access of this one get_object
            return _RangeReader(self)
        return stock_value(self)

    def ranged_get_object(self):
        m = _RANGE_RE.match((self.headers.get("range") or "").strip())
        plain = m is not None and (not m.group(2) or int(m.group(1)) <= int(m.group(2)))
        if not plain or self._get_param("partNumber") is not None:
            return get_object(self)
        _tls.ranged = True
        try:
            return get_object(self)
        finally:
            _tls.ranged = False

    # monkeypatching moto's classes: the assignments mypy refuses are the point
    ranged_get_object._vaultsh_ranges = True  # type: ignore[attr-defined]
    FakeKey.value = property(value, value_prop.fset)  # type: ignore[method-assign, assignment]
    S3Response.get_object = ranged_get_object  # type: ignore[method-assign]
    return True


def _start_threaded():
    """A ThreadedMotoServer in this process: (server, url, "fast" or "stock" ranged GETs).

    The ranged-GET change (see `_serve_ranges_in_place`) patches moto in this
    process; `VAULTSH_BENCH_MOTO_RANGES=stock` leaves moto as it is.
    """
    from moto.server import ThreadedMotoServer

    speed_up_moto_dispatch()
    fast = os.environ.get("VAULTSH_BENCH_MOTO_RANGES", "fast") != "stock" and _serve_ranges_in_place()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access-log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}", "fast" if fast else "stock"


class _ChildServer:
    """The moto server in a child process; it exits when its stdin closes (we exit or die)."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=os.environ.copy(),
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # PIPEs, which typeshed cannot tell
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.stdout.readline()), daemon=True)
        reader.start()
        reader.join(_START_TIMEOUT_S)
        text = line[0].decode().strip() if line else ""
        if not text.startswith("URL "):
            self.stop()
            raise RuntimeError(f"the moto server process did not start (got {text!r})")
        _, self.url, self.ranges = text.split()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.stdin.close()  # the child's cue to stop
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
        for f in (self.stdin, self.stdout):
            try:
                f.close()
            except OSError:
                pass


_lock = threading.Lock()
_server = None
_url: str | None = None
_ranges = "stock"


def endpoint() -> str:
    """The URL of this process's moto server on 127.0.0.1, started on first use."""
    global _server, _url, _ranges
    with _lock:
        if _url is None:
            use_fake_credentials()
            if os.environ.get("VAULTSH_BENCH_MOTO", "process") == "thread":
                _server, _url, _ranges = _start_threaded()
            else:
                _server = _ChildServer()
                _url, _ranges = _server.url, _server.ranges
            atexit.register(stop)
        return _url


def describe() -> str:
    """How the server runs, e.g. "moto 5.2.1 in a child process, ranged GETs read in place"."""
    try:
        from importlib.metadata import version

        ver = f"moto {version('moto')}"
    except Exception:  # noqa: BLE001 - a description only
        ver = "moto"
    where = "in a child process" if isinstance(_server, _ChildServer) else "in a thread"
    how = "ranged GETs read in place" if _ranges == "fast" else "stock ranged GETs"
    return f"{ver} {where}, {how}"


def stop() -> None:
    global _server, _url
    with _lock:
        if _server is not None:
            _server.stop()
        _server, _url = None, None


def client(max_pool_connections: int = 10, url: str | None = None):
    """A plain boto3 S3 client on the loopback server (path-style addressing)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=url or endpoint(),
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=max_pool_connections,
        ),
    )


_bucket_seq = itertools.count()


def new_bucket(prefix: str = "vaultsh-bench") -> str:
    """A fresh, empty, uniquely named bucket on the server."""
    name = f"{prefix}-{next(_bucket_seq)}-{uuid.uuid4().hex[:8]}"
    client().create_bucket(Bucket=name)
    return name


def empty_bucket(bucket: str) -> None:
    """Delete every object (and abort any multipart upload) so moto frees the memory/spool."""
    c = client()
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", ()) or ():
            c.delete_object(Bucket=bucket, Key=obj["Key"])
    for up in c.list_multipart_uploads(Bucket=bucket).get("Uploads", ()) or ():
        c.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])


class CountingRelay:
    """A TCP relay on 127.0.0.1 (a free port) to `upstream_url`, counting bytes both ways.

    Bytes are copied unchanged; each accepted connection gets its own upstream
    connection. `bytes_up` counts client -> server, `bytes_down` server -> client
    (HTTP heads and bodies, i.e. everything on the wire above TCP).
    """

    def __init__(self, upstream_url: str):
        from urllib.parse import urlsplit

        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self._count_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._closing = False

    @property
    def url(self) -> str:
        assert self._listener is not None, "start the relay first"
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def total(self) -> int:
        with self._count_lock:
            return self.bytes_up + self.bytes_down

    def reset(self) -> None:
        with self._count_lock:
            self.bytes_up = self.bytes_down = self.connections = 0

    def start(self) -> CountingRelay:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._closing = True
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> CountingRelay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None  # start() made it before starting this thread
        while not self._closing:
            try:
                down, _ = listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=30)
            except OSError:
                down.close()
                continue
            with self._count_lock:
                self.connections += 1
            live = [2, threading.Lock()]  # pumps still running; the last one closes both sockets
            for src, dst, field in ((down, up, "bytes_up"), (up, down, "bytes_down")):
                t = threading.Thread(target=self._pump, args=(src, dst, field, live), daemon=True)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, field: str, live: list) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self._count_lock:
                    setattr(self, field, getattr(self, field) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            with live[1]:
                live[0] -= 1
                last = live[0] == 0
            if last:
                src.close()
                dst.close()


def _serve_child() -> None:
    """Child-process entry: serve until stdin closes."""
    use_fake_credentials()
    server, url, ranges = _start_threaded()
    sys.stdout.write(f"URL {url} {ranges}\n")
    sys.stdout.flush()
    try:
        sys.stdin.buffer.read()  # returns at EOF: the parent closed the pipe or died
    except (KeyboardInterrupt, OSError):
        pass
    server.stop()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve_child()
