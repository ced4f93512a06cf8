"""A fake router on loopback whose /v1/forward answers go through a fixed cycle of right and
broken replies, so the load generators (tests/support/loadgen.py, scripts/soak.py) can be
checked without a cluster: every broken reply must be counted, with its kind.

    with FlakyRouter() as router:
        MoEClient(router.url).forward(x_TD)  # reply number i is REPLIES[i % len(REPLIES)]
"""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgpack
import numpy as np

__all__ = ["FlakyRouter", "REPLIES", "X_TD", "Y_TD"]

X_TD = np.arange(6, dtype=np.float32).reshape(3, 2)  # the request the tests send
Y_TD = 2 * X_TD  # the "oracle" answer the tests expect

# The kind each load generator must record for the reply: (reply, loadgen kind, soak kind).
REPLIES = [
    ("right", "ok", "ok"),
    ("wrong values", "wrong", "wrong"),
    ("wrong shape", "wrong", "wrong"),
    ("503", "http_503", "http_503"),
    ("no output key", "KeyError", "error_KeyError"),
    ("truncated body", "IncompleteRead", "error_IncompleteRead"),
    ("not msgpack", "FormatError", "error_FormatError"),
]


def _output(y: np.ndarray) -> bytes:
    return msgpack.packb({"output": {"dtype": "float32", "shape": list(y.shape), "data": y.tobytes()}})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like Serve's proxy

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        reply = next(self.server.replies)
        status, body = 200, b""
        if reply == "right":
            body = _output(Y_TD)
        elif reply == "wrong values":
            body = _output(Y_TD + 1)
        elif reply == "wrong shape":
            body = _output(Y_TD[:2])
        elif reply == "503":
            status, body = 503, json.dumps({"error": "ExpertCallError: expert deployment down"}).encode()
        elif reply == "no output key":
            body = msgpack.packb({"result": 1})
        elif reply == "truncated body":  # says 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(_output(Y_TD)[:10])
            self.close_connection = True
            return
        elif reply == "not msgpack":
            body = b"\xc1"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # quiet
        pass


class FlakyRouter:
    """An HTTP server on 127.0.0.1 (a free port) in a daemon thread; `url` is its address."""

    def __enter__(self) -> "FlakyRouter":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        lock, replies = threading.Lock(), itertools.cycle([r[0] for r in REPLIES])

        def next_reply() -> str:  # one shared cycle, whichever connection asks
            with lock:
                return next(replies)

        self._server.replies = iter(next_reply, None)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
