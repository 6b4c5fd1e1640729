"""A small HTTP reverse proxy that injects faults between boto3 and the moto server.

Requests are forwarded byte-for-byte (request line, headers and body exactly as
the client sent them, Content-Length or chunked/aws-chunked bodies), one fresh
upstream connection per request; the upstream response is read fully and
relayed byte-for-byte. On demand the proxy instead answers the next N matching
requests with an S3-style XML error (503 SlowDown, 500 InternalError, 403
InvalidAccessKeyId, ...) or resets the connection in the middle of the request
body, so retry behaviour is exercised through the real protocol.

    with FaultProxy(upstream_url) as proxy:
        proxy.fail_next(n=2, method="PUT", mode="503")
        store = S3Store(bucket, endpoint_url=proxy.url)
        ...
        assert proxy.faults_injected == 2
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

_STATUS = {
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "403": (
        403,
        "Forbidden",
        "InvalidAccessKeyId",
        "The AWS Access Key Id you provided does not exist in our records.",
    ),
}
_MAX_HEAD = 64 << 10


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ClientGone(Exception):
    pass


@dataclass
class _Rule:
    remaining: int
    method: str | None
    mode: str
    code: str | None
    path_contains: str | None

    def matches(self, method: str, path: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.method and self.method.upper() != method.upper():
            return False
        if self.path_contains and self.path_contains not in path:
            return False
        return True


def _read_head(rfile) -> bytes:
    """Read a request/response head up to and including the blank line."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = rfile.readline(_MAX_HEAD + 1)
        if not line:
            if lines:
                raise _ClientGone("connection closed inside a header block")
            return b""
        lines.append(line)
        size += len(line)
        if size > _MAX_HEAD:
            raise _ClientGone("header block too large")
        if line in (b"\r\n", b"\n"):
            if len(lines) == 1:  # tolerate stray CRLF between messages
                lines.clear()
                size = 0
                continue
            return b"".join(lines)


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    text = head.decode("latin-1")
    first, *rest = text.split("\r\n")
    headers: dict[str, str] = {}
    for line in rest:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return first, headers


def _read_exact(rfile, n: int) -> bytes:
    data = rfile.read(n)
    if len(data) != n:
        raise _ClientGone(f"short body: {len(data)} of {n} bytes")
    return data


def _read_chunked(rfile) -> bytes:
    """Read a chunked body raw (framing, extensions and trailers included)."""
    out = []
    while True:
        line = rfile.readline(_MAX_HEAD)
        if not line:
            raise _ClientGone("connection closed inside a chunked body")
        out.append(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then the final blank line
                trailer = rfile.readline(_MAX_HEAD)
                if not trailer:
                    raise _ClientGone("connection closed inside chunked trailers")
                out.append(trailer)
                if trailer in (b"\r\n", b"\n"):
                    return b"".join(out)
        out.append(_read_exact(rfile, size + 2))  # data + CRLF


class FaultProxy:
    """A threaded reverse proxy on 127.0.0.1 (a free port) in front of `upstream_url`."""

    def __init__(self, upstream_url: str, timeout: float = 30.0):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self.faults: list[tuple[str, str, str]] = []  # (mode, method, path) of every injected fault
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control -------------------------------------------------------------
    def fail_next(
        self,
        n: int = 1,
        method: str | None = None,
        mode: str = "503",
        code: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Fault the next `n` requests matching `method` / `path_contains`.

        mode: "503" (SlowDown), "500" (InternalError), "403" (InvalidAccessKeyId),
        each with an S3 XML error body and `code` overriding the error code; or
        "reset": read half of the request body, then reset the TCP connection.
        """
        if mode not in _STATUS and mode != "reset":
            raise ValueError(f"unknown fault mode {mode!r}")
        with self._lock:
            self._rules.append(_Rule(n, method, mode, code, path_contains))

    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        """How many requests (faulted or forwarded) matched."""
        with self._lock:
            return sum(
                1
                for m, p in self.requests
                if (method is None or m.upper() == method.upper()) and (path_contains is None or path_contains in p)
            )

    @property
    def faults_injected(self) -> int:
        with self._lock:
            return len(self.faults)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return sum(r.remaining for r in self._rules)

    @property
    def url(self) -> str:
        assert self._server is not None, "start the proxy first"
        host, port = cast("tuple[str, int]", self._server.server_address[:2])  # an AF_INET server
        return f"http://{host}:{port}"

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> FaultProxy:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            block_on_close = False

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None  # started with the server
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the proxy -------------------------------------------------------------
    def _take_rule(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            self.requests.append((method, path))
            for rule in self._rules:
                if rule.matches(method, path):
                    rule.remaining -= 1
                    self.faults.append((rule.mode, method, path))
                    return rule
        return None

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(self.timeout)
        rfile = sock.makefile("rb")
        try:
            while self._serve_one(sock, rfile):
                pass
        except (_ClientGone, OSError, ValueError):
            pass
        finally:
            try:
                rfile.close()
            finally:
                sock.close()

    def _serve_one(self, sock: socket.socket, rfile) -> bool:
        """Relay one request/response; False when the client connection must end."""
        head = _read_head(rfile)
        if not head:
            return False
        first, headers = _headers(head)
        method, _, rest = first.partition(" ")
        path = rest.rpartition(" ")[0] or rest
        rule = self._take_rule(method, path)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = int(headers.get("content-length", "0") or 0)

        if headers.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        if rule is not None and rule.mode == "reset":
            # Take part of the body, then abort the connection with a TCP RST.
            if chunked:
                rfile.readline(_MAX_HEAD)
            elif length:
                rfile.read(max(1, length // 2))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False

        body = _read_chunked(rfile) if chunked else (_read_exact(rfile, length) if length else b"")

        if rule is not None:
            status, reason, code, message = _STATUS[rule.mode]
            code = rule.code or code
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                "<RequestId>FAULTPROXY</RequestId><HostId>faultproxy</HostId></Error>"
            ).encode()
            resp = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(xml)}\r\nx-amz-request-id: FAULTPROXY\r\nConnection: close\r\n\r\n"
            ).encode()
            sock.sendall(resp if method.upper() == "HEAD" else resp + xml)
            return False

        response, keep_alive = self._forward(method, head + body)
        sock.sendall(response)
        conn_hdr = headers.get("connection", "").lower()
        return keep_alive and conn_hdr != "close"

    def _forward(self, method: str, raw_request: bytes) -> tuple[bytes, bool]:
        with socket.create_connection(self.upstream, timeout=self.timeout) as up:
            up.sendall(raw_request)
            urfile = up.makefile("rb")
            try:
                while True:
                    head = _read_head(urfile)
                    if not head:
                        raise _ClientGone("upstream closed without a response")
                    status_line, headers = _headers(head)
                    status = int(status_line.split(" ", 2)[1])
                    if 100 <= status < 200:  # interim (100 Continue): already answered ourselves
                        continue
                    break
                keep_alive = headers.get("connection", "").lower() != "close"
                if method.upper() == "HEAD" or status in (204, 304):
                    body = b""
                elif "chunked" in headers.get("transfer-encoding", "").lower():
                    body = _read_chunked(urfile)
                elif "content-length" in headers:
                    body = _read_exact(urfile, int(headers["content-length"]))
                else:  # delimited by close: the client connection must close too
                    body = urfile.read()
                    keep_alive = False
                return head + body, keep_alive
            finally:
                urfile.close()
