"""`build_app(args) -> Application`: the router bound to one deployment per expert group.

Serve config files point here: `import_path: moe_cluster.serving.app:build_app` with the
`args:` block of `AppArgs`. The args are resolved once, here (model config, placement,
deployment options), and every deployment gets the resolved objects.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from .args import AppArgs, ResolvedApp, resolve_app
from .expert import ExpertServer
from .router import MoERouter

__all__ = ["build_app", "ROUTER_NAME"]

ROUTER_NAME = "router"


def build_app(args: dict[str, Any] | AppArgs | ResolvedApp | None = None) -> Application:
    """The application: `router` (ingress) plus one deployment per expert group of the placement."""
    app = args if isinstance(args, ResolvedApp) else resolve_app(args)
    experts = {
        group.name: ExpertServer.options(name=group.name, **app.args.group_options(group.name)).bind(app, group)
        for group in app.placement.groups
    }
    return MoERouter.options(name=ROUTER_NAME, **app.args.router_options()).bind(app, experts)
