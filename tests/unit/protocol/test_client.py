"""MoEClient against a tiny echo server in a thread (no Ray): what it sends, what it refuses, dtypes.

The echo server answers POST /v1/forward with output = the hidden_states it got, in the same
format, and records every body, so a test sees exactly what went over the wire.
"""

import http.server
import json
import threading

import ml_dtypes
import msgpack
import numpy as np
import pytest

from moe_cluster.client import MoEClient


class _Echo(http.server.BaseHTTPRequestHandler):
    bodies: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        msgpack_body = self.headers["Content-Type"] == "application/msgpack"
        fields = msgpack.unpackb(body) if msgpack_body else json.loads(body)
        self.bodies.append(fields)
        reply = {"output": fields["hidden_states"]}
        content = msgpack.packb(reply) if msgpack_body else json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def client(server):
    _Echo.bodies.clear()
    with MoEClient(f"http://127.0.0.1:{server.server_address[1]}") as client:
        yield client


@pytest.mark.parametrize("wire", ["msgpack", "json"])
def test_float64_is_refused_before_anything_is_sent(client, wire):
    with pytest.raises(ValueError, match=r"float64 is not supported: send float32, bfloat16 or float16 "
                                         r"\(x.astype\(np.float32\)\)"):
        client.forward(np.zeros((2, 8)), layer=0, wire=wire)  # numpy's default dtype
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        client.forward(np.zeros((2, 8), np.int32), layer=0, wire=wire)
    assert _Echo.bodies == []


@pytest.mark.parametrize("wire", ["msgpack", "json"])
def test_layer_is_sent_only_when_given(client, wire):
    x = np.ones((1, 8), np.float32)
    client.forward(x, wire=wire)
    client.forward(x, layer=3, wire=wire)
    assert "layer" not in _Echo.bodies[0] and _Echo.bodies[1]["layer"] == 3


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_msgpack_keeps_the_dtype_and_the_bytes(client, dtype):
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np_dtype)
    y = client.forward(x, layer=0)
    sent = _Echo.bodies[0]["hidden_states"]
    assert (sent["dtype"], sent["shape"], sent["data"]) == (dtype, [5, 8], x.tobytes())
    assert y.dtype == x.dtype and y.tobytes() == x.tobytes()


def test_json_sends_numbers_and_answers_in_the_input_dtype(client):
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(ml_dtypes.bfloat16)
    y = client.forward(x, layer=1, wire="json")
    assert _Echo.bodies[0]["hidden_states"] == x.astype(np.float32).tolist()  # exact: bf16 values are float32s
    assert y.dtype == x.dtype and y.tobytes() == x.tobytes()


@pytest.mark.parametrize("dtype", [">f4", ">f2"])
def test_big_endian_arrays_go_as_little_endian_bytes_and_come_back_in_their_dtype(client, dtype):
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(dtype)
    y = client.forward(x, layer=0)
    sent = _Echo.bodies[0]["hidden_states"]
    assert (sent["dtype"], sent["data"]) == (x.dtype.name, x.astype(x.dtype.newbyteorder("<")).tobytes())
    assert y.dtype == x.dtype and np.array_equal(y, x)
