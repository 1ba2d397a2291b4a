"""A loopback HTTP proxy in front of the test S3 server: counts requests per object key and can
answer 503 (SlowDown) to the first GET of each key, as a throttled S3 endpoint does."""
from __future__ import annotations

import http.client
import threading
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class _State:
    def __init__(self, upstream: str, fail_first_get: str | None) -> None:
        parsed = urlparse(upstream)
        self.host, self.port = parsed.hostname, parsed.port
        self.fail_first_get = fail_first_get  # key prefix whose first GET answers 503
        self.gets: Counter = Counter()
        self.puts: Counter = Counter()  # PUT requests per bucket/key (a bucket creation counts as a PUT)
        self.refused: Counter = Counter()
        self.lock = threading.Lock()


def _handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _forward(self) -> None:
            body = self._body()
            key = unquote(urlparse(self.path).path).lstrip("/")
            if self.command == "PUT":
                with state.lock:
                    state.puts[key] += 1
            if self.command == "GET":
                with state.lock:
                    state.gets[key] += 1
                    refuse = (state.fail_first_get is not None and key.startswith(state.fail_first_get)
                              and state.gets[key] == 1)
                    if refuse:
                        state.refused[key] += 1
                if refuse:
                    payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(state.host, state.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                        self.send_header(name, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler


@contextmanager
def s3_proxy(upstream: str, fail_first_get: str | None = None):
    """Yield ``(endpoint_url, state)``; ``state.gets`` / ``state.puts`` count GETs / PUTs per
    ``bucket/key``."""
    state = _State(upstream, fail_first_get)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
