"""`build_app(args) -> Application`: the router bound to one deployment per expert group.

Serve config files point here: `import_path: moe_cluster.serving.app:build_app` with the
`args:` block of `AppArgs`.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from .args import AppArgs
from .expert import ExpertServer
from .router import MoERouter

__all__ = ["build_app", "ROUTER_NAME"]

ROUTER_NAME = "router"


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """The application: `router` (ingress) plus one deployment per expert group of the placement."""
    app_args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    config = app_args.load_model_config()
    placement = app_args.resolve_placement(config)
    args_dict = app_args.model_dump(mode="json")
    experts = {
        group.name: ExpertServer.options(name=group.name, **app_args.group_options(group.name))
        .bind(args_dict, group.name, [list(pair) for pair in group.hosted])
        for group in placement.groups
    }
    router_options = app_args.router.model_dump(exclude_none=True)
    return MoERouter.options(name=ROUTER_NAME, **router_options).bind(args_dict, experts)
