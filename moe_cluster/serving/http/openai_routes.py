"""The OpenAI text API of a runner: /v1/completions, /v1/chat/completions, /v1/models.

    request ──auth (401)── parse + check (protocol/openai.py: 400 naming the field; 404 unknown model)
        ──► prompt ids (the tokenizer; chat: its chat template or hf/text.py's plain one)
        ──► DecodeLoop (hf/decode_loop.py): the request joins the next step, shares its MoE calls
        ──► one JSON answer, or server-sent events (`stream: true`) ending with `data: [DONE]`

Every error is OpenAI's error object `{"error": {"message", "type", "param", "code"}}`: 4xx for
the client's mistakes, 500 for a failure inside (a failed MoE call); a failure in the middle of
a stream is told as one last `data: {"error": ...}` event before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ...hf.decode_loop import DecodeLoop, GenerationRequest
from ...hf.runner import HFMoERunner
from ...hf.sampling import SamplingParams
from ...hf.text import TextStream, chat_prompt, load_tokenizer
from ...protocol import openai as oai
from ...protocol.bodies import JSON
from ...protocol.errors import WireError
from .common import json_response, read_body, relative_path

__all__ = ["OpenAIFace", "OPENAI_PATHS", "openai_dispatch"]

logger = logging.getLogger("ray.serve")
OPENAI_PATHS = {"/v1/completions": "POST", "/v1/chat/completions": "POST", "/v1/models": "GET"}


class OpenAIFace:
    """The tokenizer and decode loop of one runner, and the answers of the OpenAI endpoints."""

    def __init__(self, runner: HFMoERunner, model_name: str | None = None, tokenizer_dir: str | Path | None = None,
                 max_num_seqs: int = 64, step_timeout_s: float = 600.0) -> None:
        self.model_name = model_name or Path(runner.hf_dir).name
        self.tokenizer, self.no_tokenizer = None, ""
        try:
            self.tokenizer = load_tokenizer(tokenizer_dir or runner.hf_dir)
        except ValueError as exc:
            if tokenizer_dir:  # asked for explicitly: the runner does not start without it
                raise
            self.no_tokenizer = str(exc)  # /v1/generate (ids) still works; the text API answers 503
        self.limits = runner.limits  # prompt tokens above max_input_tokens, max_tokens above max_new_tokens: 400
        self.context = runner.max_positions  # None: the model sets no limit
        self.vocab_size = runner.vocab_size
        self.loop = DecodeLoop(runner.model, runner.moe_call, max_num_seqs, step_timeout_s=step_timeout_s)
        self.created = int(time.time())

    def close(self, wait: bool = True) -> None:
        self.loop.close(wait)

    # --- requests -> generation ----------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise WireError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r} "
                                 "(GET /v1/models)", param="model", code="model_not_found")

    def prompt_ids(self, request: oai.SamplingFields) -> list[int]:
        try:
            return self._prompt_ids(request)
        except (TypeError, UnicodeError) as exc:  # e.g. a lone UTF-16 surrogate ("\ud800"), which JSON allows
            raise WireError(400, f"the prompt is not valid Unicode text ({type(exc).__name__}): a lone surrogate "
                                 "or similar; send UTF-8 text", param="messages" if isinstance(
                                     request, oai.ChatCompletionRequest) else "prompt", code="invalid_value") from None

    def _prompt_ids(self, request: oai.SamplingFields) -> list[int]:
        if isinstance(request, oai.ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
            return chat_prompt(self.tokenizer, messages)
        if isinstance(request.prompt, str):
            ids = self.tokenizer(request.prompt)["input_ids"]
            if not ids:
                raise WireError(400, "the prompt is empty", param="prompt", code="invalid_value")
            return ids
        bad = [t for t in request.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise WireError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                            param="prompt", code="invalid_value")
        return list(request.prompt)

    def generation(self, request: oai.SamplingFields) -> GenerationRequest:
        """The decode loop's request, or WireError: unknown model, prompt over the context, ..."""
        self.check_model(request.model)
        if self.tokenizer is None:
            raise WireError(503, f"this runner has no tokenizer, so no text API: {self.no_tokenizer}",
                            code="no_tokenizer")
        ids = self.prompt_ids(request)
        context = self.context or 2**62
        if len(ids) > self.limits.max_input_tokens or len(ids) >= context:
            raise WireError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                                 f"{min(self.limits.max_input_tokens, context - 1)} (context {self.context})",
                            param="messages" if isinstance(request, oai.ChatCompletionRequest) else "prompt",
                            code="context_length_exceeded")
        asked = request.max_new_tokens if isinstance(request, oai.ChatCompletionRequest) else request.max_tokens
        new = asked or min(self.limits.max_new_tokens, context - len(ids))
        if new > self.limits.max_new_tokens:
            raise WireError(400, f"max_tokens {new} is over this server's limit of {self.limits.max_new_tokens}",
                            param="max_tokens", code="invalid_value")
        if len(ids) + new > context:
            raise WireError(400, f"the prompt's {len(ids)} tokens + max_tokens {new} exceed the model's context of "
                                 f"{self.context} tokens", param="max_tokens", code="context_length_exceeded")
        sampling = SamplingParams(request.temperature, request.top_p, request.top_k, request.seed)
        return GenerationRequest(ids, new, sampling, TextStream(self.tokenizer, request.stop_strings))

    # --- answers --------------------------------------------------------------------------

    async def answer(self, request: oai.SamplingFields) -> Response:
        # Tokenizing (a chat template, a long prompt) takes ms to a second: not on the event loop, where
        # health checks and every other stream wait.
        generation = await asyncio.to_thread(self.generation, request)
        chat = isinstance(request, oai.ChatCompletionRequest)
        if request.stream:
            return StreamingResponse(self._stream(generation, request, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces, end = [], None
        async for event in self.loop.events(generation):
            pieces.append(event.text)
            end = event
        if end.error is not None:
            raise end.error
        body = oai.chat_body if chat else oai.completion_body
        rid = oai.new_id("chatcmpl" if chat else "cmpl")
        return json_response(body(rid, self.model_name, "".join(pieces), end.finish_reason,
                                  oai.usage(end.prompt_tokens, end.completion_tokens)))

    async def _stream(self, generation: GenerationRequest, request: oai.SamplingFields,
                      chat: bool) -> AsyncIterator[bytes]:
        rid, created = oai.new_id("chatcmpl" if chat else "cmpl"), int(time.time())

        def chunk(text: str, finish: str | None = None, use: dict | None = None, first: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return oai.sse(oai.chat_chunk(rid, self.model_name, created, delta, finish, use))
            return oai.sse(oai.completion_chunk(rid, self.model_name, created, text, finish, use))

        if chat:
            yield chunk("", first=True)
        async for event in self.loop.events(generation):
            if event.error is not None:
                logger.error("generation failed in a stream: %s: %s", type(event.error).__name__, event.error)
                yield b"data: " + oai.error_body(500, f"{type(event.error).__name__}: {event.error}") + b"\n\n"
                break
            if event.text or event.last:
                yield chunk(event.text, event.finish_reason)
            if event.last and request.include_usage:
                yield chunk("", use=oai.usage(event.prompt_tokens, event.completion_tokens))
        yield oai.SSE_DONE


async def openai_dispatch(owner, request: Request, face: OpenAIFace) -> Response:
    """Answer a request to one of OPENAI_PATHS of `owner` (its `auth` applies), errors as OpenAI's."""
    started, path = time.perf_counter(), relative_path(request)
    try:
        response = await _route(owner, request, face, path)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error object, never a partial answer
        response = _error(exc, path)
    logger.info("%s %s %d %.1fms", request.method, path, response.status_code, (time.perf_counter() - started) * 1e3)
    return response


async def _route(owner, request: Request, face: OpenAIFace, path: str) -> Response:
    auth = getattr(owner, "auth", None)
    failure = auth.check(request.headers.get("authorization")) if auth is not None else None
    if failure is not None:
        status, message, challenge = failure
        return Response(oai.error_body(status, message, code="invalid_api_key"), status, media_type=JSON,
                        headers={"WWW-Authenticate": challenge})
    if request.method != OPENAI_PATHS[path]:
        raise WireError(405, f"{path} takes {OPENAI_PATHS[path]}, not {request.method}")
    if path == "/v1/models":
        return json_response(oai.models_body([face.model_name], face.created))
    kind = oai.ChatCompletionRequest if path == "/v1/chat/completions" else oai.CompletionRequest
    body = await read_body(request, getattr(getattr(owner, "args", None), "max_body_bytes", 2**20))
    parsed = await asyncio.to_thread(oai.parse_request, body, request.headers.get("content-type"), kind)
    return await face.answer(parsed)


def _error(exc: Exception, path: str) -> Response:
    if isinstance(exc, WireError):
        return Response(oai.error_body(exc.status, exc.message, exc.param, exc.code), exc.status,
                        media_type=JSON)
    logger.exception("request to %s failed", path)
    return Response(oai.error_body(500, f"{type(exc).__name__}: {exc}"), 500, media_type=JSON)
