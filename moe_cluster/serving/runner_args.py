"""`RunnerArgs`: the `args:` of the runner app (`build_runner_app`), checked once at the YAML/HTTP boundary.

Where the runner's MoE blocks run is `moe_calls` (serving/runner_moe.py builds the call):

    moe_calls: direct      the runner routes each MoE layer itself and calls the expert deployments
    moe_calls: router      each MoE layer is a call to the MoE app's router
    moe_calls: in_process  the MoE checkpoint (`moe.checkpoint`) computed in the runner's replica

and which MoE app the first two call is exactly one of `moe` (its args: deployed with the runner) and
`moe_app` (the name of one already running); `in_process` takes `moe` and deploys nothing else.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine.scheduler import MAX_PREFILL_TOKENS, PREFILL_SLOWDOWN
from ..hf.runner import RUNNER_DTYPES
from .args import DeploymentOptions

__all__ = ["RunnerArgs", "MOE_CALLS"]

MOE_CALLS = ("direct", "router", "in_process")


class RunnerArgs(BaseModel):
    """The `args:` of `build_runner_app`. Exactly one of `moe` and `moe_app`."""

    model_config = ConfigDict(extra="forbid")

    hf_model: str = Field(description="Hugging Face model directory (config.json + safetensors); only its "
                                      "dense weights are loaded")
    moe: dict[str, Any] | None = Field(default=None, description="args of the MoE app (build_app) to deploy with "
                                                                 "the runner; its checkpoint is hf_model imported")
    moe_app: str | None = Field(default=None, description="or: name of a running MoE app to call")
    dtype: Literal[RUNNER_DTYPES] = Field(
        default="auto", description="dtype of the dense model (auto: bfloat16 on a GPU, config.json's on the CPU)")
    max_input_tokens: int = Field(default=4096, ge=1, description="prompt tokens of one request (batch x prompt "
                                                                  "length); more gets 400 context_length_exceeded")
    max_new_tokens: int = Field(default=256, ge=1, description="new tokens of one sequence; more gets 400")
    moe_calls: Literal[MOE_CALLS] = Field(
        default="direct", description="direct: the runner routes each MoE layer itself (the MoE app's gates, "
                                      "loaded here) and calls the expert deployments directly, one parallel hop "
                                      "per layer; router: each MoE layer is a call to the MoE app's router; "
                                      "in_process: moe.checkpoint computed in the runner's replica (no experts)")
    moe_timeout_s: float = Field(default=60.0, gt=0, description="deadline of one MoE call")
    torch_threads: int | None = Field(default=None, ge=1, description="torch threads of the runner replica")
    max_body_bytes: int = Field(default=2**20, ge=1024, description="larger HTTP bodies get 413")
    auth_token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                       description="bearer-token auth of the runner's HTTP endpoints, as in AppArgs: "
                                                   "the name of an environment variable holding the token")
    auth_token_file: str | None = Field(default=None, min_length=1,
                                        description="or a file (a mounted Kubernetes Secret) holding it")
    served_model_name: str | None = Field(default=None, min_length=1,
                                          description="the model's name in the OpenAI API (default: hf_model's "
                                                      "directory name)")
    tokenizer: str | None = Field(default=None, description="tokenizer directory (default: hf_model); local files only")
    max_num_seqs: int = Field(default=64, ge=1, le=1024,
                              description="OpenAI API: sequences decoded together in one step; more wait")
    max_kv_tokens: int | None = Field(default=None, ge=1,
                                      description="OpenAI API: the size of the decode loop's KV cache in tokens "
                                                  "(None: the loop derives it from free memory); a choice whose "
                                                  "prompt + max_tokens exceed it gets 400 context_length_exceeded")
    max_prefill_tokens: int = Field(default=MAX_PREFILL_TOKENS, ge=1,
                                    description="OpenAI API: prompt tokens prefilled in one decode step, in chunks")
    prefill_slowdown: float = Field(default=PREFILL_SLOWDOWN, ge=1.0,
                                    description="OpenAI API: beside decoding sequences, a step carries the prompt "
                                                "tokens that keep it within this factor of their step alone (a large "
                                                "value: always max_prefill_tokens; docs/engine.md)")
    overlap: bool = Field(default=False,
                          description="OpenAI API: each decode step as two micro-batches, one's MoE calls in flight "
                                      "while the other computes; off by default: on 2 CPU cores it cost 12% of the "
                                      "cluster's tokens/s at concurrency 8 (docs/engine.md)")
    step_timeout_s: float = Field(default=600.0, gt=0,
                                  description="OpenAI API: a decode step running longer is stuck: its requests "
                                              "fail (503), /healthz answers 503 and Serve replaces the replica")
    runner: DeploymentOptions = DeploymentOptions()

    @model_validator(mode="after")
    def _one_moe_source(self) -> "RunnerArgs":
        if (self.moe is None) == (self.moe_app is None):
            raise ValueError("give exactly one of `moe` (args of the MoE app to deploy with the runner) and "
                             "`moe_app` (name of a running MoE app)")
        if self.moe is not None and not self.moe.get("checkpoint"):
            raise ValueError("moe.checkpoint is required: the MoE checkpoint that `moe-cluster import-hf "
                             f"{self.hf_model} DST` wrote")
        if self.moe_calls == "in_process" and self.moe is None:
            raise ValueError("moe_calls: in_process needs moe: {checkpoint: ...} (the MoE blocks the runner computes "
                             "itself), not moe_app")
        return self

    def engine_options(self) -> dict[str, Any]:
        """The DecodeLoop's keyword arguments (max_kv_tokens None: the loop derives it from free memory)."""
        return {"max_num_seqs": self.max_num_seqs, "step_timeout_s": self.step_timeout_s,
                "max_kv_tokens": self.max_kv_tokens, "max_prefill_tokens": self.max_prefill_tokens,
                "prefill_slowdown": self.prefill_slowdown, "overlap": self.overlap}
