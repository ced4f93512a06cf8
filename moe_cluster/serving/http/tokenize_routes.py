"""vLLM's tokenizer endpoints of a runner: POST /tokenize, POST /detokenize, GET /tokenizer_info
(wire: protocol/tokenize.py).

    request ──auth (401), method (405): the runner's dispatch (common.py), in the OpenAI face with its error objects
        ──► parse + check (400 naming the field; 404 for a `model` that is not the served one)
        ──► the served model's tokenizer, off the event loop ──► {"count", "max_model_len", "tokens", ...}
                                                                 or {"prompt": text}

The ids are those the OpenAI API runs: /tokenize of a text prompt gives the ids of /v1/completions'
prompt, of `messages` the ids of /v1/chat/completions' prompt (the tokenizer's chat template, or
engine/text.py's plain one when it has none). A client counts tokens, or sends token-id prompts, without
the model's files. `max_model_len` is the longest sequence this server runs: prompt + generated
tokens, within the model's context, the decode loop's KV cache (max_kv_tokens) and the runner's limits
(max_input_tokens + max_new_tokens): protocol/limits.py `TextLimits.max_model_len`.

GET /tokenizer_info is vLLM's `--enable-tokenizer-info-endpoint` answer: the tokenizer's settings, its
special tokens and the chat template the server applies. With it and /tokenize, lm-evaluation-harness'
`local-completions` finds the server's tokenizer by itself (tokenizer_backend auto -> remote).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from ...engine.text import PLAIN_CHAT_TEMPLATE
from ...protocol import tokenize as tok
from ...protocol.errors import WireError
from ...protocol.limits import check_token_ids
from .common import client_text, json_response, read_body

if TYPE_CHECKING:
    from .openai_routes import OpenAIFace

__all__ = ["TOKENIZER_ROUTES", "answer_body", "tokenize", "detokenize", "tokenizer_info", "max_model_len"]

# Special tokens every /tokenizer_info answer names (null when the tokenizer has none): clients look them up.
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


async def _tokenizer_info(owner, request: Request) -> Response:
    return json_response(tokenizer_info(owner.openai))


def _answers(path: str):
    """The handler of POST `path` (/tokenize or /detokenize) of a runner `owner` (`openai` its OpenAIFace;
    `args.max_body_bytes` bounds the body)."""
    async def answer(owner, request: Request) -> Response:
        body = await read_body(request, owner.args.max_body_bytes)
        return await answer_body(owner.openai, path, body, request.headers.get("content-type"))
    return answer


async def answer_body(face: "OpenAIFace", path: str, body: bytes, content_type: str | None) -> Response:
    """The answer to a POST of `body` to /tokenize or /detokenize, parsed and tokenized off the event loop."""
    if path == "/tokenize":
        request = await asyncio.to_thread(tok.parse_tokenize, body, content_type)
        return json_response(await asyncio.to_thread(tokenize, face, request))
    request = await asyncio.to_thread(tok.parse_detokenize, body, content_type)
    return json_response(await asyncio.to_thread(detokenize, face, request))


def tokenize(face: "OpenAIFace", request: tok.TokenizeCompletionRequest | tok.TokenizeChatRequest) -> dict:
    """vLLM's TokenizeResponse of `request` on the served model's tokenizer."""
    tokenizer = _tokenizer(face, request.model)
    chat = isinstance(request, tok.TokenizeChatRequest)
    with client_text("messages" if chat else "prompt", chat):
        text = _chat_text(tokenizer, request) if chat else request.prompt
        ids = [int(t) for t in tokenizer(text, add_special_tokens=request.add_special_tokens)["input_ids"]]
    strings = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return tok.tokenize_body(ids, max_model_len(face), strings)


def detokenize(face: "OpenAIFace", request: tok.DetokenizeRequest) -> dict:
    """vLLM's DetokenizeResponse: the tokenizer's decode of the ids, special tokens kept."""
    tokenizer = _tokenizer(face, request.model)
    check_token_ids(request.tokens, face.vocab_size, "tokens")
    return tok.detokenize_body(tokenizer.decode(request.tokens, skip_special_tokens=False))


def tokenizer_info(face: "OpenAIFace") -> dict:
    """vLLM's TokenizerInfoResponse: the tokenizer's init settings (JSON values only), its class, its special
    tokens and the chat template this server applies to messages."""
    tokenizer = _tokenizer(face, None)
    info = {key: value for key, value in (getattr(tokenizer, "init_kwargs", None) or {}).items()
            if not _names_a_path(key) and _is_json(value)}
    info.update({name: getattr(tokenizer, name, None) for name in SPECIAL_TOKENS})
    info["tokenizer_class"] = type(tokenizer).__name__
    info["chat_template"] = getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE
    return info


def _names_a_path(key: str) -> bool:
    """Settings that name files of the server (its model directory): never told to clients."""
    return key == "name_or_path" or key.endswith("_file") or key.endswith("_path")


def max_model_len(face: "OpenAIFace") -> int:
    """The most tokens (prompt + generated) one sequence may have on this server."""
    return face.limits.max_model_len


def _tokenizer(face: "OpenAIFace", model: str | None):
    """The served tokenizer, after checking `model` (when given) names the served model."""
    if model is not None:
        face.check_model(model)
    if face.tokenizer is None:
        raise WireError(503, f"this runner has no tokenizer, so no tokenizer endpoints: {face.no_tokenizer}",
                        code="no_tokenizer")
    return face.tokenizer


def _is_json(value) -> bool:
    """Whether `value` is plain JSON (special tokens as AddedToken objects are told by name instead)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _is_json(v) for k, v in value.items())


def _chat_text(tokenizer, request: tok.TokenizeChatRequest) -> str:
    """The prompt text of a chat: the tokenizer's chat template (engine/text.py's plain one if it has none)."""
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=request.add_generation_prompt,
                                         continue_final_message=request.continue_final_message)


# Routed by the runner's dispatch in the OpenAI face (openai_routes.py OPENAI_FACE): the handlers read `owner.openai`.
TOKENIZER_ROUTES = {"/tokenize": ("POST", _answers("/tokenize")), "/detokenize": ("POST", _answers("/detokenize")),
                    "/tokenizer_info": ("GET", _tokenizer_info)}
