"""`moe-cluster`: the command line. Each subcommand parses its flags, checks the paths it was given
(cli_checks.py) and calls the library.

Exit status: 0 done; 1 a result the command reports as failing (`render-k8s --check` drift, a
`bench` answer off the oracle); 2 a mistake in the command line or the files it names, one line
`moe-cluster: error: ...` (with --debug, its traceback first); 130 / 143 `serve` stopped by SIGINT /
SIGTERM during start-up. Any other exception is a bug and prints its traceback (status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

from .cli_checks import (USER_ERRORS, UsageError, checkpoint_dir, existing_file, hf_model_dir, one_line,
                         output_dir, port_number, tokenizer_dir)
from .core.config import PRESETS
from .serving.runtime import PortBusyError
from .train.cli import add_train_commands

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (*USER_ERRORS, PortBusyError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"moe-cluster: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside `serve`'s own handling (which returns 130 itself)
        print("moe-cluster: interrupted", file=sys.stderr, flush=True)
        return 130


class OneLineParser(argparse.ArgumentParser):
    """argparse's mistakes (an unknown flag, a bad value) as one line, like every other CLI error,
    pointing at --help instead of printing the usage."""

    def error(self, message: str):
        self.exit(2, f"moe-cluster: error: {message} (see `{self.prog} --help`)\n")


class HelpWithDefaults(argparse.HelpFormatter):
    """`--help` gives each option's default, "(default: X)", unless its help text already
    says it or there is none to give (None, a False flag, --help itself)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or not action.option_strings
                or "(default" in (action.help or "")):
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{action.help or ''} (default: {shown.replace('%', '%%')})"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="moe-cluster", formatter_class=HelpWithDefaults,
        description="Serve a Mixture-of-Experts model with every expert in its own Ray Serve deployment.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print its traceback too (default: the one line that says what to do)")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_init(commands)
    _add_serve(commands)
    _add_render_k8s(commands)
    _add_import_hf(commands)
    _add_bench(commands)
    _add_generate(commands)
    add_train_commands(commands, _add_command)  # train, perplexity (moe_cluster/train/cli.py)
    return parser


def _add_command(commands: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help shows the defaults. It takes --debug too (`moe-cluster serve --debug`
    as well as `moe-cluster --debug serve`): SUPPRESS leaves the top level's value when it is absent."""
    command = commands.add_parser(name, formatter_class=HelpWithDefaults, **kwargs)
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="on an error, print its traceback too")
    return command


def _add_init(commands: argparse._SubParsersAction) -> None:
    init = _add_command(commands, "init", help="write a checkpoint with deterministic random weights",
                               description="Write a checkpoint directory (config.json + safetensors, one file "
                                           "per expert) with random weights drawn from --seed.")
    init.add_argument("directory", type=Path, help="where to write the checkpoint (created if missing)")
    init.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                      help="model shape (tiny: D=64, 8 MLP experts; mixtral-mini: D=1024, F=3584, 8 SwiGLU experts)")
    init.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bits)")
    init.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    init.set_defaults(run=_cmd_init)


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = _add_command(commands, "serve", help="serve a model on an embedded local Ray cluster",
                                description="Start a local Ray cluster, deploy the router and one deployment per "
                                            "expert, and serve HTTP until Ctrl-C or SIGTERM. Without --config, "
                                            "uses deployments/default.yaml when run from a source checkout.")
    serve.add_argument("--config", type=Path, help="Serve config file (serveConfigV2 format), e.g. "
                                                   "deployments/default.yaml")
    serve.add_argument("--checkpoint", help="checkpoint directory to serve (overrides the config's model)")
    serve.add_argument("--host", help="HTTP host (default: the config's, else 127.0.0.1)")
    serve.add_argument("--port", type=port_number, help="HTTP port, 1..65535 (default: the config's, else 8000)")
    serve.add_argument("--num-cpus", type=int, help="CPUs for the local Ray cluster (default: all)")
    serve.add_argument("--num-gpus", type=int, help="GPUs for the local Ray cluster (default: detected)")
    serve.add_argument("--hf-model", type=Path, help="serve this whole Hugging Face model (its import-hf output "
                                                     "is --checkpoint) with the OpenAI API: runner + router + "
                                                     "experts")
    serve.add_argument("--in-process", action="store_true",
                       help="with --hf-model: the runner computes the MoE blocks itself (no experts; the baseline)")
    serve.add_argument("--model-name", help="with --hf-model: the model's name in the OpenAI API "
                                            "(default: the directory's name)")
    serve.add_argument("--tokenizer", type=Path, help="with --hf-model: the tokenizer's directory (default: the "
                                                      "--hf-model directory)")
    serve.set_defaults(run=_cmd_serve)


def _add_render_k8s(commands: argparse._SubParsersAction) -> None:
    render_k8s = _add_command(
        commands, "render-k8s", help="copy the Serve config files into the KubeRay manifests' serveConfigV2",
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


def _add_import_hf(commands: argparse._SubParsersAction) -> None:
    import_hf = _add_command(
        commands, "import-hf", help="convert the MoE layers of a Hugging Face checkpoint into a moe-cluster checkpoint",
        description="Read a Hugging Face model directory (config.json + model.safetensors, or sharded "
                    "model-*.safetensors with model.safetensors.index.json) and write the gates, routed and "
                    "shared experts of its MoE layers as a moe-cluster checkpoint, one expert file at a time. "
                    "Families: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3. `layer` stays the decoder "
                    "layer index of the source model; its dense layers are not imported.")
    import_hf.add_argument("src", metavar="SRC", type=Path,
                           help="Hugging Face model directory (e.g. written by save_pretrained)")
    import_hf.add_argument("dst", metavar="DST", type=Path,
                           help="where to write the moe-cluster checkpoint (created if missing)")
    import_hf.add_argument("--dtype", choices=["keep", "float32", "bfloat16"], default="keep",
                           help="dtype of the experts (default keep: as stored; FP8 becomes bfloat16)")
    import_hf.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in DST")
    import_hf.set_defaults(run=_cmd_import_hf)


def _add_bench(commands: argparse._SubParsersAction) -> None:
    bench = _add_command(commands, "bench", help="measure in-process vs monolithic vs cluster (handle, HTTP)",
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
    bench.add_argument("--port", type=port_number, default=8765, help="HTTP port of the cluster under test")
    bench.add_argument("--experts-per-deployment", type=int,
                       help="experts packed into one deployment of the cluster (default: 8 for presets with 64+ "
                            "experts such as olmoe-mini, else 1)")
    bench.add_argument("--decode", action="store_true",
                       help="also time greedy decoding of whole Mixtral-like models through the runner, MoE blocks "
                            "in process vs on the cluster, batch 1 and 8 (needs the hf extra; writes the models "
                            "under --out once: 4-layer 1.7 GB, 16-layer 60 MB)")
    bench.add_argument("--decode-models", nargs="+", choices=["4-layer", "16-layer"], default=["4-layer", "16-layer"],
                       help="the models --decode times: 4-layer (D=1024, F=3584) and 16-layer (D=256, F=512, 16 MoE "
                            "layers: the per-call cost of a deep model)")
    bench.add_argument("--transport", choices=["auto", "object_store", "by_value", "channel"], default="auto",
                       help="how the cluster's rows travel to the experts (AppArgs.transport; channel: direct ZeroMQ "
                            "channels on 127.0.0.1)")
    bench.set_defaults(run=_cmd_bench)


def _add_generate(commands: argparse._SubParsersAction) -> None:
    generate = _add_command(
        commands, "generate", help="greedy generation with a Hugging Face MoE model whose experts run on the cluster",
        description="Load the dense parts of a Hugging Face MoE model (embeddings, attention, norms, head) and "
                    "generate greedily, each MoE block a call to the MoE cluster serving --checkpoint (its "
                    "import-hf output) on an embedded local Ray cluster, or to the in-process MoE with "
                    "--in-process. Prints the generated ids and where each token's time went.")
    generate.add_argument("--hf-model", type=Path, required=True, help="Hugging Face model directory")
    generate.add_argument("--checkpoint", type=Path, required=True,
                          help="its MoE blocks, as written by `moe-cluster import-hf HF_MODEL CHECKPOINT`")
    generate.add_argument("--input-ids", type=int, nargs="+", required=True, help="prompt token ids")
    generate.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate")
    generate.add_argument("--batch", type=int, default=1,
                          help="generate for this many copies of the prompt at once: each MoE call "
                               "then carries one row per sequence")
    generate.add_argument("--in-process", action="store_true", help="MoE blocks in this process, no Ray")
    generate.add_argument("--config", type=Path, help="Serve config file whose args configure the MoE app "
                                                      "(placement, replicas); its checkpoint is replaced")
    generate.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                          help="dtype of the dense model (auto: bfloat16 on a GPU, as config.json says on the CPU)")
    generate.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                          help="where the dense model runs: cuda puts it on a GPU (in process: the MoE blocks "
                               "too; on the cluster: the runner replica asks Ray for one GPU)")
    generate.add_argument("--torch-threads", type=int, help="torch threads of every process (default: torch's "
                                                            "in process, 1 per replica on the cluster)")
    generate.add_argument("--warmup", type=int, default=1, help="untimed runs before the measured one")
    generate.add_argument("--num-cpus", type=int, help="CPUs for the local Ray cluster (default: all)")
    generate.add_argument("--json", action="store_true",
                          help="print the whole result as JSON, alone on stdout (progress goes to stderr)")
    generate.set_defaults(run=_cmd_generate)



def _cmd_init(args: argparse.Namespace) -> int:
    from .checkpoint import save_model
    from .core.model import MoEModel

    output_dir(args.directory, "DIRECTORY")
    if (args.directory / "config.json").exists() and not args.force:
        raise UsageError(f"{args.directory} already holds a checkpoint; pass --force to overwrite it")
    config = PRESETS[args.preset]
    started = time.perf_counter()
    print(f"drawing {args.preset} weights (seed {args.seed}): D={config.d_model} F={config.d_ff} "
          f"E={config.num_experts} K={config.top_k} layers={config.num_layers} {config.expert_kind}", flush=True)
    model = MoEModel.random(config, seed=args.seed)
    save_model(model, args.directory)
    print(f"wrote {args.directory} in {time.perf_counter() - started:.1f}s")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """Every flag and path is checked here, before serve_local starts Ray."""
    from .serving.local import WholeModel, default_config_path, serve_local

    config = existing_file(args.config, "--config", "a Serve config file such as deployments/default.yaml") \
        if args.config else default_config_path()
    if args.hf_model is not None:
        hf_model_dir(args.hf_model)
    checkpoint = checkpoint_dir(Path(args.checkpoint)) if args.checkpoint else None
    if args.hf_model is None:
        if args.in_process or args.model_name or args.tokenizer:
            raise UsageError("--in-process, --model-name and --tokenizer need --hf-model")
        return serve_local(config, checkpoint, args.host, args.port, args.num_cpus, args.num_gpus)
    if checkpoint is None:
        raise UsageError(f"--hf-model needs --checkpoint: its MoE blocks (`moe-cluster import-hf {args.hf_model} "
                         "DST`, then pass DST)")
    tokenizer = tokenizer_dir(args.tokenizer).resolve() if args.tokenizer else None
    whole = WholeModel(args.hf_model.resolve(), args.in_process, args.model_name, tokenizer)
    return serve_local(config, checkpoint, args.host, args.port, args.num_cpus, args.num_gpus, whole)


def _cmd_render_k8s(args: argparse.Namespace) -> int:
    from .tools.k8s import render_all

    for path, flag in ((args.deployments, "--deployments"), (args.k8s, "--k8s")):
        if not path.is_dir():
            raise UsageError(f"{flag} {path}: no such directory; run from the repository's root or pass {flag}")
    changed = render_all(args.deployments, args.k8s, check=args.check)
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
    from .hf.importer import import_hf_checkpoint

    hf_model_dir(args.src, "SRC")
    output_dir(args.dst, "DST")
    if (args.dst / "config.json").exists() and not args.force:
        raise UsageError(f"DST {args.dst} already holds a config.json; pass --force to overwrite it")
    import_hf_checkpoint(args.src, args.dst, dtype=args.dtype, log=lambda line: print(line, flush=True))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .tools.bench import BenchSettings, run_bench

    settings = BenchSettings(preset=args.preset, seed=args.seed, tokens=tuple(args.tokens), clients=args.clients,
                             client_tokens=args.client_tokens, min_seconds=args.min_seconds, port=args.port,
                             experts_per_deployment=args.experts_per_deployment, decode=args.decode,
                             decode_models=tuple(args.decode_models), transport=args.transport)
    output_dir(args.out, "--out")
    try:
        results = run_bench(settings, args.out, log=lambda line: print(line, flush=True))
    except PortBusyError as error:
        raise UsageError(f"{error}; pass --port with a free port") from error
    print(json.dumps(results["summary"], indent=2))
    if results["wrong_answers"]:
        print(f"error: answers that differ from the oracle by more than {results['oracle_atol']:g}: "
              + "; ".join(results["wrong_answers"]), file=sys.stderr)
        return 1
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    hf_model_dir(args.hf_model)
    checkpoint_dir(args.checkpoint)
    if args.config:
        existing_file(args.config, "--config", "a Serve config file such as deployments/default.yaml")
    # With --json, stdout carries the JSON alone: everything printed meanwhile (our progress
    # lines, Ray's and transformers' messages) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = _generate(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_generation(result, len(args.input_ids), "in process" if args.in_process else "through the cluster")
    return 0


def _generate(args: argparse.Namespace) -> dict:
    """`generate`'s result: the ids and the timings, in process or on a local Ray cluster."""
    input_ids = [args.input_ids] * args.batch
    limits = dict(max_input_tokens=max(4096, args.batch * len(args.input_ids)),
                  max_new_tokens=max(256, args.max_new_tokens))
    if args.in_process:
        import torch

        from .hf.runner import GenerateLimits, HFMoERunner
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device here; leave --device out to run on the CPU")
        runner = HFMoERunner.in_process(args.hf_model, args.checkpoint, device=args.device, dtype=args.dtype,
                                        limits=GenerateLimits(**limits))
        for _ in range(args.warmup):
            runner.generate(input_ids, args.max_new_tokens)
        return runner.generate(input_ids, args.max_new_tokens)
    from .serving.local import read_serve_config
    from .serving.runner import generate_on_local_cluster
    moe = dict(read_serve_config(args.config).args) if args.config else {}
    moe["checkpoint"] = str(args.checkpoint.resolve())
    if args.torch_threads:
        moe["torch_threads"] = args.torch_threads
    runner_args = dict(limits, hf_model=str(args.hf_model.resolve()), moe=moe, dtype=args.dtype,
                       torch_threads=args.torch_threads)
    if args.device == "cuda":  # the replica computes on the GPU Ray gives it (serving/runtime.py pick_device)
        runner_args["runner"] = {"ray_actor_options": {"num_gpus": 1}}
    return generate_on_local_cluster(runner_args, input_ids, args.max_new_tokens, args.warmup, args.num_cpus,
                                     log=lambda line: print(line, flush=True))


def _print_generation(result: dict, prompt_tokens: int, mode: str) -> None:
    """The ids, one timing row per generated token, and the mean decode token split by where it went."""
    t = result["timings"]
    ids = result["output_ids"][0]
    print(f"output ids: {' '.join(map(str, ids[:prompt_tokens]))} | {' '.join(map(str, ids[prompt_tokens:]))}")
    print(f"{t['new_tokens']} new tokens x {t['batch']} sequences in {t['total_ms']:.1f} ms, MoE blocks {mode}")
    print(f"{'token':>5} {'ms':>9} {'dense_ms':>9} {'moe_ms':>9} {'moe_calls':>9} {'overhead_ms':>11}")
    for i, row in enumerate(t["per_token"]):
        print(f"{i:>5} {row['ms']:>9.2f} {row['dense_ms']:>9.2f} {row['moe_ms']:>9.2f} {row['moe_calls']:>9} "
              f"{row['overhead_ms']:>11.2f}{'  (prefill + first token)' if i == 0 else ''}")
    if t["decode_ms_per_token"] is not None:
        calls = t["moe_calls_per_token"]
        print(f"per decode token (mean of tokens 1..{t['new_tokens'] - 1}): {t['decode_ms_per_token']:.2f} ms = "
              f"dense {t['dense_ms_per_token']:.2f} + MoE {t['moe_ms_per_token']:.2f} ({calls:g} calls, "
              f"{t['moe_ms_per_token'] / calls:.2f} ms each) + overhead {t['overhead_ms_per_token']:.2f}")
    phases = result.get("router_phases_ms")
    if phases:  # through the cluster: what the router itself spent per MoE call (prefill included)
        inside = sum(phases.values())
        per_call = sum(row["moe_ms"] for row in t["per_token"]) / max(1, sum(r["moe_calls"] for r in t["per_token"]))
        print(f"per MoE call (mean over all {len(t['per_token'])} tokens): {per_call:.2f} ms at the runner = router "
              f"{inside:.2f} (route {phases.get('route_ms', 0):.2f} + experts {phases.get('experts_ms', 0):.2f} + "
              f"combine {phases.get('combine_ms', 0):.2f}) + runner<->router hop {per_call - inside:.2f}")


if __name__ == "__main__":
    sys.exit(main())
