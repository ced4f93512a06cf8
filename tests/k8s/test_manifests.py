"""The Kubernetes manifests in k8s/ are tested files, not decoration (no cluster needed).

- Each manifest validates against KubeRay's CRD schema, strictly: a misspelled field fails
  here instead of being pruned silently by the API server.
- Its serveConfigV2 is a valid Serve config (Ray's own schema) whose `args:` are valid
  AppArgs, and on the GPU manifest every replica asks for a GPU and every expert scales.
- Its serveConfigV2 is exactly what `moe-cluster render-k8s` writes from deployments/.

Built-in Kubernetes kinds (Service, ConfigMap, ...) would be checked offline with
`kubernetes-validate --strict`; the manifests hold none (only ray.io kinds, which that tool
cannot check), and `test_only_kuberay_kinds` fails if one is added without that check.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from functools import cache
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import yaml

from moe_cluster.cli import main as cli_main
from moe_cluster.tools.k8s import TARGETS, embedded_serve_config, render_all, render_serve_config, splice_serve_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DEPLOYMENTS = ROOT / "deployments"
# KubeRay's CRD schemas are KubeRay's files, not committed here (k8s/schemas/README.md): the
# first of these folders that has them is used; `python k8s/schemas/fetch.py` fills the first.
SCHEMA_DIRS = (K8S / "schemas", ROOT.parent / "shared" / "kuberay")  # a checkout's own, CI's workspace
SCHEMA_FILES = {"RayService": "rayservices.v1.schema.json", "RayCluster": "rayclusters.v1.schema.json"}
IMPORT_PATH = "moe_cluster.serving.app:build_app"
RUNNER_IMPORT_PATH = "moe_cluster.serving.runner:build_runner_app"  # a whole model; its MoE app in `args.moe`
MANIFESTS = sorted(K8S.glob("*.yaml"))
GPU_MANIFEST = K8S / "rayservice-gpu.yaml"


def load_manifest(path: Path) -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(documents) == 1, f"{path.name}: one document per manifest (render-k8s relies on it)"
    return documents[0]


def serve_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(embedded_serve_config(path.read_text(), path.name))


# ---------------------------------------------------------------- CRD schemas, strictly


def make_strict(schema: Any) -> Any:
    """A copy of `schema` in which every object that lists `properties` rejects other keys.

    CRD schemas leave `additionalProperties` open (the API server prunes unknown fields
    without a word); objects marked `x-kubernetes-preserve-unknown-fields` stay open.
    """
    if not isinstance(schema, dict):
        return schema
    strict = dict(schema)
    if "properties" in strict:
        strict["properties"] = {name: make_strict(sub) for name, sub in strict["properties"].items()}
        if not strict.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in strict:
            strict["additionalProperties"] = False
    if isinstance(strict.get("additionalProperties"), dict):
        strict["additionalProperties"] = make_strict(strict["additionalProperties"])
    if isinstance(strict.get("items"), dict):
        strict["items"] = make_strict(strict["items"])
    for keyword in ("anyOf", "allOf", "oneOf"):
        if keyword in strict:
            strict[keyword] = [make_strict(sub) for sub in strict[keyword]]
    if "not" in strict:
        strict["not"] = make_strict(strict["not"])
    return strict


@cache
def crd_schema(kind: str, strict: bool = True) -> dict[str, Any]:
    found = [folder / SCHEMA_FILES[kind] for folder in SCHEMA_DIRS if (folder / SCHEMA_FILES[kind]).is_file()]
    if not found:
        pytest.skip(f"KubeRay CRD schema {SCHEMA_FILES[kind]} is in none of {[str(d) for d in SCHEMA_DIRS]}; "
                    "fetch it once with `.venv/bin/python k8s/schemas/fetch.py` (needs network)")
    schema = json.loads(found[0].read_text())
    return make_strict(schema) if strict else schema


def schema_errors(manifest: dict[str, Any], strict: bool = True) -> list[str]:
    """Every place where `manifest` breaks its kind's CRD schema, as 'path: message'."""
    validator = jsonschema.Draft7Validator(crd_schema(manifest["kind"], strict))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))]


def test_every_target_manifest_exists():
    assert {t.manifest for t in TARGETS} <= {p.name for p in MANIFESTS}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_only_kuberay_kinds(path: Path):
    # A built-in kind (Service, Ingress, ...) needs its own offline check:
    # `kubernetes-validate --strict FILE` (PyPI), added to the test extra and to this file.
    manifest = load_manifest(path)
    assert manifest["apiVersion"] == "ray.io/v1", f"{path.name}: add a kubernetes-validate --strict test first"
    assert manifest["kind"] in SCHEMA_FILES


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_crd_schema_strictly(path: Path):
    manifest = load_manifest(path)
    assert schema_errors(manifest) == [], f"{path.name} breaks the KubeRay CRD schema"
    assert manifest["metadata"]["name"], f"{path.name}: metadata.name is required"


def _head(m: dict) -> dict:
    return m["spec"]["rayClusterConfig"]["headGroupSpec"]


def _worker(m: dict) -> dict:
    return m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


BROKEN: dict[str, Callable[[dict], None]] = {
    "misspelled rayStartParams": lambda m: _rename(_head(m), "rayStartParams", "rayStartParam"),
    "replicas as a word": lambda m: _worker(m).update(replicas="two"),
    "autoscaling flag as a string": lambda m: m["spec"]["rayClusterConfig"].update(enableInTreeAutoscaling="yes"),
    "unknown upscalingMode": lambda m: m["spec"]["rayClusterConfig"]["autoscalerOptions"].update(
        upscalingMode="Fast"),
    "misspelled serveConfigV2": lambda m: _rename(m["spec"], "serveConfigV2", "serveConfigv2"),
    "misspelled container field": lambda m: _rename(
        _worker(m)["template"]["spec"]["containers"][0], "resources", "resource"),
    "worker group without groupName": lambda m: _worker(m).pop("groupName"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_strict_schema_rejects_broken_manifest(breakage: str):
    manifest = copy.deepcopy(load_manifest(GPU_MANIFEST))
    BROKEN[breakage](manifest)
    assert schema_errors(manifest), f"a manifest with a {breakage} passed the strict schema"


def test_strictness_is_what_catches_misspelled_fields():
    """The CRD as published accepts a misspelled field (the API server would drop it)."""
    manifest = copy.deepcopy(load_manifest(GPU_MANIFEST))
    BROKEN["misspelled rayStartParams"](manifest)
    assert schema_errors(manifest, strict=False) == []
    assert any("rayStartParam" in error for error in schema_errors(manifest, strict=True))


# ---------------------------------------------------------------- image and versions


def test_ray_version_matches_image_and_installed_ray():
    import ray

    dockerfile = (K8S / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-", dockerfile, re.MULTILINE)
    assert base, "k8s/Dockerfile: expected `ARG BASE_IMAGE=rayproject/ray:<version>-...`"
    assert base.group(1) == ray.__version__
    for path in MANIFESTS:
        assert load_manifest(path)["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__, path.name


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_pod_runs_the_same_image(path: Path):
    cluster = load_manifest(path)["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert len(images) == 1, f"{path.name}: head and workers must run one image (one Ray, one moe-cluster)"


# ---------------------------------------------------------------- serveConfigV2 content


def autoscaling_blocks(node: Any, where: str = "") -> list[tuple[str, dict]]:
    """Every `autoscaling_config` mapping anywhere in a parsed Serve config."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "autoscaling_config" and isinstance(value, dict):
                found.append((f"{where}.{key}", value))
            found += autoscaling_blocks(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += autoscaling_blocks(value, f"{where}[{index}]")
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_config_is_valid(path: Path):
    from ray.serve.schema import ServeDeploySchema

    from moe_cluster.serving.args import AppArgs

    config = serve_config(path)
    ServeDeploySchema.model_validate(config)
    # Inside a pod the proxy must listen on every interface, or the Service cannot reach it.
    assert config["http_options"]["host"] == "0.0.0.0", path.name
    ours = [app for app in config["applications"] if app.get("import_path") in (IMPORT_PATH, RUNNER_IMPORT_PATH)]
    assert ours, f"{path.name}: no application with import_path {IMPORT_PATH} or {RUNNER_IMPORT_PATH}"
    for app in ours:
        AppArgs.model_validate(_moe_args(app))  # ServeDeploySchema does not look inside args
        if app["import_path"] == RUNNER_IMPORT_PATH:
            from moe_cluster.serving.runner import RunnerArgs

            RunnerArgs.model_validate(app["args"])
    for where, block in autoscaling_blocks(config):
        # A placement entry's block is a partial override, merged key by key into the expert
        # defaults: test_every_deployment_scales_validly checks the merged result.
        if ".placement[" not in where:
            _validate_autoscaling(block, f"{path.name}: {where}")


def _validate_autoscaling(block: dict, where: str) -> None:
    from ray.serve.config import AutoscalingConfig

    try:
        AutoscalingConfig(**block)
    except Exception as error:  # pydantic's ValidationError, or an import error of a policy
        pytest.fail(f"{where}: not a valid Serve AutoscalingConfig: {error}")


def _moe_args(app: dict) -> dict:
    """The MoE app's args of a Serve config application (a runner app carries them in `moe`)."""
    args = app.get("args") or {}
    return args.get("moe") or {} if app["import_path"] == RUNNER_IMPORT_PATH else args


def _our_app(path: Path) -> tuple[Any, dict[str, dict]]:
    """AppArgs of the manifest's moe app, and its per-deployment overrides from the config."""
    from moe_cluster.serving.args import AppArgs

    app = next(a for a in serve_config(path)["applications"]
               if a.get("import_path") in (IMPORT_PATH, RUNNER_IMPORT_PATH))
    args = AppArgs.model_validate(_moe_args(app))
    if args.checkpoint and not (Path(args.checkpoint) / "config.json").is_file():
        pytest.skip(f"{path.name} serves {args.checkpoint}, which is not readable here; "
                    "the placement needs its config.json")
    return args, {d["name"]: d for d in app.get("deployments") or []}


def _deployments(args: Any, overrides: dict[str, dict]) -> dict[str, dict]:
    """Options of every deployment the app builds: the router and one per expert group."""
    from moe_cluster.serving.app import ROUTER_NAME

    groups = args.resolve_placement(args.load_model_config()).groups
    options = {g.name: args.group_options(g.name) for g in groups}
    options[ROUTER_NAME] = args.router.model_dump(exclude_none=True)
    return {name: {**opts, **overrides.get(name, {})} for name, opts in options.items()}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_deployment_scales_validly(path: Path):
    for name, options in _deployments(*_our_app(path)).items():
        if options.get("autoscaling_config"):
            _validate_autoscaling(options["autoscaling_config"], f"{path.name}: deployment {name}")


def test_gpu_manifest_puts_every_replica_on_a_gpu():
    from moe_cluster.serving.app import ROUTER_NAME

    deployments = _deployments(*_our_app(GPU_MANIFEST))
    assert ROUTER_NAME in deployments and len(deployments) > 1
    for name, options in deployments.items():
        gpus = (options.get("ray_actor_options") or {}).get("num_gpus", 0)
        assert gpus >= 1, f"{name}: ray_actor_options.num_gpus is {gpus}; every replica needs a GPU"
        if name != ROUTER_NAME:
            assert options.get("autoscaling_config"), f"expert deployment {name} has no autoscaling_config"


def _replica_range(options: dict) -> tuple[int, int]:
    from ray.serve.config import AutoscalingConfig

    if options.get("autoscaling_config"):
        auto = AutoscalingConfig(**options["autoscaling_config"])
        return auto.min_replicas, auto.max_replicas
    count = options.get("num_replicas") or 1
    return count, count


def test_gpu_worker_group_fits_the_replicas():
    """Enough GPU pods for every replica at the ceiling; no idle GPU pods at the floor."""
    cluster = load_manifest(GPU_MANIFEST)["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "the head must host no replica"
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == int(resources["limits"]["nvidia.com/gpu"]) == 1
    floor = ceiling = 0
    for options in _deployments(*_our_app(GPU_MANIFEST)).values():
        gpus = math.ceil(options["ray_actor_options"]["num_gpus"])  # 1 GPU per pod: whole pods
        low, high = _replica_range(options)
        floor, ceiling = floor + low * gpus, ceiling + high * gpus
    assert group["maxReplicas"] >= ceiling, f"maxReplicas {group['maxReplicas']} < {ceiling} GPUs at the ceiling"
    assert group["minReplicas"] <= floor, f"minReplicas {group['minReplicas']} > {floor} GPUs at the floor"


def _context(config: Any, current: int, calls: float = 0.0, rows_per_s: float | None = None) -> Any:
    """The AutoscalingContext fields TokenLoadPolicy and Serve's wrapper read, for one deployment."""
    import types

    from moe_cluster.serving.autoscaling import ROWS_PER_S, ROWS_WAITING

    metrics = {ROWS_PER_S: {0: rows_per_s}, ROWS_WAITING: {0: 0.0}} if rows_per_s is not None else {}
    return types.SimpleNamespace(aggregated_metrics=metrics, total_num_requests=calls, target_num_replicas=current,
                                 current_num_replicas=current, policy_state={}, config=config)


def test_gpu_experts_scale_on_token_load_as_documented():
    """What the GPU manifest's expert autoscaling really does, not only its schema: every expert
    deployment names the real TokenLoadPolicy with kwargs its constructor takes, min/max are what the
    README says (1..4, expert-0 up to 8), custom metrics arrive in time, and Serve's own wrapper of
    the policy, fed this config, grows a deployment on rows, on calls waiting, and shrinks it idle."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig

    from moe_cluster.serving.app import ROUTER_NAME
    from moe_cluster.serving.autoscaling import POLICY_PATH, TokenLoadPolicy

    experts = {name: options for name, options in _deployments(*_our_app(GPU_MANIFEST)).items() if name != ROUTER_NAME}
    assert experts
    for name, options in experts.items():
        config = AutoscalingConfig(**options["autoscaling_config"])
        assert config.policy.policy_function == POLICY_PATH, f"{name} does not scale on token load"
        policy = _resolve_policy_callable(config.policy)  # Serve's own import and constructor call
        assert type(policy) is TokenLoadPolicy, f"{name}: {POLICY_PATH} resolved to {policy!r}"
        for key, value in config.policy.policy_kwargs.items():
            assert getattr(policy, key) == value, f"{name}: policy_kwargs {key} did not reach the policy"
        assert (config.min_replicas, config.max_replicas) == (1, 8 if name == "expert-0" else 4), name
        assert config.metrics_interval_s <= 2, f"{name}: custom metrics would lag ~10 s at Serve's default"

        decide = _apply_autoscaling_config(policy)
        target = policy.target_rows_per_s
        assert decide(_context(config, 1, rows_per_s=2.5 * target))[0] == 1, f"{name}: upscale_delay_s ignored"
        assert _after_delay(decide, _context(config, 1, rows_per_s=2.5 * target)) == 3, f"{name}: no growth on rows"
        busy = 3 * config.get_target_ongoing_requests()  # calls waiting, a trickle of rows done
        assert _after_delay(decide, _context(config, 1, calls=busy, rows_per_s=1.0)) == 3, \
            f"{name}: no growth when saturated"
        assert decide(_context(config, 2, rows_per_s=0.0))[0] == 2, f"{name}: downscale_delay_s ignored"
        assert _after_delay(decide, _context(config, 2, rows_per_s=0.0)) == 1, f"{name}: no shrinking when idle"


def _after_delay(decide: Callable, ctx: Any) -> int:
    """The decision of Serve's wrapped policy once its up/down delay has passed for `ctx`'s demand."""
    from ray.serve._private.constants import SERVE_AUTOSCALING_DECISION_TIMESTAMP_KEY

    ctx.policy_state = decide(ctx)[1]
    ctx.policy_state[SERVE_AUTOSCALING_DECISION_TIMESTAMP_KEY] = 0.0  # the first such decision: long ago
    return decide(ctx)[0]


# ---------------------------------------------------------------- drift: render-k8s


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.manifest)
def test_manifest_embeds_the_rendered_config(target):
    embedded = embedded_serve_config((K8S / target.manifest).read_text())
    rendered = render_serve_config(DEPLOYMENTS / target.config, target.http_host)
    assert embedded == rendered, f"k8s/{target.manifest} drifted from deployments/{target.config}; " \
                                 "run `moe-cluster render-k8s`"


def test_render_check_passes_on_the_repository():
    assert render_all(DEPLOYMENTS, K8S, check=True) == []


def test_cpu_render_changes_only_the_host():
    original = yaml.safe_load((DEPLOYMENTS / "default.yaml").read_text())
    rendered = yaml.safe_load(render_serve_config(DEPLOYMENTS / "default.yaml", "0.0.0.0"))
    assert rendered["http_options"] == {**original["http_options"], "host": "0.0.0.0"}
    assert {k: v for k, v in rendered.items() if k != "http_options"} == \
           {k: v for k, v in original.items() if k != "http_options"}


def _copy_project(tmp_path: Path) -> tuple[Path, Path]:
    deployments, k8s = tmp_path / "deployments", tmp_path / "k8s"
    shutil.copytree(DEPLOYMENTS, deployments)
    shutil.copytree(K8S, k8s)
    return deployments, k8s


def test_render_detects_drift_and_fixes_it(tmp_path: Path, capsys):
    deployments, k8s = _copy_project(tmp_path)
    gpu = deployments / "gpu.yaml"
    gpu.write_text(gpu.read_text().replace("max_tokens_per_request: 16384", "max_tokens_per_request: 4096"))
    flags = ["--deployments", str(deployments), "--k8s", str(k8s)]

    assert cli_main(["render-k8s", "--check", *flags]) == 1
    assert "rayservice-gpu.yaml" in capsys.readouterr().err
    assert (k8s / "rayservice-gpu.yaml").read_text() == GPU_MANIFEST.read_text(), "--check must not write"

    assert cli_main(["render-k8s", *flags]) == 0
    assert cli_main(["render-k8s", "--check", *flags]) == 0
    fixed = (k8s / "rayservice-gpu.yaml").read_text()
    assert "max_tokens_per_request: 4096" in embedded_serve_config(fixed)
    head = GPU_MANIFEST.read_text().split("\n  serveConfigV2: |\n")[0]
    assert fixed.startswith(head + "\n  serveConfigV2: |\n"), "rendering must keep the manifest's own lines"


def test_render_detects_a_hand_edited_manifest(tmp_path: Path):
    deployments, k8s = _copy_project(tmp_path)
    manifest = k8s / "rayservice-cpu.yaml"
    manifest.write_text(manifest.read_text().replace("num_replicas: 1", "num_replicas: 2", 1))
    assert render_all(deployments, k8s, check=True) == [manifest]


def test_render_refuses_a_key_after_the_block():
    manifest = GPU_MANIFEST.read_text() + "status: {}\n"
    with pytest.raises(ValueError, match="status: {}.*last key of spec"):
        splice_serve_config(manifest, "proxy_location: EveryNode\n")


def test_render_explains_a_host_it_cannot_set(tmp_path: Path):
    config = tmp_path / "flow.yaml"
    config.write_text("http_options: {host: 127.0.0.1, port: 8000}\napplications: []\n")
    with pytest.raises(ValueError, match="block mapping"):
        render_serve_config(config, "0.0.0.0")


RUNNER_GPU_MANIFEST = K8S / "rayservice-runner-gpu.yaml"


def test_runner_gpu_manifest_puts_the_runner_and_every_expert_on_a_gpu():
    """The runner's dense model and each expert replica get a GPU of their own, and the worker pods
    (one GPU each) hold them all: the runner plus the 8 expert deployments of the Mixtral it names."""
    (app,) = serve_config(RUNNER_GPU_MANIFEST)["applications"]
    args = app["args"]
    assert args["runner"]["ray_actor_options"]["num_gpus"] == 1
    assert args["moe"]["experts"]["ray_actor_options"]["num_gpus"] == 1
    assert args["moe"]["experts"]["num_replicas"] == 1
    (group,) = load_manifest(RUNNER_GPU_MANIFEST)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert group["minReplicas"] == group["maxReplicas"] == 1 + 8
