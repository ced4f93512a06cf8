"""`InProcessRunner`: the runner with its MoE blocks computed in its own process (no experts).

The baseline the cluster is measured against: the same HTTP faces as `ModelRunner` (the OpenAI
API with its decode loop, /v1/generate, /v1/info, /healthz) behind the same Serve proxy, but
every MoE block is `load_model(moe.checkpoint).forward` in the runner's replica instead of a
call to the experts' deployments, on the replica's device (its GPU, experts included, or the CPU). `moe-cluster serve --hf-model DIR --checkpoint CKPT --in-process`
deploys it; the `args:` are `RunnerArgs` with `moe: {checkpoint: ...}` (other MoE args unused).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import Response

from ..hf.runner import GenerateLimits, HFMoERunner
from .args import DEPLOYMENT_DEFAULTS, merge_options
from .http.auth import BearerAuth
from .http.common import json_response
from .http.openai_routes import OpenAIFace
from .runner import (RUNNER_NAME, RunnerArgs, check_decode_loop, close_decode_loop, decode_loop_unhealthy,
                     handle_runner_http, replica_devices)
from .runtime import pick_device, set_torch_threads

__all__ = ["InProcessRunner", "build_in_process_runner_app"]


def build_in_process_runner_app(args: dict[str, Any] | RunnerArgs) -> Application:
    runner_args = args if isinstance(args, RunnerArgs) else RunnerArgs.model_validate(args)
    if runner_args.moe is None:
        raise ValueError("the in-process runner needs moe: {checkpoint: ...} (the MoE blocks it computes itself)")
    options = merge_options(DEPLOYMENT_DEFAULTS["runner"], runner_args.runner)
    return InProcessRunner.options(name=RUNNER_NAME, **options).bind(runner_args.model_dump(mode="json"))


@serve.deployment
class InProcessRunner:
    async def __init__(self, args: dict) -> None:
        self.args = RunnerArgs.model_validate(args)
        set_torch_threads(self.args.torch_threads)
        self.auth = BearerAuth.from_args(self.args.auth_token_env, self.args.auth_token_file)
        limits = GenerateLimits(self.args.max_input_tokens, self.args.max_new_tokens)
        self.runner = await asyncio.to_thread(HFMoERunner.in_process, self.args.hf_model, self.args.moe["checkpoint"],
                                              device=pick_device(), dtype=self.args.dtype, limits=limits)
        self.openai = await asyncio.to_thread(OpenAIFace, self.runner, self.args.served_model_name,
                                              self.args.tokenizer, self.args.max_num_seqs, self.args.step_timeout_s)

    async def generate(self, input_ids: list[list[int]], max_new_tokens: int = 16) -> dict:
        return await asyncio.to_thread(self.runner.generate, input_ids, max_new_tokens)

    async def info(self) -> dict:
        return {**self.runner.info(), **replica_devices(), "moe": "in_process"}

    async def stats(self) -> dict:
        return {"decode_loop": dict(self.openai.loop.stats), "moe_calls": "in_process"}

    def __del__(self) -> None:
        close_decode_loop(self)

    def check_health(self) -> None:
        check_decode_loop(self)

    async def healthz(self) -> Response:
        return decode_loop_unhealthy(self) or json_response({"status": "ok"})

    async def __call__(self, request: Request) -> Response:
        return await handle_runner_http(self, request)
