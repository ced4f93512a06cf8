"""A real `moe-cluster serve` with bearer-token auth, against bad tokens and malformed input.

One server process for the module (tiny preset checkpoint, experts in two deployments),
configured as a user would: `auth_token_env` names an environment variable of the server
(the replicas inherit it) and `auth_token_file` a secret file; either token is accepted.
Every endpoint must answer 401 without a valid token; every malformed request (a battery
of named cases, then a few hundred random mutations of valid requests) must get a 4xx
with a JSON error and never a 5xx; and the server must keep answering correctly.
"""

import json
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import yaml

from moe_cluster.client import MoEClient

from .conftest import free_port, stop_process, wait_until
from moe_cluster.checkpoint import load_model

ENV_TOKEN = "env-token-5b0c1e9d7a"
FILE_TOKEN = "file-token-2f64aa81c3"
TOKEN_ENV = "MOE_TEST_API_TOKEN"
MAX_TOKENS = 512
MAX_BODY = 2**20
D = 64


def _config(checkpoint: Path, token_file: Path) -> dict:
    args = {"checkpoint": str(checkpoint), "torch_threads": 1, "max_tokens_per_request": MAX_TOKENS,
            "max_body_bytes": MAX_BODY, "auth_token_env": TOKEN_ENV, "auth_token_file": str(token_file),
            "router": {"ray_actor_options": {"num_cpus": 0}}, "experts": {"ray_actor_options": {"num_cpus": 0}},
            "placement": [{"name": "experts-0-3", "experts": [0, 1, 2, 3]},
                          {"name": "experts-4-7", "experts": [4, 5, 6, 7]}]}
    return {"applications": [{"name": "moe", "route_prefix": "/", "import_path": "moe_cluster.serving.app:build_app",
                              "args": args}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("secure")
    cli = [sys.executable, "-m", "moe_cluster.cli"]
    subprocess.run([*cli, "init", str(work / "ckpt"), "--preset", "tiny", "--seed", "23"], check=True)
    (work / "token").write_text(FILE_TOKEN + "\n")
    (work / "serve.yaml").write_text(yaml.safe_dump(_config(work / "ckpt", work / "token")))
    port = free_port()
    log = open(work / "serve.log", "w+")
    env = {**os.environ, TOKEN_ENV: ENV_TOKEN}
    process = subprocess.Popen([*cli, "serve", "--config", str(work / "serve.yaml"), "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        MoEClient(f"http://127.0.0.1:{port}", token=ENV_TOKEN).wait_ready(timeout=240)
        # /healthz answers before serve.run returns in the CLI: wait for its ready banner too.
        wait_until(lambda: "moe-cluster: ready in" in (work / "serve.log").read_text(), timeout=60,
                   what="the ready banner of moe-cluster serve")
        yield {"url": f"http://127.0.0.1:{port}", "model": load_model(work / "ckpt"), "process": process,
               "log": log, "work": work, "cli": cli}
    finally:
        stop_process(process)


def _request(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None,
             token: str | None = ENV_TOKEN) -> tuple[int, dict, bytes]:
    """(status, lower-cased headers, body) of one request, with `Authorization: Bearer token` if given."""
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _forward_body(x: np.ndarray, layer: int = 0, **extra) -> bytes:
    return msgpack.packb({"hidden_states": {"dtype": "float32", "shape": list(x.shape), "data": x.tobytes()},
                          "layer": layer, **extra})


def _infer_body(x: np.ndarray, layer: int = 0) -> tuple[bytes, dict]:
    """A binary-data Open Inference Protocol request and its header."""
    raw = x.tobytes()
    header = json.dumps({"inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": len(raw)}},
                                    {"name": "layer", "datatype": "INT64", "shape": [1], "data": [layer]}],
                         "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


X = np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)
ENDPOINTS = [  # (method, path, body, headers, status with a valid token)
    ("GET", "/healthz", None, {}, 200), ("GET", "/v1/info", None, {}, 200), ("GET", "/v1/stats", None, {}, 200),
    ("POST", "/v1/forward", _forward_body(X), {"Content-Type": "application/msgpack"}, 200),
    ("GET", "/v2", None, {}, 200), ("GET", "/v2/health/live", None, {}, 200), ("GET", "/v2/health/ready", None, {}, 200),
    ("GET", "/v2/models/moe", None, {}, 200), ("GET", "/v2/models/moe/versions/1/ready", None, {}, 200),
    ("POST", "/v2/models/moe/infer", *_infer_body(X), 200), ("GET", "/no/such/path", None, {}, 404),
]


@pytest.mark.parametrize("method, path, body, headers, status", ENDPOINTS, ids=[f"{m} {p}" for m, p, *_ in ENDPOINTS])
def test_every_endpoint_needs_the_token(server, method, path, body, headers, status):
    url = server["url"] + path
    for token in (None, "wrong", ENV_TOKEN[:-1], FILE_TOKEN + "x"):
        got, got_headers, content = _request(url, body, headers, method, token=token)
        assert got == 401, (token, got, content[:200])
        assert got_headers["content-type"] == "application/json" and json.loads(content)["error"]
        assert got_headers["www-authenticate"].startswith("Bearer")
    for token in (ENV_TOKEN, FILE_TOKEN):  # either configured token works
        got, _, content = _request(url, body, headers, method, token=token)
        assert got == status, (got, content[:300])


def test_the_token_is_never_returned_or_logged(server):
    for path in ("/v1/info", "/v1/stats", "/v2/models/moe", "/no/such/path"):
        content = _request(server["url"] + path)[2] + _request(server["url"] + path, token="wrong")[2]
        assert ENV_TOKEN.encode() not in content and FILE_TOKEN.encode() not in content
    info = json.loads(_request(server["url"] + "/v1/info")[2])
    assert "auth" not in json.dumps(info)  # no token, no env var name, no file path
    server["log"].seek(0)
    assert "Authorization: Bearer <token>" in server["log"].read()  # the ready line says auth is on
    session = _ray_session_dir(server["process"].pid)
    leaks = [str(p) for p in session.rglob("*") if p.is_file() and _contains(p, (ENV_TOKEN, FILE_TOKEN))]
    assert not leaks, f"the token appears in Ray's logs: {leaks}"
    server["log"].seek(0)
    assert ENV_TOKEN not in server["log"].read() and FILE_TOKEN not in server["log"].read()


def _ray_session_dir(pid: int) -> Path:
    """The session directory of the Ray cluster that process `pid` started (named after its PID)."""
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"  # Ray's default temp dir
    sessions = sorted(root.glob(f"session_*_{pid}"))
    assert sessions, f"no Ray session directory of PID {pid} under {root}"
    return sessions[-1]


def _contains(path: Path, needles: tuple[str, ...]) -> bool:
    try:
        data = path.read_bytes()
    except OSError:  # sockets, files that went away
        return False
    return any(n.encode() in data for n in needles)


def test_missing_token_source_fails_fast_with_what_to_do(server):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    done = subprocess.run([*server["cli"], "serve", "--config", str(server["work"] / "serve.yaml"), "--port", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert TOKEN_ENV in done.stderr and "unset or empty" in done.stderr and "starting" not in done.stdout


# --- malformed input against the running server ----------------------------------------------------

MSGPACK = {"Content-Type": "application/msgpack"}
JSON = {"Content-Type": "application/json"}
ROWS = json.dumps({"hidden_states": [[0.5] * D] * 2}).encode()


def _tensor(dtype="float32", shape=(2, D), data=None, **extra) -> bytes:
    data = np.zeros(shape, np.float32).tobytes() if data is None else data
    return msgpack.packb({"hidden_states": {"dtype": dtype, "shape": list(shape), "data": data}, **extra})


def _infer_json(hidden: dict | None = None, **fields) -> bytes:
    hidden = hidden or {"name": "hidden_states", "datatype": "FP32", "shape": [1, D], "data": [0.0] * D}
    return json.dumps({"inputs": [hidden], **fields}).encode()


HIDDEN = {"name": "hidden_states", "datatype": "FP32", "shape": [1, D], "data": [0.0] * D}
INFER = "/v2/models/moe/infer"
BAD = {  # name: (path, body, headers, status)
    "empty body": ("/v1/forward", b"", JSON, 400),
    "truncated json": ("/v1/forward", ROWS[:-9], JSON, 400),
    "truncated msgpack": ("/v1/forward", _tensor()[:-7], MSGPACK, 400),
    "dtype float64": ("/v1/forward", _tensor("float64", data=b"\0" * 2 * D * 8), MSGPACK, 400),
    "dtype a list": ("/v1/forward", _tensor(["float32"]), MSGPACK, 400),
    "huge declared shape, little data": ("/v1/forward", _tensor(shape=(2**40, D), data=b"\0" * 8), MSGPACK, 413),
    "huge width": ("/v1/forward", _tensor(shape=(1, 2**60), data=b"\0" * 8), MSGPACK, 400),
    "negative dims": ("/v1/forward", _tensor(shape=(-4, D), data=b""), MSGPACK, 400),
    "data one byte short": ("/v1/forward", _tensor(data=b"\0" * (8 * D - 1)), MSGPACK, 400),
    "NaN": ("/v1/forward", ROWS.replace(b"0.5", b"NaN"), JSON, 422),
    "Infinity in float16": ("/v1/forward", _tensor("float16", data=np.full((2, D), np.inf, np.float16).tobytes()),
                            MSGPACK, 422),
    "extra field": ("/v1/forward", _tensor(temperature=0.7), MSGPACK, 400),
    "deeply nested json": ("/v1/forward", b"[" * 200_000 + b"]" * 200_000, JSON, 400),
    "deeply nested msgpack": ("/v1/forward", b"\x91" * 200_000 + b"\xc0", MSGPACK, 400),
    "integer of 5000 digits": ("/v1/forward", b'{"hidden_states": [[' + b"7" * 5000 + b"]]}", JSON, 400),
    "text/plain": ("/v1/forward", ROWS, {"Content-Type": "text/plain"}, 415),
    "msgpack labelled json": ("/v1/forward", _tensor(), JSON, 400),
    "unknown layer": ("/v1/forward", _tensor(layer=9), MSGPACK, 400),
    "negative layer": ("/v1/forward", _tensor(layer=-1), MSGPACK, 400),
    "layer 2**63": ("/v1/forward", _tensor(layer=2**63), MSGPACK, 400),
    "layer a string": ("/v1/forward", _tensor(layer="1"), MSGPACK, 400),
    "too many tokens": ("/v1/forward", _tensor(shape=(MAX_TOKENS + 1, D)), MSGPACK, 413),
    "body too large": ("/v1/forward", b" " * (MAX_BODY + 1), JSON, 413),
    "infer: empty body": (INFER, b"", {}, 400),
    "infer: truncated json": (INFER, _infer_json()[:-4], {}, 400),
    "infer: truncated binary": (INFER, _infer_body(X)[0][:-8], _infer_body(X)[1], 400),
    "infer: header length past the body": (INFER, _infer_json(), {"Inference-Header-Content-Length": "99999"}, 400),
    "infer: header length not a number": (INFER, _infer_json(), {"Inference-Header-Content-Length": "-1"}, 400),
    "infer: datatype FP64": (INFER, _infer_json({**HIDDEN, "datatype": "FP64"}), {}, 400),
    "infer: datatype a list": (INFER, _infer_json({**HIDDEN, "datatype": ["FP32"]}), {}, 400),
    "infer: huge declared shape": (INFER, _infer_json({**HIDDEN, "shape": [2**40, D]}), {}, 413),
    "infer: negative dims": (INFER, _infer_json({**HIDDEN, "shape": [-1, D]}), {}, 400),
    "infer: NaN": (INFER, _infer_json({**HIDDEN, "data": [float("nan")] * D}), {}, 422),
    "infer: extra field": (INFER, _infer_json(priority_class="high"), {}, 400),
    "infer: deeply nested": (INFER, b"[" * 200_000 + b"]" * 200_000, {}, 400),
    "infer: 5000 digits": (INFER, _infer_json({**HIDDEN, "shape": [1, 1], "data": [12345]})
                           .replace(b"12345", b"7" * 5000), {}, 400),
    "infer: gzip": (INFER, b"\x1f\x8b\x08\x00", {"Content-Encoding": "gzip"}, 415),
    "infer: unknown layer": (INFER, _infer_body(X, layer=9)[0], _infer_body(X, layer=9)[1], 400),
    "infer: unknown model": ("/v2/models/gpt/infer", _infer_json(), {}, 404),
    "infer: body too large": (INFER, b" " * (MAX_BODY + 1), {}, 413),
}


def _check_still_right(server) -> None:
    x = np.random.default_rng(9).standard_normal((7, D)).astype(np.float32)
    y = MoEClient(server["url"], token=FILE_TOKEN).forward(x, layer=1)
    np.testing.assert_allclose(y, server["model"].forward(torch.from_numpy(x), 1).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", BAD)
def test_malformed_input_is_a_4xx_json_error(server, case):
    path, body, headers, status = BAD[case]
    assert _request(server["url"] + path, body, headers, "POST", token=None)[0] == 401  # auth comes first
    got, got_headers, content = _request(server["url"] + path, body, headers, "POST")
    assert got == status, content[:300]
    assert got_headers["content-type"] == "application/json" and json.loads(content)["error"]


def _mutate(body: bytes, rng: random.Random) -> bytes:
    """`body` with a few random bytes changed, a piece cut out or repeated, or cut short."""
    data = bytearray(body)
    kind = rng.choice(["flip", "cut", "repeat", "truncate"])
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "cut":
        start = rng.randrange(len(data))
        del data[start:start + rng.randint(1, 16)]
    elif kind == "repeat":
        start = rng.randrange(len(data))
        data[start:start] = data[start:start + rng.randint(1, 16)]
    else:
        del data[rng.randrange(len(data)):]
    return bytes(data)


def test_random_mutations_of_valid_requests_never_get_a_5xx(server):
    rng = random.Random(0)
    x = np.random.default_rng(1).standard_normal((3, D)).astype(np.float32)
    infer, infer_headers = _infer_body(x)
    layer = {"name": "layer", "datatype": "INT64", "shape": [1], "data": [0]}  # the tiny model has two MoE layers
    infer_json = json.dumps({"inputs": [{**HIDDEN, "shape": [3, D], "data": x.flatten().tolist()}, layer]}).encode()
    valid = [("/v1/forward", _forward_body(x), MSGPACK),
             ("/v1/forward", json.dumps({"hidden_states": x.tolist(), "layer": 0}).encode(), JSON),
             (INFER, infer, infer_headers), (INFER, infer_json, {})]
    for path, body, headers in valid:  # each is valid before it is mutated
        assert _request(server["url"] + path, body, headers, "POST")[0] == 200, path
    statuses = {}
    for i in range(400):
        path, body, headers = valid[i % len(valid)]
        got, got_headers, content = _request(server["url"] + path, _mutate(body, rng), headers, "POST")
        statuses[got] = statuses.get(got, 0) + 1
        assert got < 500, (path, got, content[:300])
        if got >= 400:
            assert got_headers["content-type"] == "application/json" and json.loads(content)["error"]
    print(f"\n400 mutated requests: statuses {dict(sorted(statuses.items()))}")
    _check_still_right(server)


def test_the_server_still_answers_correctly(server):
    _check_still_right(server)
    assert server["process"].poll() is None
