"""The OpenAI text API of a runner: /v1/completions, /v1/chat/completions, /v1/models.

    request ──the runner's dispatch (common.py: auth 401, method 405, errors as OpenAI's objects)
        ──► parse + check (protocol/openai.py: 400 naming the field; 404 unknown model)
        ──► prompt ids (the tokenizer; chat: its chat template or engine/text.py's plain one), each checked
            with its max_tokens against the limits (protocol/limits.py TextLimits: max_input_tokens,
            max_new_tokens, the model's context, the decode loop's max_kv_tokens; the runner's
            /v1/generate checks the same way)
        ──► choices: one GenerationRequest per prompt and n (sampling values: the request's, else the
            model's generation_config.json), all joining the DecodeLoop's next step (engine/scheduler.py)
        ──► one JSON answer, or server-sent events (`stream: true`, one choice per chunk) ending with
            `data: [DONE]`; echo puts the prompt (and its logprobs) first; logprobs in OpenAI's formats
            (protocol/openai_logprobs.py)

Every error is OpenAI's error object `{"error": {"message", "type", "param", "code"}}` (`OPENAI_FACE`):
4xx for the client's mistakes, 5xx for a failure inside (serving/errors.py: a failed MoE call); a
failure in the middle of a stream is told as one last `data: {"error": ...}` event before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ...engine.scheduler import DecodeLoop, Event, GenerationRequest
from ...hf.runner import HFMoERunner
from ...engine.sampling import SamplingParams, generation_defaults
from ...engine.text import TextStream, chat_prompt, load_tokenizer
from ...protocol import openai as oai
from ...protocol.openai_logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from ...protocol.errors import WireError
from ...protocol.limits import TextLimits, check_token_ids
from ..errors import failure_text, http_status, internal
from .common import Face, client_text, json_response, read_body
from .tokenize_routes import TOKENIZER_ROUTES
from .openai_metrics import AnswerClock, RunnerMetrics

__all__ = ["OpenAIFace", "OPENAI_FACE"]

logger = logging.getLogger("ray.serve")
# Prompt positions (prompt tokens x n) one echo + logprobs request may score: each keeps its logprob and top-k
# (Python objects, ~2-4 KB a position with logprobs 20) until the answer is sent.
MAX_SCORED_POSITIONS = 65536


@dataclass
class Choice:
    """One choice of an answer: the decode loop's request, and the prompt's text told first (echo)."""

    index: int
    generation: GenerationRequest
    echo_text: str | None = None  # None: no echo


@dataclass
class Told:
    """What one choice has told so far (the whole answer's choice, or the offset of a streamed chunk)."""

    pieces: list[str] = field(default_factory=list)
    positions: list[TokenLogprob] = field(default_factory=list)
    chars: int = 0  # characters told: where the next chunk's text_offset starts (kept: summing pieces is O(n))
    end: Event | None = None

    def add(self, text: str, positions: list[TokenLogprob], event: Event) -> None:
        self.pieces.append(text)
        self.positions += positions
        self.chars += len(text)
        self.end = event if event.last else None


class OpenAIFace:
    """The tokenizer and decode loop of one runner, and the answers of the OpenAI endpoints."""

    def __init__(self, runner: HFMoERunner, model_name: str | None = None, tokenizer_dir: str | Path | None = None,
                 engine: dict | None = None) -> None:
        """`engine`: the DecodeLoop's options (RunnerArgs.engine_options()); what it leaves out, the loop's default."""
        self.model_name = model_name or Path(runner.hf_dir).name
        self.tokenizer, self.no_tokenizer = None, ""
        try:
            self.tokenizer = load_tokenizer(tokenizer_dir or runner.hf_dir)
        except ValueError as exc:
            if tokenizer_dir:  # asked for explicitly: the runner does not start without it
                raise
            self.no_tokenizer = str(exc)  # /v1/generate (ids) still works; the text API answers 503
        self.vocab_size = runner.vocab_size
        self.defaults = generation_defaults(runner.model)  # what generation_config.json sets for sampling
        try:
            SamplingParams(**self.defaults)
        except ValueError as exc:
            raise ValueError(f"the generation config of {runner.hf_dir} sets {self.defaults}: {exc}") from None
        self.metrics = RunnerMetrics(self.model_name)  # Prometheus, through Ray's metrics export
        self.loop = DecodeLoop(runner.model, runner.moe_call, on_load=self.metrics.load, **(engine or {}))
        # A prompt with its max_tokens over any of these is a 400 (context_length_exceeded, invalid_value).
        self.limits = TextLimits(runner.limits.max_input_tokens, runner.limits.max_new_tokens, runner.max_positions,
                                 self.loop.max_kv_tokens)
        self.created = int(time.time())
        self._token_texts: dict[int, str] = {}

    def close(self, wait: bool = True) -> None:
        self.loop.close(wait)

    # --- requests -> generation ----------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise WireError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r} "
                                 "(GET /v1/models)", param="model", code="model_not_found")

    def prompts(self, request: oai.SamplingFields) -> list[tuple[list[int], str]]:
        """(token ids, text) of each prompt: one for a chat, one per prompt of a completion."""
        chat = isinstance(request, oai.ChatCompletionRequest)
        with client_text("messages" if chat else "prompt", chat):
            if chat:
                return [(chat_prompt(self.tokenizer, [{"role": m.role, "content": m.text()}
                                                      for m in request.messages]), "")]
            return [self._prompt(prompt, request.echo) for prompt in request.prompts]

    def _prompt(self, prompt: str | list[int], echo: bool) -> tuple[list[int], str]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
            if not ids:
                raise WireError(400, "the prompt is empty", param="prompt", code="invalid_value")
            # A tokenizer's added tokens may lie past the model's embedding.
            check_token_ids(ids, self.vocab_size, "prompt", "the prompt's text gives token id")
            return ids, prompt
        check_token_ids(prompt, self.vocab_size, "prompt")
        return list(prompt), self.tokenizer.decode(prompt) if echo else ""  # vLLM's echo of token ids

    def new_tokens(self, request: oai.SamplingFields, ids: list[int]) -> int:
        """The max_tokens of one prompt, or WireError: the prompt or it over a limit (TextLimits.new_tokens)."""
        chat = isinstance(request, oai.ChatCompletionRequest)
        new = self.limits.new_tokens(len(ids), request.max_new_tokens if chat else request.max_tokens,
                                     prompt_param="messages" if chat else "prompt")
        if request.min_tokens > new:
            raise WireError(400, f"min_tokens {request.min_tokens} is over max_tokens {new}", param="min_tokens",
                            code="invalid_value")
        return new

    def choices(self, request: oai.SamplingFields) -> list[Choice]:
        """The decode loop's requests of an answer, n per prompt in order, or WireError (unknown model, ...)."""
        self.check_model(request.model)
        if self.tokenizer is None:
            raise WireError(503, f"this runner has no tokenizer, so no text API: {self.no_tokenizer}",
                            code="no_tokenizer")
        chat = isinstance(request, oai.ChatCompletionRequest)
        k, echo = (request.logprobs_k, False) if chat else (request.logprobs, request.echo)
        values = request.sampling_values(self.defaults)
        check_token_ids(values["stop_token_ids"], self.vocab_size, "stop_token_ids", "stop token id")
        prompts = self.prompts(request)
        scored = sum(len(ids) for ids, _ in prompts) * request.n if echo and k is not None else 0
        if scored > MAX_SCORED_POSITIONS:  # each keeps its logprob and top-k until the answer is sent
            raise WireError(400, f"echo with logprobs scores {scored} prompt positions (prompt tokens x n); at most "
                                 f"{MAX_SCORED_POSITIONS} per request: send fewer or shorter prompts, or a smaller n",
                            param="prompt", code="invalid_value")
        choices = []
        for ids, text in prompts:
            new = self.new_tokens(request, ids)
            for j in range(request.n):  # choice j of a seeded request draws from seed + j (vLLM's)
                seed = None if request.seed is None else request.seed + j
                generation = GenerationRequest(ids, new, SamplingParams(**{**values, "seed": seed}),
                                               TextStream(self.tokenizer, request.stop_strings, request.min_tokens),
                                               logprobs=k, prompt_logprobs=k if echo else None)
                choices.append(Choice(len(choices), generation, text if echo else None))
        return choices

    # --- answers --------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """A token's text alone, as logprobs tell it (vLLM's: the tokenizer's decode of that one id)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    @staticmethod
    def delta(choice: Choice, event: Event, told: Told) -> tuple[str, list[TokenLogprob]]:
        """An event's new text and logprob positions; a choice's first event also tells the prompt (echo)."""
        text, positions = event.text, [event.logprob] if event.logprob is not None else []
        if choice.echo_text is not None and not told.pieces:
            text, positions = choice.echo_text + text, (event.prompt_logprobs or []) + positions
        return text, positions

    def logprobs(self, request: oai.SamplingFields, positions: list[TokenLogprob], offset: int) -> dict | None:
        if isinstance(request, oai.ChatCompletionRequest):
            k = request.logprobs_k
            return None if k is None else chat_logprobs(positions, self.token_text, k)
        return None if request.logprobs is None else completion_logprobs(positions, self.token_text, offset)

    @staticmethod
    def usage(request: oai.SamplingFields, choices: list[Choice], told: list[Told]) -> dict[str, int]:
        """The prompt's tokens once per prompt (not per choice), every choice's tokens (vLLM's count)."""
        prompts = sum(len(c.generation.prompt_ids) for c in choices[::request.n])
        return oai.usage(prompts, sum(t.end.completion_tokens for t in told))

    async def answer(self, request: oai.SamplingFields) -> Response:
        # Tokenizing (a chat template, a long prompt) takes ms to a second: not on the event loop, where
        # health checks and every other stream wait.
        clock = self.metrics.answer()
        choices = await asyncio.to_thread(self.choices, request)
        clock.start([len(c.generation.prompt_ids) for c in choices])
        if request.stream:
            return StreamingResponse(self._stream(choices, request, clock), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        told = [Told() for _ in choices]
        try:
            async for i, event in self.loop.events_of([c.generation for c in choices]):
                clock.event(i, event)
                if event.error is not None:  # the request was checked before it joined: not the client's
                    raise internal(event.error, "the decode loop")
                told[i].add(*self.delta(choices[i], event, told[i]), event)
        finally:
            clock.close()  # what did not end here was left: an error of another choice, or the client gone
        return json_response(await asyncio.to_thread(self._body, request, choices, told))

    def _body(self, request: oai.SamplingFields, choices: list[Choice], told: list[Told]) -> dict:
        chat = isinstance(request, oai.ChatCompletionRequest)
        choice = oai.chat_choice if chat else oai.completion_choice
        made = [choice(c.index, "".join(t.pieces), t.end.finish_reason, self.logprobs(request, t.positions, 0))
                for c, t in zip(choices, told)]
        body = oai.chat_body if chat else oai.completion_body
        return body(oai.new_id("chatcmpl" if chat else "cmpl"), self.model_name, made,
                    self.usage(request, choices, told))

    async def _stream(self, choices: list[Choice], request: oai.SamplingFields,
                      clock: AnswerClock) -> AsyncIterator[bytes]:
        chat = isinstance(request, oai.ChatCompletionRequest)
        rid, created = oai.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        chunk = oai.chat_chunk if chat else oai.completion_chunk

        def sse(choice: dict | None = None, use: dict | None = None) -> bytes:
            return oai.sse(chunk(rid, self.model_name, created, choice, use))

        for c in choices if chat else ():
            yield sse(oai.chat_delta(c.index, {"role": "assistant", "content": ""}))
        told, failed = [Told() for _ in choices], False
        try:
            async for i, event in self.loop.events_of([c.generation for c in choices]):
                clock.event(i, event)
                if event.error is not None:
                    logger.error("generation failed in a stream: %s: %s", type(event.error).__name__, event.error)
                    error = internal(event.error, "the decode loop")
                    yield b"data: " + oai.error_body(http_status(error), failure_text(error)) + b"\n\n"
                    failed = True
                    break
                text, positions = self.delta(choices[i], event, told[i])
                logprobs = self.logprobs(request, positions, told[i].chars)
                told[i].add(text, positions, event)
                if text or positions or event.last:
                    yield sse(oai.chat_delta(i, {"content": text} if text else {}, event.finish_reason, logprobs)
                              if chat else oai.completion_choice(i, text, event.finish_reason, logprobs))
        finally:
            clock.close()
        if request.include_usage and not failed:
            yield sse(use=self.usage(request, choices, told))
        yield oai.SSE_DONE


async def _models(owner, request: Request) -> Response:
    face = owner.openai
    return json_response(oai.models_body([face.model_name], face.created))


def _answers(kind: type[oai.SamplingFields]):
    """The handler of the POST route whose body is a `kind` request."""
    async def answer(owner, request: Request) -> Response:
        body = await read_body(request, owner.args.max_body_bytes)
        parsed = await asyncio.to_thread(oai.parse_request, body, request.headers.get("content-type"), kind)
        return await owner.openai.answer(parsed)
    return answer


# The runner's OpenAI routes (`owner.openai` is its OpenAIFace), vLLM's tokenizer endpoints with them; every
# error an OpenAI error object (a 401 with code invalid_api_key).
OPENAI_FACE = Face({"/v1/completions": ("POST", _answers(oai.CompletionRequest)),
                    "/v1/chat/completions": ("POST", _answers(oai.ChatCompletionRequest)),
                    "/v1/models": ("GET", _models), **TOKENIZER_ROUTES}, error_body=oai.error_body)
