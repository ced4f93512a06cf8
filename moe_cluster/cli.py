"""`moe-cluster`: the command line. Each subcommand parses its flags and calls the library."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import PRESETS

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return args.run(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-cluster",
        description="Serve a Mixture-of-Experts model with every expert in its own Ray Serve deployment.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    init = commands.add_parser("init", help="write a checkpoint with deterministic random weights",
                               description="Write a checkpoint directory (config.json + safetensors, one file "
                                           "per expert) with random weights drawn from --seed.")
    init.add_argument("directory", type=Path, help="where to write the checkpoint (created if missing)")
    init.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                      help="model shape (tiny: D=64, 8 MLP experts; mixtral-mini: D=1024, F=3584, 8 SwiGLU experts)")
    init.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bits)")
    init.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    init.set_defaults(run=_cmd_init)

    serve = commands.add_parser("serve", help="serve a model on an embedded local Ray cluster",
                                description="Start a local Ray cluster, deploy the router and one deployment per "
                                            "expert, and serve HTTP until Ctrl-C or SIGTERM. Without --config, "
                                            "uses deployments/default.yaml when run from a source checkout.")
    serve.add_argument("--config", type=Path, help="Serve config file (serveConfigV2 format), e.g. "
                                                   "deployments/default.yaml")
    serve.add_argument("--checkpoint", help="checkpoint directory to serve (overrides the config's model)")
    serve.add_argument("--host", help="HTTP host (default: the config's, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default: the config's, else 8000)")
    serve.add_argument("--num-cpus", type=int, help="CPUs for the local Ray cluster (default: all)")
    serve.add_argument("--num-gpus", type=int, help="GPUs for the local Ray cluster (default: detected)")
    serve.set_defaults(run=_cmd_serve)

    return parser


def _cmd_init(args: argparse.Namespace) -> int:
    from .model import MoEModel

    if (args.directory / "config.json").exists() and not args.force:
        print(f"error: {args.directory} already holds a checkpoint; pass --force to overwrite it", file=sys.stderr)
        return 1
    config = PRESETS[args.preset]
    started = time.perf_counter()
    print(f"drawing {args.preset} weights (seed {args.seed}): D={config.d_model} F={config.d_ff} "
          f"E={config.num_experts} K={config.top_k} layers={config.num_layers} {config.expert_kind}", flush=True)
    model = MoEModel.random(config, seed=args.seed)
    model.save(args.directory)
    print(f"wrote {args.directory} in {time.perf_counter() - started:.1f}s")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serving.local import default_config_path, serve_local

    config = args.config or default_config_path()
    return serve_local(config, args.checkpoint, args.host, args.port, args.num_cpus, args.num_gpus)


if __name__ == "__main__":
    sys.exit(main())
