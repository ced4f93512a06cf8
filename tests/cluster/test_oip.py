"""The Open Inference Protocol v2 on a real cluster: a standard client (tritonclient) and raw HTTP.

One local Ray cluster for the module with one small app: the tiny preset (seed 1), its eight
experts packed into two deployments, served as model "tiny-moe" at the root prefix.
"""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from moe_cluster import MoEModel, preset_config
from moe_cluster.core.reference import reference_forward

from .conftest import start_local_serve, stop_local_serve, triton_client

MODEL = "tiny-moe"
MAX_TOKENS = 256
MAX_BODY = 2**20
ARGS = {
    "preset": "tiny", "seed": 1, "torch_threads": 1, "oip_model_name": MODEL,
    "max_tokens_per_request": MAX_TOKENS, "max_body_bytes": MAX_BODY,
    "router": {"ray_actor_options": {"num_cpus": 0}}, "experts": {"ray_actor_options": {"num_cpus": 0}},
    "placement": [{"name": "experts-0-3", "experts": [0, 1, 2, 3]}, {"name": "experts-4-7", "experts": [4, 5, 6, 7]}],
}


@pytest.fixture(scope="module")
def cluster():
    from ray import serve

    from moe_cluster.serving.app import build_app

    local = start_local_serve()
    try:
        serve.run(build_app(ARGS), name="oip", route_prefix="/")
        yield {"model": MoEModel.random(preset_config("tiny"), seed=1), "url": local.url(), "port": local.port}
    finally:
        stop_local_serve()


@pytest.fixture(scope="module")
def client(cluster):
    client = triton_client(cluster["port"])
    yield client
    client.close()


def _x(tokens, seed=0, d=64):
    return torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed))


def _infer(client, x: np.ndarray, layer=None, binary_in=True, binary_out=True, datatype="FP32", **kwargs):
    """The tritonclient InferResult for hidden_states x [T, D] (and layer, if given)."""
    import tritonclient.http as httpclient

    inputs = [httpclient.InferInput("hidden_states", list(x.shape), datatype)]
    inputs[0].set_data_from_numpy(x, binary_data=binary_in)
    if layer is not None:
        inputs.append(httpclient.InferInput("layer", [1], "INT64"))
        inputs[1].set_data_from_numpy(np.array([layer], np.int64), binary_data=binary_in)
    outputs = [httpclient.InferRequestedOutput("output", binary_data=binary_out)]
    return client.infer(MODEL, inputs, outputs=outputs, **kwargs)


# --- a standard v2 client ----------------------------------------------------------------------

@pytest.mark.parametrize("binary_in, binary_out", [(False, False), (True, True), (False, True), (True, False)])
def test_tritonclient_fp32_equals_oracle(cluster, client, binary_in, binary_out):
    x = _x(33, seed=int(binary_in) + 2 * int(binary_out))
    result = _infer(client, x.numpy(), layer=1, binary_in=binary_in, binary_out=binary_out)
    output = result.get_output("output")
    assert output["datatype"] == "FP32" and output["shape"] == [33, 64]
    assert ("parameters" in output) is binary_out  # binary_data_size only on binary outputs
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("output").copy()),
                               reference_forward(cluster["model"], x, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_fp16_keeps_its_dtype(cluster, client, binary):
    x = _x(17, seed=3).half()
    y = _infer(client, x.numpy(), layer=0, binary_in=binary, binary_out=binary, datatype="FP16").as_numpy("output")
    assert y.dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(y.copy()), reference_forward(cluster["model"], x, 0),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("binary_out", [False, True])
def test_tritonclient_bf16(cluster, client, binary_out):
    import ml_dtypes

    x = _x(9, seed=4).bfloat16()
    x_np = x.float().numpy().astype(ml_dtypes.bfloat16)  # exact: every bf16 value is a float32
    result = _infer(client, x_np, layer=1, binary_out=binary_out, datatype="BF16")  # BF16 inputs are binary only
    assert result.get_output("output")["datatype"] == "BF16"
    y = torch.from_numpy(result.as_numpy("output").astype(np.float32)).bfloat16()
    torch.testing.assert_close(y, reference_forward(cluster["model"], x, 1), rtol=1.6e-2, atol=1e-2)


def test_versions_route_id_and_empty_batch(cluster, client):
    import tritonclient.http as httpclient

    x = _x(5, seed=6)
    inputs = [httpclient.InferInput("hidden_states", [5, 64], "FP32").set_data_from_numpy(x.numpy()),
              httpclient.InferInput("layer", [1], "INT32").set_data_from_numpy(np.array([0], np.int32))]
    # No `outputs`: tritonclient asks for binary outputs.
    result = client.infer(MODEL, inputs, model_version="1", request_id="req-42")
    response = result.get_response()
    assert (response["id"], response["model_name"], response["model_version"]) == ("req-42", MODEL, "1")
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("output").copy()),
                               reference_forward(cluster["model"], x, 0), rtol=1e-5, atol=1e-5)
    empty = _infer(client, np.zeros((0, 64), np.float32), layer=1).as_numpy("output")
    assert empty.shape == (0, 64) and empty.dtype == np.float32


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_without_layer_is_a_400_listing_the_layers(client, binary):
    """The tiny model has two MoE layers: a missing `layer` never silently means the first one."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match=r'layer is required: this model has MoE layers \[0, 1\]; '
                                                       r'send "layer": <id>') as info:
        _infer(client, _x(2, seed=7).numpy(), binary_in=binary)
    assert info.value.status() == "400"


def test_tritonclient_fp64_is_a_400(client):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException,
                       match="float64 is not supported: send float32, bfloat16 or float16") as info:
        _infer(client, _x(2, seed=7).double().numpy(), layer=0, datatype="FP64")
    assert info.value.status() == "400"


def test_tritonclient_health_and_metadata(client):
    from tritonclient.utils import InferenceServerException

    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("other") and not client.is_model_ready(MODEL, "2")
    server = client.get_server_metadata()
    assert server["name"] == "moe-cluster" and "binary_tensor_data" in server["extensions"]
    for version in ("", "1"):
        meta = client.get_model_metadata(MODEL, model_version=version)
        assert meta["name"] == MODEL and meta["versions"] == ["1"]
        assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == \
            {"hidden_states": ("FP32", [-1, 64]), "layer": ("INT64", [1])}
        assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 64]}]
    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        client.get_model_metadata("other")


# --- raw HTTP ----------------------------------------------------------------------------------

def _request(url, body=None, method="POST", headers=None):
    """(status, headers, body) of one HTTP request; errors are answers too."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _json_request(x, layer=None, **fields):
    inputs = [{"name": "hidden_states", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]
    if layer is not None:
        inputs.append({"name": "layer", "datatype": "INT32", "shape": [1], "data": [layer]})
    return json.dumps({"inputs": inputs, **fields}).encode()


def _binary_request(x: np.ndarray, size=None):
    """(body, headers) with hidden_states as binary data; `size` overrides the declared binary_data_size."""
    raw = x.tobytes()
    header = json.dumps({"inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": len(raw) if size is None else size}}]})
    return header.encode() + raw, {"Inference-Header-Content-Length": str(len(header))}


def test_raw_health_metadata_and_nested_json_with_id(cluster):
    url = cluster["url"]
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready",
                 f"/v2/models/{MODEL}/versions/1/ready"):
        assert _request(url + path, method="GET")[::2] == (200, b""), path
    status, _, body = _request(url + "/v2", method="GET")
    assert status == 200 and json.loads(body)["extensions"] == ["binary_tensor_data"]
    x = _x(3, seed=8)
    status, headers, body = _request(f"{url}/v2/models/{MODEL}/versions/1/infer", _json_request(x, 1, id="abc"))
    response = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json" and response["id"] == "abc"
    (output,) = response["outputs"]
    torch.testing.assert_close(torch.tensor(output["data"]).reshape(output["shape"]),
                               reference_forward(cluster["model"], x, 1), rtol=1e-5, atol=1e-5)


X2 = np.zeros((2, 64), np.float32)
BAD_REQUESTS = {
    "unknown model": ("/v2/models/other/infer", _json_request(X2), {}, 404, "unknown model 'other'"),
    "unknown version": (f"/v2/models/{MODEL}/versions/7/infer", _json_request(X2), {}, 404, "no version '7'"),
    "unknown path": ("/v2/models/tiny-moe/predict", b"{}", {}, 404, "Open Inference Protocol endpoints"),
    "malformed JSON": (None, b'{"inputs": [', {}, 400, "malformed JSON"),
    "header length larger than body": (None, _binary_request(X2)[0], {"Inference-Header-Content-Length": "99999"},
                                       400, "the body has only"),
    "binary_data_size mismatch": (None, *_binary_request(X2, size=500), 400, "needs 512 bytes"),
    "wrong datatype": (None, _json_request(X2).replace(b'"FP32"', b'"INT8"'), {}, 400, "datatype must be one of"),
    "FP64": (None, _json_request(X2, layer=0).replace(b'"FP32"', b'"FP64"'), {}, 400,
             "float64 is not supported: send float32, bfloat16 or float16"),
    "missing layer": (None, _json_request(X2), {}, 400, "layer is required: this model has MoE layers [0, 1]"),
    "wrong D": (None, _json_request(np.zeros((2, 63), np.float32)), {}, 400, "[T, 64]"),
    "too many tokens": (None, *_binary_request(np.zeros((MAX_TOKENS + 1, 64), np.float32)), 413, "limit of 256"),
    "NaN": (None, _json_request(np.full((1, 64), np.nan, np.float32)), {}, 422, "NaN"),
    "unknown input": (None, json.dumps({"inputs": [{"name": "mask", "datatype": "FP32", "shape": [1],
                                                    "data": [0]}]}).encode(), {}, 400, "unknown input 'mask'"),
    "duplicate input": (None, json.dumps({"inputs": json.loads(_json_request(X2))["inputs"] * 2}).encode(), {},
                        400, "given twice"),
    "missing hidden_states": (None, json.dumps({"inputs": [{"name": "layer", "datatype": "INT64", "shape": [1],
                                                            "data": [0]}]}).encode(), {}, 400, "missing input"),
    "unknown layer": (None, _json_request(X2, layer=5), {}, 400, "unknown layer 5"),
    "layer of wrong type": (None, _json_request(X2, layer=1).replace(b'"INT32"', b'"FP32"'), {}, 400, "INT64"),
    "gzip body": (None, b"\x1f\x8b", {"Content-Encoding": "gzip"}, 415, "uncompressed"),
    "body too large": (None, b" " * (MAX_BODY + 1), {}, 413, "limit"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_are_4xx_json_and_the_server_keeps_answering(cluster, case):
    path, body, headers, status, message = BAD_REQUESTS[case]
    url = cluster["url"]
    got_status, got_headers, got_body = _request(url + (path or f"/v2/models/{MODEL}/infer"), body,
                                                 headers=headers)
    assert got_status == status, got_body[:300]
    assert got_headers["content-type"] == "application/json" and message in json.loads(got_body)["error"]
    x = _x(4, seed=11)
    status, _, body = _request(f"{url}/v2/models/{MODEL}/infer", _json_request(x, 0))
    assert status == 200
    y = torch.tensor(json.loads(body)["outputs"][0]["data"]).reshape(4, 64)
    torch.testing.assert_close(y, reference_forward(cluster["model"], x, 0), rtol=1e-5, atol=1e-5)


def test_wrong_methods(cluster):
    url = cluster["url"]
    status, _, body = _request(f"{url}/v2/models/{MODEL}/infer", method="GET")
    assert status == 405 and "POST" in json.loads(body)["error"]
    assert _request(f"{url}/v2/health/ready", b"{}")[0] == 405
