"""HTTP endpoints of the runner (serving/runner.py ModelRunner), through the one dispatch (common.py).

    the OpenAI face (openai_routes.py OPENAI_FACE)   /v1/completions, /v1/chat/completions, /v1/models,
                                                     /tokenize, /detokenize, /tokenizer_info: OpenAI's error objects
    the runner's own face (RUNNER_ROUTES)             POST /v1/generate, GET /v1/info, GET /v1/stats, GET /healthz:
                                                     {"error": "..."}, as the router's

`owner` is the runner: `auth`, `args.max_body_bytes`, `generate`, `info`, `stats`, `healthz`, `openai`.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from ...protocol.bodies import decode_generate_request
from .common import Face, dispatch, json_response, read_body
from .openai_routes import OPENAI_FACE

__all__ = ["handle_runner_http", "RUNNER_ROUTES", "RUNNER_FACES"]

_HINT = ("try POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /v1/generate, GET /v1/info, "
         "GET /v1/stats or GET /healthz")


async def handle_runner_http(runner, request: Request) -> Response:
    return await dispatch(runner, request, RUNNER_FACES, _HINT)


async def _generate(runner, request: Request) -> Response:
    body = await read_body(request, runner.args.max_body_bytes)  # parsed off the event loop: up to max_body_bytes
    input_ids, max_new_tokens = await asyncio.to_thread(decode_generate_request, body,
                                                        request.headers.get("content-type"))
    return json_response(await runner.generate(input_ids, max_new_tokens))


async def _info(runner, request: Request) -> Response:
    return json_response(await runner.info())


async def _stats(runner, request: Request) -> Response:
    return json_response(await runner.stats())


async def _healthz(runner, request: Request) -> Response:
    return await runner.healthz()


RUNNER_ROUTES = {"/v1/generate": ("POST", _generate), "/v1/info": ("GET", _info), "/v1/stats": ("GET", _stats),
                 "/healthz": ("GET", _healthz)}
# An unknown path is answered in the first face's format: the runner's own, as before the OpenAI API.
RUNNER_FACES = [Face(RUNNER_ROUTES), OPENAI_FACE]
