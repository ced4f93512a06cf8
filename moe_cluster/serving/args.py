"""The application's arguments: the `args:` block of a Serve config file (pydantic, strict).

    args:
      checkpoint: /models/tiny      # or preset + seed for random weights
      max_tokens_per_request: 8192
      auth_token_env: MOE_API_TOKEN # optional bearer-token auth: where the token is, never the token
      router:  {num_replicas: 1, ray_actor_options: {num_cpus: 0}}
      experts: {num_replicas: 1, ray_actor_options: {num_cpus: 0}}   # defaults for every expert deployment
      placement:                    # optional: groups that differ from one deployment per expert
        - {name: experts-0-3, experts: [0, 1, 2, 3]}
        - {name: expert-5, experts: [5], options: {num_replicas: 3}}

Unknown fields are errors, with the field's path in the message (never its value).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..checkpoint import load_config, load_digests
from ..core.config import ModelConfig, preset_config
from ..core.placement import GroupSpec, Placement, resolve_placement
from .autoscaling import POLICY_PATH

__all__ = ["AppArgs", "DeploymentOptions", "PlacementEntry", "ResolvedApp", "resolve_app", "merge_options",
           "DEPLOYMENT_DEFAULTS", "CHANNEL_MODES", "uses_channel"]

CHANNEL_MODES = ("channel",)  # the transports that send every call on the channel


def uses_channel(mode: str, channel_max_bytes: int) -> bool:
    """Whether an app of transport `mode` sends calls on channels (its expert replicas then bind one)."""
    return mode in CHANNEL_MODES or (mode == "auto" and channel_max_bytes > 0)


# Serve options of each kind of deployment unless the config says otherwise, in one place. Replicas
# ask for no CPU (`num_cpus: 0`): torch threads are set explicitly (torch_threads), and on a GPU
# cluster the deployments ask for GPUs instead.
# The router and the runner log one access line per request themselves (serving/http/common.py,
# with the real path): Serve's own access log names only the route prefix of a `__call__` deployment.
DEPLOYMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "router": {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 64,
               "logging_config": {"enable_access_log": False}},
    "experts": {"ray_actor_options": {"num_cpus": 0}},
    # The runner's OpenAI API batches its concurrent requests step by step (max_num_seqs, 64): let
    # that many in at once, rather than queueing them in Serve.
    "runner": {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 64,
               "logging_config": {"enable_access_log": False}},
}


class DeploymentOptions(BaseModel):
    """Options passed to `Deployment.options()` for one deployment (or as defaults for all experts)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | Literal["auto"] | None = Field(default=None, description="fixed replica count")
    autoscaling_config: dict[str, Any] | None = Field(default=None, description="Serve AutoscalingConfig fields")
    ray_actor_options: dict[str, Any] | None = Field(default=None, description="num_cpus, num_gpus, resources, ...")
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    health_check_period_s: float | None = None
    health_check_timeout_s: float | None = None
    graceful_shutdown_timeout_s: float | None = None

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "DeploymentOptions":
        if isinstance(self.num_replicas, int) and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        return self


class PlacementEntry(BaseModel):
    """A deployment hosting `experts` for `layers` (default: every MoE layer)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    experts: list[int]
    layers: list[int] | None = None
    options: DeploymentOptions = DeploymentOptions()


class AppArgs(BaseModel):
    """Everything `build_app` needs. Defaults serve the tiny preset with seed 0."""

    # Errors name the field but never echo its value: a secret put in the wrong field stays out of logs.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    checkpoint: str | None = Field(default=None, description="checkpoint directory; overrides preset/seed")
    preset: str = Field(default="tiny", description="preset for random weights when no checkpoint is given")
    seed: int = Field(default=0, description="seed of the random weights")
    max_tokens_per_request: int = Field(default=8192, ge=1, description="larger requests get 413")
    max_tokens_per_call: int | None = Field(default=None, ge=1,
                                            description="a call to an expert deployment carries at most this many rows "
                                                        "(a hot deployment's rows spread over its replicas)")
    transport: Literal["auto", "object_store", "by_value", "nixl", "cuda_ipc", "channel"] = Field(
        default="auto", description="how rows travel between the router and the experts: by_value (Serve's gRPC "
                                    "path, no object store; fastest for small calls), object_store (Ray's object "
                                    "store; for large calls), auto (the channel up to channel_max_bytes, then by "
                                    "value up to by_value_max_bytes, then the object store), or torch tensors "
                                    "through Ray's direct transport: nixl (needs the nixl extra) or "
                                    "cuda_ipc (router and experts on one GPU), or channel (a ZeroMQ socket of each "
                                    "expert replica: serving/channel.py); serving/transport.py")
    channel_host: str | None = Field(default=None, min_length=1,
                                     description="address the expert replicas' channel sockets bind on and "
                                                 "publish (transport: channel); default: the node address Ray "
                                                 "reports (a multi-node cluster); 127.0.0.1 on one machine")
    channel_max_bytes: int = Field(default=4 * 2**20, ge=0,
                                   description="auto sends calls of at most this many bytes on the expert replicas' "
                                               "channels, larger ones by value or through the object store (4 MiB: "
                                               "the measured crossover on CPU; 0: no channel, no socket bound); "
                                               "docs/channel.md")
    by_value_max_bytes: int = Field(default=2**20, ge=0, description="auto sends calls of at most this many bytes "
                                                                     "by value (README: Configuring experts)")
    max_batch_tokens: int | None = Field(default=8192, ge=1,
                                         description="merge concurrent requests of a layer into batches of up to "
                                                     "this many tokens (null: no merging)")
    batch_wait_ms: float = Field(default=10.0, ge=0, description="under concurrency, wait at most this long for "
                                                                  "as many requests as the last batch merged")
    request_timeout_s: float = Field(default=30.0, gt=0, description="a request not done by then gets 504; "
                                                                     "failed expert calls are retried until then")
    max_body_bytes: int = Field(default=64 * 2**20, ge=1024, description="larger HTTP bodies get 413")
    allow_non_finite: bool = Field(default=False, description="accept NaN/Inf in hidden_states (else 422)")
    torch_threads: int | None = Field(default=None, ge=1, description="torch threads per expert replica "
                                                                      "(default: Ray's, 1)")
    router_torch_threads: int | None = Field(default=None, ge=1,
                                             description="torch threads of a router replica (default: "
                                                         "torch_threads); its gate and combine run while the "
                                                         "experts wait, so it may use every core")
    oip_model_name: str = Field(default="moe", min_length=1, pattern=r"^[^/]+$",
                                description="model name on the Open Inference Protocol v2 endpoints, "
                                            "/v2/models/<name>/...")
    auth_token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                       description="name of an environment variable of the router's replicas "
                                                   "that holds the bearer token every HTTP request must carry "
                                                   "(never the token itself)")
    auth_token_file: str | None = Field(default=None, min_length=1,
                                        description="path of a file (e.g. a mounted Kubernetes Secret) that "
                                                    "holds the bearer token; with auth_token_env, either is accepted")
    router: DeploymentOptions = DeploymentOptions()
    experts: DeploymentOptions = DeploymentOptions()
    placement: list[PlacementEntry] = []

    @model_validator(mode="before")
    @classmethod
    def _no_plain_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and {"auth_token", "token", "api_token"} & set(data):
            raise ValueError("a token does not belong in the config file: put it in an environment variable "
                             "or a file (a Kubernetes Secret) and set auth_token_env or auth_token_file")
        return data

    def load_model_config(self) -> ModelConfig:
        return load_config(self.checkpoint) if self.checkpoint else preset_config(self.preset)

    def resolve_placement(self, config: ModelConfig) -> Placement:
        specs = [GroupSpec(p.name, tuple(p.experts), None if p.layers is None else tuple(p.layers))
                 for p in self.placement]
        return resolve_placement(config, specs)

    def group_options(self, name: str) -> dict[str, Any]:
        """Options of the expert deployment `name`: DEPLOYMENT_DEFAULTS, the `experts` block, its entry."""
        entry = next((p for p in self.placement if p.name == name), None)
        options = merge_options(merge_options(DEPLOYMENT_DEFAULTS["experts"], self.experts),
                                entry.options if entry else None)
        autoscaling = options.get("autoscaling_config")
        if isinstance(autoscaling, dict) and "policy" not in autoscaling and uses_channel(self.transport,
                                                                                           self.channel_max_bytes):
            # Serve's own policy counts only the calls on its request path, and channel calls never take it:
            # it would shrink a deployment under load. TokenLoadPolicy counts them (serving/autoscaling.py).
            options["autoscaling_config"] = {**autoscaling, "policy": {"policy_function": POLICY_PATH}}
        return options

    def router_options(self) -> dict[str, Any]:
        """Options of the router deployment: DEPLOYMENT_DEFAULTS overridden by the `router` block."""
        return merge_options(DEPLOYMENT_DEFAULTS["router"], self.router)


@dataclass(frozen=True)
class ResolvedApp:
    """The app's arguments resolved once, in build_app, and handed to every deployment as they are:
    no replica reads the config again, so router and experts cannot disagree."""

    args: AppArgs
    config: ModelConfig  # the model: the checkpoint's config.json, or the preset
    placement: Placement  # which deployment hosts each (layer, expert)
    # sha256 of each checkpoint file, taken when the app was built: every replica that loads a file checks
    # it against these (CheckpointChanged), so weights rewritten in place are refused, never mixed in.
    digests: tuple[tuple[str, str], ...] = ()
    # Made when the app is built and handed to its replicas: a channel call must present it (never logged).
    channel_secret: str = field(default="", repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        """What the weights and the placement are (not replicas or other options), in 16 hex digits. Every
        expert call carries its caller's; an expert deployment refuses rows routed by another version of
        the app (MoEAppChanged), so a runner routing for itself never combines answers of other weights.
        A checkpoint counts by its files' digests, not its path: rewritten in place, it is another version."""
        source = {"digests": dict(self.digests)} if self.args.checkpoint else \
            {"preset": self.args.preset, "seed": self.args.seed}
        what = {"model": self.config.to_dict(), "source": source, "placement": self.placement.describe()}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_app(args: AppArgs | dict[str, Any] | None, digests: dict[str, str] | None = None,
                channel_secret: str | None = None) -> ResolvedApp:
    """Validate the args (dict from a config file) and resolve the model config and the placement.
    `digests`: the weights' digests of an app already running (its router's moe_spec), so that a runner
    routing for it loads exactly those weights; None reads them from the checkpoint as it is now.
    `channel_secret`: that app's (its router's moe_spec); None makes a new one (a new app)."""
    app_args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    config = app_args.load_model_config()
    if digests is None and app_args.checkpoint:
        digests = load_digests(app_args.checkpoint)
    digests = tuple(sorted((digests or {}).items()))
    return ResolvedApp(app_args, config, app_args.resolve_placement(config), digests,
                       channel_secret if channel_secret is not None else secrets.token_urlsafe(24))


def merge_options(defaults: DeploymentOptions | dict[str, Any],
                  override: DeploymentOptions | dict[str, Any] | None) -> dict[str, Any]:
    """Defaults overridden field by field; dict fields (autoscaling_config, ray_actor_options) merge
    key by key, so an override may change just `max_replicas`. A fixed num_replicas in the
    override drops the default autoscaling_config and vice versa."""
    merged = _as_dict(defaults)
    if override is None:
        return merged
    specific = _as_dict(override)
    if isinstance(specific.get("num_replicas"), int):
        merged.pop("autoscaling_config", None)
    if "autoscaling_config" in specific:
        merged.pop("num_replicas", None)
    for key, value in specific.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _as_dict(options: DeploymentOptions | dict[str, Any]) -> dict[str, Any]:
    if isinstance(options, DeploymentOptions):
        return options.model_dump(exclude_none=True)
    return {key: dict(value) if isinstance(value, dict) else value for key, value in options.items()}
