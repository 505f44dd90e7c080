"""An upstream on raw sockets that misbehaves on request, for fault tests of a real ``serve``.

Each request names what to do in its ``x-misbehave`` header (the proxy forwards it unchanged);
without one it answers a small chat completion. Every request head it receives is recorded, so a
test can show what reached the upstream. It runs in a thread of its own, so any test (sync or
async, on any event loop) can use it.
"""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

OK_BODY = json.dumps(
    {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "model": "gpt-5.6-sol",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    }
).encode()


def _head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# What each behaviour writes after reading the request; None closes with a reset (RST).
BEHAVIOURS: dict[str, bytes | None] = {
    "ok": _head("200 OK", {"content-type": "application/json", "content-length": str(len(OK_BODY))})
    + OK_BODY,
    # Declares 1000 bytes, sends 100, closes: a small body cut short.
    "short-body": _head("200 OK", {"content-type": "application/json", "content-length": "1000"})
    + b"x" * 100,
    # Declares 1 MB (relayed as it arrives), sends 100 bytes, closes.
    "short-large-body": _head(
        "200 OK", {"content-type": "application/json", "content-length": "1000000"}
    )
    + b"x" * 100,
    "close-before-headers": b"",
    "reset": None,
    "partial-headers": b"HTTP/1.1 200 OK\r\ncontent-type: applic",
    "bad-status-line": b"HTTP/1.1 abc nonsense\r\n\r\n",
    "bad-header": b"HTTP/1.1 200 OK\r\nbad header line\r\ncontent-length: 2\r\n\r\nok",
    "both-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "bad-chunk": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\n\r\n5\r\ndata:\r\nzz\r\n",
}
# Behaviours in two writes with a pause between them: the proxy relays the first part (status
# line included) before the second breaks the framing.
LATE: dict[str, tuple[bytes, bytes]] = {
    "bad-chunk-late": (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n7\r\ndata:\n\n\r\n",
        b"zz\r\n",
    ),
}


class RawUpstream:
    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self._lock = threading.Lock()
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def recorded(self) -> list[bytes]:
        with self._lock:
            return list(self.heads)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        while True:
            head, body_start = _read_head(sock)
            if head is None:
                return
            with self._lock:
                self.heads.append(head)
            _drain_body(sock, head, body_start)
            behaviour = _header(head, "x-misbehave") or "ok"
            if behaviour == "silent":
                time.sleep(5)
                return
            if behaviour in LATE:
                first, second = LATE[behaviour]
                sock.sendall(first)
                time.sleep(0.3)
                sock.sendall(second)
                return
            out = BEHAVIOURS[behaviour]
            if out is None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            sock.sendall(out)
            if behaviour != "ok":
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return None, b""
        if not chunk:
            return None, b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.encode():
            return value.strip().decode("latin-1")
    return None


def _drain_body(sock: socket.socket, head: bytes, start: bytes) -> None:
    length = int(_header(head, "content-length") or 0)
    got = len(start)
    while got < length:
        chunk = sock.recv(65536)
        if not chunk:
            return
        got += len(chunk)


@contextmanager
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    upstream.start()
    try:
        yield upstream
    finally:
        upstream.stop()
