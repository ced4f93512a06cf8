"""A small HTTP client for the router: numpy in, numpy out (no Ray needed).

    from moe_cluster.client import MoEClient
    client = MoEClient("http://127.0.0.1:8000")
    client.wait_ready()
    y = client.forward(np.random.randn(16, 64).astype(np.float32), layer=0)

`hidden_states` is float32, float16 or bfloat16 (an `ml_dtypes.bfloat16` array, the type
tritonclient and JAX use; numpy has no bfloat16 of its own); the answer has the same dtype.
float64 raises ValueError before anything is sent: convert with `x.astype(np.float32)`.
`layer` may be left out only when the model has one MoE layer (the server answers 400 otherwise).

One client keeps one keep-alive connection; use one client per thread.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any

import msgpack
import numpy as np

from .dtypes import BY_NAME, FLOAT64_NOT_SUPPORTED
from .protocol.tensors import array_from_bytes, array_to_numbers
from .protocol.v1 import tensor_map

__all__ = ["MoEClient", "MoEHTTPError"]


class MoEHTTPError(RuntimeError):
    """The server answered with an error status; `message` is its JSON error text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class MoEClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0,
                 token: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        self._scheme, self._netloc = parsed.scheme, parsed.netloc
        self._prefix = parsed.path.rstrip("/")
        self._timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._conn: http.client.HTTPConnection | None = None

    # --- endpoints -----------------------------------------------------------------------------

    def forward(self, hidden_states: np.ndarray, layer: int | None = None, *, wire: str = "msgpack",
                return_expert_counts: bool = False) -> np.ndarray | tuple[np.ndarray, list[int]]:
        """y [T, D] for x [T, D] (float32, float16 or bfloat16), in x's dtype; with counts,
        (y, tokens per expert). msgpack keeps the dtype on the wire; JSON computes in float32."""
        x = np.ascontiguousarray(hidden_states)
        if x.dtype.name == "float64":
            raise ValueError(f"hidden_states: {FLOAT64_NOT_SUPPORTED} (x.astype(np.float32))")
        if x.dtype.name not in BY_NAME:
            raise ValueError(f"hidden_states must be float32, float16 or bfloat16 (ml_dtypes), got {x.dtype}")
        fields: dict[str, Any] = {"return_expert_counts": return_expert_counts}
        if layer is not None:  # left out: the server resolves it (the only MoE layer, else 400)
            fields["layer"] = layer
        if wire == "msgpack":  # the msgpack tensor of protocol/v1.py: raw little-endian bytes
            fields["hidden_states"] = tensor_map(x)
            body = msgpack.packb(fields, use_bin_type=True)
            reply = msgpack.unpackb(self._request("POST", "/v1/forward", body, "application/msgpack"), raw=False)
            out = reply["output"]
            if out["dtype"] != x.dtype.name:  # the server answers in the request's dtype
                raise RuntimeError(f"the server answered {out['dtype']} to a {x.dtype.name} request")
            y = array_from_bytes(out["data"], out["dtype"], tuple(out["shape"])).astype(x.dtype, copy=False)
        elif wire == "json":
            fields["hidden_states"] = array_to_numbers(x)
            body = json.dumps(fields).encode()
            reply = json.loads(self._request("POST", "/v1/forward", body, "application/json"))
            y = np.asarray(reply["output"], dtype=np.float32).reshape(x.shape).astype(x.dtype)
        else:
            raise ValueError(f"wire must be 'msgpack' or 'json', got {wire!r}")
        return (y, reply["expert_counts"]) if return_expert_counts else y

    def info(self) -> dict[str, Any]:
        return json.loads(self._request("GET", "/v1/info"))

    def healthy(self) -> bool:
        try:
            self._request("GET", "/healthz")
            return True
        except (MoEHTTPError, OSError, http.client.HTTPException):
            return False

    def wait_ready(self, timeout: float = 180.0, interval: float = 0.5) -> None:
        """Block until /healthz answers 200; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._scheme}://{self._netloc}{self._prefix}/healthz not ready "
                                   f"after {timeout:.0f}s; is `moe-cluster serve` running?")
            time.sleep(interval)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- transport -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> bytes:
        headers = dict(self._headers)
        if content_type:
            headers["Content-Type"] = content_type
        for attempt in (0, 1):  # one retry on a stale keep-alive connection
            conn = self._connection()
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
            except Exception:
                self.close()
                raise
        if response.status >= 400:
            raise MoEHTTPError(response.status, _error_text(data))
        return data

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self._netloc, timeout=self._timeout)
        return self._conn

    def __enter__(self) -> "MoEClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error_text(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data.decode(errors="replace")[:500]
