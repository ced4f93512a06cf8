"""`moe-cluster`: the command line. Each subcommand parses its flags and calls the library."""

from __future__ import annotations

import argparse
import json
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

    render_k8s = commands.add_parser(
        "render-k8s", help="copy the Serve config files into the KubeRay manifests' serveConfigV2",
        description="Embed deployments/gpu.yaml in k8s/rayservice-gpu.yaml and deployments/default.yaml "
                    "(with http_options.host 0.0.0.0) in k8s/rayservice-cpu.yaml, as spec.serveConfigV2, "
                    "keeping the manifests' comments. Run it after editing a file in deployments/; with "
                    "--check it writes nothing and exits 1 if a manifest has drifted (for CI).")
    render_k8s.add_argument("--check", action="store_true",
                            help="write nothing; exit 1 and name each manifest that differs from its rendering")
    render_k8s.add_argument("--deployments", type=Path, default=Path("deployments"),
                            help="folder of the Serve config files (default: ./deployments)")
    render_k8s.add_argument("--k8s", type=Path, default=Path("k8s"),
                            help="folder of the RayService manifests (default: ./k8s)")
    render_k8s.set_defaults(run=_cmd_render_k8s)

    import_hf = commands.add_parser(
        "import-hf", help="convert the MoE layers of a Hugging Face checkpoint into a moe-cluster checkpoint",
        description="Read a Hugging Face model directory (config.json + model.safetensors, or sharded "
                    "model-*.safetensors with model.safetensors.index.json) and write the gates, routed and "
                    "shared experts of its MoE layers as a moe-cluster checkpoint, one expert file at a time. "
                    "Families: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3. `layer` stays the decoder "
                    "layer index of the source model; its dense layers are not imported.")
    import_hf.add_argument("src", type=Path, help="Hugging Face model directory (e.g. written by save_pretrained)")
    import_hf.add_argument("dst", type=Path, help="where to write the moe-cluster checkpoint (created if missing)")
    import_hf.add_argument("--dtype", choices=["keep", "float32", "bfloat16"], default="keep",
                           help="dtype of the experts (default keep: as stored; FP8 becomes bfloat16)")
    import_hf.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in DST")
    import_hf.set_defaults(run=_cmd_import_hf)

    bench = commands.add_parser("bench", help="measure in-process vs monolithic vs cluster (handle, HTTP)",
                                description="Measure, on the same weights and in one run, the in-process MoE, one "
                                            "monolithic Serve deployment, and the cluster through a handle and "
                                            "HTTP, for several batch sizes and with concurrent clients. Writes "
                                            "DIR/results.json and DIR/results.png.")
    bench.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    bench.add_argument("--seed", type=int, default=0, help="weights seed")
    bench.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024, 4096], help="tokens per request")
    bench.add_argument("--clients", type=int, default=32, help="concurrent clients")
    bench.add_argument("--client-tokens", type=int, default=128, help="tokens per request of each concurrent client")
    bench.add_argument("--min-seconds", type=float, default=2.0, help="time each (mode, T) at least this long")
    bench.add_argument("--port", type=int, default=8765, help="HTTP port of the cluster under test")
    bench.set_defaults(run=_cmd_bench)

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


def _cmd_render_k8s(args: argparse.Namespace) -> int:
    from .k8s import render_all

    try:
        changed = render_all(args.deployments, args.k8s, check=args.check)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.check:
        for path in changed:
            print(f"drift: {path} does not match its Serve config; run `moe-cluster render-k8s`", file=sys.stderr)
        if not changed:
            print("k8s manifests match their Serve configs")
        return 1 if changed else 0
    for path in changed:
        print(f"rendered {path}")
    if not changed:
        print("k8s manifests already up to date")
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from .hf_import import import_hf_checkpoint

    if (args.dst / "config.json").exists() and not args.force:
        print(f"error: {args.dst} already holds a config.json; pass --force to overwrite it", file=sys.stderr)
        return 1
    try:
        import_hf_checkpoint(args.src, args.dst, dtype=args.dtype, log=lambda line: print(line, flush=True))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .serving.bench import BenchSettings, run_bench

    settings = BenchSettings(preset=args.preset, seed=args.seed, tokens=tuple(args.tokens), clients=args.clients,
                             client_tokens=args.client_tokens, min_seconds=args.min_seconds, port=args.port)
    results = run_bench(settings, args.out, log=lambda line: print(line, flush=True))
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
