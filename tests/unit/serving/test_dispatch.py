"""The one HTTP dispatch (serving/http/common.py) that the router and the runner share: one mapping of what a
handler raises to a status, in each face's error format, never a traceback in the body; one access log line."""

import asyncio
import json
import logging
import types

import pytest
from pydantic import BaseModel, ConfigDict
from ray.exceptions import RayTaskError
from starlette.requests import Request

from moe_cluster.protocol import openai as oai
from moe_cluster.protocol.errors import WireError
from moe_cluster.engine.sequence import DecodeLoopFailure
from moe_cluster.serving.errors import DeadlineExceeded, ExpertCallError, InternalError, MoEAppChanged, internal
from moe_cluster.serving.http.common import Face, dispatch, json_response


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int


def _validation_error():
    try:
        Strict.model_validate({"n": "x"})
    except ValueError as exc:
        return exc


FAILURES = {  # raised by a handler -> (status, the plain body's message, OpenAI's param and code)
    "client's WireError": (WireError(422, "no NaN", param="x", code="c"), 422, "no NaN", "x", "c"),
    "pydantic": (_validation_error(), 400, "n: Input should be a valid integer", "n", "invalid_value"),
    "ValueError (unknown layer)": (ValueError("layer 9 is no MoE layer"), 400, "layer 9 is no MoE layer", None, None),
    "expert down": (ExpertCallError("experts-0 failed"), 503, "ExpertCallError: experts-0 failed", None, None),
    "app changed": (MoEAppChanged("other weights"), 503, "MoEAppChanged: other weights", None, None),
    "decode loop closed": (DecodeLoopFailure("the decode loop is closed"), 503,
                           "DecodeLoopFailure: the decode loop is closed", None, None),
    "deadline": (DeadlineExceeded("not within 3s"), 504, "DeadlineExceeded: not within 3s", None, None),
    "a bug": (KeyError("k"), 500, "KeyError: 'k'", None, None),
    "a ValueError from inside": (internal(ValueError("bad rows"), "MoE layer 1"), 500,
                                 "InternalError: MoE layer 1: ValueError: bad rows", None, None),
}


def _raises(exc):
    async def handler(owner, request):
        raise exc
    return handler


async def _ok(owner, request):
    return json_response({"ok": True})


def call(faces, method, path, owner=None, hint="try GET /ok") -> tuple[int, dict, dict]:
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"", "headers": []}
    response = asyncio.run(dispatch(owner or types.SimpleNamespace(auth=None), Request(scope, receive), faces, hint))
    return response.status_code, json.loads(response.body), response.headers


def _from_another_deployment(exc):
    """`exc` as it arrives from another Serve deployment: Ray's RayTaskError(type), whose text is a traceback."""
    return RayTaskError("forward", 'Traceback (most recent call last):\n  File "/srv/router.py", line 9\n'
                        f"{type(exc).__name__}: {exc}", exc).as_instanceof_cause()


@pytest.mark.parametrize("cause, status, message", [
    (ExpertCallError("experts-0 failed"), 503, "ExpertCallError: experts-0 failed"),
    (ValueError("layer 9 refused"), 500, "InternalError: /a: ValueError: layer 9 refused"),
    (KeyError("k"), 500, "KeyError: 'k'"),
])
def test_another_deployments_failure_is_answered_by_its_cause_without_rays_traceback(cause, status, message):
    """The router's failure reaching the runner's dispatch: its own status (a ValueError of theirs is no
    client's fault: 500), its type and first line; Ray's traceback (paths, pids) only in the log."""
    got, body, _ = call([Face({"/a": ("POST", _raises(_from_another_deployment(cause)))})], "POST", "/a")
    assert (got, body["error"]) == (status, message)


@pytest.mark.parametrize("case", FAILURES)
def test_one_mapping_of_failures_to_statuses_in_each_faces_format(case, caplog):
    exc, status, message, param, code = FAILURES[case]
    plain = Face({"/a": ("POST", _raises(exc))})
    openai = Face({"/b": ("POST", _raises(exc))}, error_body=oai.error_body)
    got, body, _ = call([plain, openai], "POST", "/a")
    assert got == status and set(body) == {"error"} and "Traceback" not in body["error"]
    assert body["error"] == message if case != "pydantic" else body["error"].startswith(message)
    got, body, _ = call([plain, openai], "POST", "/b")
    assert got == status and body["error"]["type"] == oai.error_type(status)
    assert message in body["error"]["message"] and (body["error"]["param"], body["error"]["code"]) == (param, code)
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert bool(logged) == (status >= 500)  # a failure inside is logged with its traceback, the client's is not
    assert all(r.exc_info for r in logged)


def test_paths_methods_and_prefixes():
    prefix = Face(prefixes={"/v2": _raises(WireError(404, "no such /v2 path"))})
    faces = [Face({"/ok": ("GET", _ok)}), prefix, Face({"/o": ("GET", _ok)}, error_body=oai.error_body)]
    assert call(faces, "GET", "/ok")[:2] == (200, {"ok": True})
    assert call(faces, "POST", "/ok")[:2] == (405, {"error": "/ok takes GET, not POST"})
    assert call(faces, "GET", "/v2/x")[:2] == (404, {"error": "no such /v2 path"})
    assert call(faces, "GET", "/nothing")[:2] == (404, {"error": "no endpoint /nothing; try GET /ok"})
    status, body, _ = call(faces, "POST", "/o")
    assert (status, body["error"]["message"]) == (405, "/o takes GET, not POST")  # in the face's own format


def test_the_router_and_the_runner_answer_through_the_same_dispatch(monkeypatch):
    """Both deployments' HTTP entries are the one dispatch with their faces (no second copy of auth or errors)."""
    from moe_cluster.serving.http import common, endpoints, runner_routes

    seen = []

    async def spy(owner, request, faces, hint):
        seen.append([f.error_body for f in faces])
        return json_response({})

    monkeypatch.setattr(endpoints, "dispatch", spy)
    monkeypatch.setattr(runner_routes, "dispatch", spy)
    for handle in (endpoints.handle_http, runner_routes.handle_runner_http):
        call_with = types.SimpleNamespace(auth=None)
        scope = {"type": "http", "method": "GET", "path": "/", "root_path": "", "query_string": b"", "headers": []}
        asyncio.run(handle(call_with, Request(scope)))
    assert seen == [[common.plain_error_body], [common.plain_error_body, oai.error_body]]


def test_an_internal_value_error_is_no_client_error():
    assert isinstance(internal(WireError(413, "17 tokens exceed the limit"), "MoE layer 0"), InternalError)
    err = KeyError("k")
    assert internal(err, "x") is err
