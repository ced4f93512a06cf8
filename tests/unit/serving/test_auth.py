"""Bearer-token auth (serving/auth.py) and its check in handle_http, with a fake router (no Ray)."""

import asyncio
import json

import pytest
from pydantic import ValidationError

from moe_cluster.serving.args import AppArgs
from moe_cluster.serving.http.auth import BearerAuth, read_token_env, read_token_file

TOKEN = "s3cret-token-0123456789"


class FakeRouter:
    """What handle_http needs of MoERouter for the endpoints called below."""

    def __init__(self, auth):
        import types

        self.auth = auth
        self.placement = types.SimpleNamespace(groups=["expert-0"])

    async def check_experts(self):
        return []

    async def info(self):
        return {"d_model": 64}


def _call(router, method, path, authorization=None, body=b""):
    """(status, headers, body) of handle_http for one request."""
    from starlette.requests import Request

    from moe_cluster.serving.http.endpoints import handle_http

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [] if authorization is None else [(b"authorization", authorization.encode("latin-1"))]
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"",
             "headers": headers}
    response = asyncio.run(handle_http(router, Request(scope, receive)))
    return response.status_code, response.headers, response.body


@pytest.mark.parametrize("header, error", [
    (None, None), ("", None), ("Basic dXNlcjpwYXNz", "invalid_request"), ("Bearer", "invalid_request"),
    ("Bearer wrong", "invalid_token"), (f"Bearer {TOKEN}x", "invalid_token"), (f"Bearer {TOKEN[:-1]}", "invalid_token"),
    ("Bearer ünïcode", "invalid_token"),
])
def test_bad_or_missing_token_is_401_with_a_challenge(header, error):
    router = FakeRouter(BearerAuth([TOKEN]))
    for method, path in [("GET", "/healthz"), ("GET", "/v1/info"), ("POST", "/v1/forward"), ("GET", "/v1/stats"),
                         ("GET", "/v2/health/live"), ("POST", "/v2/models/moe/infer"), ("GET", "/nothing")]:
        status, headers, body = _call(router, method, path, header, body=b"{not json")
        assert status == 401, (method, path)
        assert headers["content-type"] == "application/json" and json.loads(body)["error"]
        assert headers["www-authenticate"].startswith('Bearer realm="moe-cluster"')
        assert (f'error="{error}"' in headers["www-authenticate"]) if error else "error=" not in headers["www-authenticate"]
        assert TOKEN not in body.decode() and TOKEN not in headers["www-authenticate"]


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER   {TOKEN}  "])
def test_the_right_token_passes(header):
    router = FakeRouter(BearerAuth([TOKEN]))
    assert _call(router, "GET", "/healthz", header)[0] == 200
    status, _, body = _call(router, "GET", "/v1/info", header)
    assert status == 200 and json.loads(body) == {"d_model": 64}
    assert _call(router, "GET", "/nothing", header)[0] == 404  # past auth, the usual routing


def test_no_auth_configured_means_no_check():
    assert BearerAuth.from_args(None, None) is None
    assert _call(FakeRouter(None), "GET", "/healthz")[0] == 200


def test_env_and_file_tokens_are_both_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_TEST_TOKEN", f"  {TOKEN}\n")
    path = tmp_path / "token"
    path.write_text("rotated-token\n")  # a trailing newline, as secret files often have
    auth = BearerAuth.from_args("MOE_TEST_TOKEN", str(path))
    assert auth.check(f"Bearer {TOKEN}") is None and auth.check("Bearer rotated-token") is None
    assert auth.check("Bearer other")[0] == 401
    assert TOKEN not in repr(auth) and "rotated" not in repr(auth)


def test_configured_but_missing_token_fails_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_TEST_TOKEN", raising=False)
    with pytest.raises(ValueError, match="MOE_TEST_TOKEN.*unset or empty.*Kubernetes Secret"):
        read_token_env("MOE_TEST_TOKEN")
    monkeypatch.setenv("MOE_TEST_TOKEN", "  \n")
    with pytest.raises(ValueError, match="unset or empty"):
        BearerAuth.from_args("MOE_TEST_TOKEN", None)
    with pytest.raises(ValueError, match="cannot be read.*mount the secret"):
        read_token_file(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token_file(str(tmp_path / "empty"))


def test_app_args_carry_only_where_the_token_is():
    args = AppArgs.model_validate({"auth_token_env": "MOE_API_TOKEN", "auth_token_file": "/run/secrets/token"})
    assert args.model_dump()["auth_token_env"] == "MOE_API_TOKEN"
    with pytest.raises(ValidationError, match="does not belong in the config file") as info:
        AppArgs.model_validate({"auth_token": TOKEN})
    assert TOKEN not in str(info.value)
    with pytest.raises(ValidationError, match="auth_token_env") as info:
        AppArgs.model_validate({"auth_token_env": TOKEN + " with spaces"})  # a token pasted as the name
    assert TOKEN not in str(info.value)


def test_the_model_runner_checks_the_token_too():
    """The generate runner's HTTP endpoints sit behind the same check (serving/runner.py)."""
    import types

    from starlette.requests import Request

    from moe_cluster.serving.runner import ModelRunner, RunnerArgs

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    runner = types.SimpleNamespace(auth=BearerAuth([TOKEN]))
    for path in ("/v1/generate", "/v1/info", "/healthz"):
        scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
                 "headers": [(b"authorization", b"Bearer wrong")]}
        response = asyncio.run(ModelRunner.func_or_class.__call__(runner, Request(scope, receive)))
        assert response.status_code == 401 and TOKEN not in response.body.decode()
    args = RunnerArgs(hf_model="/m", moe_app="moe", auth_token_env="MOE_API_TOKEN")
    assert args.auth_token_env == "MOE_API_TOKEN"
