"""Test-only expert deployments that answer wrongly, raise, die or compute slowly, and an app that binds one.

Each class is the real ExpertServer (same weights, same bind arguments) with its math
(`_compute`, which Serve's calls and the direct channel's both reach) changed: it computes the
right answer, then breaks it (`Slow` changes its expert modules instead: they sleep before
computing, inside the real math). `expert_app` binds the router to one
such deployment hosting every (layer, expert), the way `serving/app.py:build_app` binds the
real app.

Replicas unpickle these classes without importing `tests` (which they can import only when
the driver's working directory is the repo root: Ray puts it on the workers' sys.path). A
@serve.deployment class already travels by value (its module attribute is the Deployment,
not the class, so cloudpickle cannot pickle it by reference); the module also registers
itself to be pickled by value, so that nothing else of it travels by reference either.
Checked: the test passes when pytest runs from another directory.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from ray import cloudpickle, serve
from ray.serve import Application

from moe_cluster.serving.app import ROUTER_NAME
from moe_cluster.core.placement import ExpertGroup
from moe_cluster.serving.args import AppArgs, ResolvedApp, resolve_app
from moe_cluster.serving.expert import ExpertServer
from moe_cluster.serving.router import MoERouter

__all__ = ["ShortRows", "WrongD", "WrongDtype", "Raises", "DiesOnce", "Slow", "expert_app", "DIED_MARKER"]

cloudpickle.register_pickle_by_value(sys.modules[__name__])

_ExpertClass = ExpertServer.func_or_class  # the class under the @serve.deployment
_OPTIONS = {"ray_actor_options": {"num_cpus": 0}}
DIED_MARKER = "died"  # file in the marker dir of DiesOnce; holds the pid of the replica that died


@serve.deployment(**_OPTIONS)
class ShortRows(_ExpertClass):
    """Answers one row fewer than it was sent."""

    def _compute(self, *args):
        out, seconds = super()._compute(*args)
        return out[:-1], seconds


@serve.deployment(**_OPTIONS)
class WrongD(_ExpertClass):
    """Answers [N, D - 1]."""

    def _compute(self, *args):
        out, seconds = super()._compute(*args)
        return out[:, :-1], seconds


@serve.deployment(**_OPTIONS)
class WrongDtype(_ExpertClass):
    """Answers float16 to a float32 model (the right numbers, rounded)."""

    def _compute(self, *args):
        out, seconds = super()._compute(*args)
        return out.astype(np.float16), seconds


@serve.deployment(**_OPTIONS)
class Raises(_ExpertClass):
    """Raises on every call, and counts the calls (`stats()["raised"]`)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.raised = 0

    def _compute(self, modules, spans, *args):
        self.raised += 1
        raise RuntimeError(f"deliberate failure of test expert (experts {[e for e, _ in spans]})")

    async def stats(self) -> dict:
        return {**await super().stats(), "raised": self.raised}


@serve.deployment(**_OPTIONS)
class DiesOnce(_ExpertClass):
    """The first call of the whole deployment kills its replica (os._exit) mid-call; every other call,
    on any replica, answers right. The marker file in `marker_dir` decides who dies (created
    atomically) and records the pid."""

    def __init__(self, app: ResolvedApp, group: ExpertGroup, marker_dir: str) -> None:
        super().__init__(app, group)
        self.marker = os.path.join(marker_dir, DIED_MARKER)

    def _compute(self, *args):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # a replica already died: answer
            return super()._compute(*args)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)


class _SlowModule(torch.nn.Module):
    """An expert that sleeps `delay_s` and then computes right: a stand-in for math that takes that
    long. Like a long matmul, the sleep holds whichever thread runs the expert math."""

    def __init__(self, module: torch.nn.Module, delay_s: float) -> None:
        super().__init__()
        self.module, self.delay_s = module, delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.module(x)


@serve.deployment(**_OPTIONS)
class Slow(_ExpertClass):
    """The real ExpertServer whose every expert takes `delay_s` per span of a call (a call carrying
    rows for k experts computes for k * delay_s), and answers right."""

    def __init__(self, app: ResolvedApp, group: ExpertGroup, delay_s: float) -> None:
        super().__init__(app, group)
        self.experts = {pair: _SlowModule(module, delay_s) for pair, module in self.experts.items()}


def expert_app(args: dict, name: str, expert_class: serve.Deployment, *extra_bind_args,
               options: dict | None = None) -> Application:
    """The router bound to ONE deployment `name` of `expert_class` that hosts every (layer, expert).

    `options` (e.g. num_replicas) go to that deployment; `extra_bind_args` follow the usual
    (app, group).
    """
    experts = list(range(AppArgs.model_validate(args).load_model_config().num_experts))
    entry = {"name": name, "experts": experts, **({"options": options} if options else {})}
    app = resolve_app({**args, "placement": [entry]})
    (group,) = app.placement.groups
    deployment = expert_class.options(name=name, **app.args.group_options(name)).bind(app, group, *extra_bind_args)
    return MoERouter.options(name=ROUTER_NAME, **app.args.router_options()).bind(app, {name: deployment})
