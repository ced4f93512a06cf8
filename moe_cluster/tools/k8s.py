"""`moe-cluster render-k8s`: embed the Serve config files into the KubeRay manifests.

The Serve config files in `deployments/` are the source of truth. Each RayService manifest
in `k8s/` carries a copy of one of them in `spec.serveConfigV2` (a YAML block scalar);
`render_all` rewrites those copies, and `render_all(check=True)` only reports the
manifests whose copy has drifted (CI runs it, so a config edit without a render fails).

The rule that keeps this simple and keeps the manifests' comments: in every manifest
`serveConfigV2: |` is the LAST key of `spec` (and `spec` the last top-level key), so the
block runs from the line after it to the end of the file. Rendering keeps every line up to
and including `serveConfigV2: |` and replaces the rest with the config file's text,
indented. The config file's own comments travel with it; they are part of the string.

Pure Python (pyyaml), no Ray: it runs in CI without a cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["K8sTarget", "TARGETS", "render_serve_config", "splice_serve_config", "embedded_serve_config",
           "render_manifest", "render_all"]

# `serveConfigV2: |` alone on its line (plain `|`: clip chomping, indentation detected from the text).
_BLOCK_KEY = re.compile(r"^(?P<indent> *)serveConfigV2: *\| *$", re.MULTILINE)
# The `host:` line directly inside a block-style `http_options:` mapping.
_HTTP_HOST = re.compile(r"^(http_options:[ \t]*(?:#[^\n]*)?\n(?:[ \t]+[^\n]*\n|[ \t]*\n)*?[ \t]+host:[ \t]*)(\S+)",
                        re.MULTILINE)


@dataclass(frozen=True)
class K8sTarget:
    """Which manifest embeds which Serve config file, and what changes on the way."""

    config: str  # file name in deployments/
    manifest: str  # file name in k8s/
    # Override of `http_options.host`. A proxy inside a pod must listen on 0.0.0.0, or the
    # Kubernetes Service (`<name>-serve-svc`) cannot reach it; the laptop config says 127.0.0.1.
    http_host: str | None = None


TARGETS: tuple[K8sTarget, ...] = (
    K8sTarget("gpu.yaml", "rayservice-gpu.yaml"),
    K8sTarget("default.yaml", "rayservice-cpu.yaml", http_host="0.0.0.0"),
    K8sTarget("runner-cpu.yaml", "rayservice-runner-cpu.yaml", http_host="0.0.0.0"),  # a whole model, OpenAI API
    K8sTarget("runner-gpu.yaml", "rayservice-runner-gpu.yaml"),  # the same, the runner and experts on GPUs
)


def render_serve_config(config_path: Path, http_host: str | None = None) -> str:
    """The text to embed: the config file as it is, with `http_options.host` set if asked.

    The file must parse as YAML. Raises ValueError (with the file's name and what to do)
    when the host cannot be set by editing the text.
    """
    text = Path(config_path).read_text()
    original = yaml.safe_load(text) or {}
    if http_host is not None:
        text, count = _HTTP_HOST.subn(lambda m: m.group(1) + http_host, text, count=1)
        expected = dict(original, http_options={**(original.get("http_options") or {}), "host": http_host})
        if count != 1 or yaml.safe_load(text) != expected:
            raise ValueError(f"{config_path}: could not set http_options.host to {http_host}; write it as a "
                             "block mapping at the top level (`http_options:` then an indented `host: ...`)")
    # Whitespace-only lines would not survive the block scalar as they are; make them empty.
    lines = [line if line.strip() else "" for line in text.rstrip("\n").split("\n")]
    return "\n".join(lines) + "\n"


def splice_serve_config(manifest_text: str, config_text: str, where: str = "manifest") -> str:
    """`manifest_text` with everything after its `serveConfigV2: |` line replaced by `config_text`.

    Raises ValueError when the manifest breaks the rule (no such line, more than one, or a
    key after the block) or when the result does not read back as `config_text`.
    """
    matches = list(_BLOCK_KEY.finditer(manifest_text))
    if len(matches) != 1:
        raise ValueError(f"{where}: expected exactly one `serveConfigV2: |` line, found {len(matches)}; "
                         "see the rule at the top of the manifest")
    key = matches[0]
    indent = " " * (len(key.group("indent")) + 2)
    _check_block_is_last(manifest_text[key.end():], len(indent), where)
    block = "".join(indent + line if line.strip() else "\n"
                    for line in config_text.splitlines(keepends=True))
    rendered = manifest_text[:key.end()] + "\n" + block
    try:
        survived = embedded_serve_config(rendered, where) == config_text
    except yaml.YAMLError:
        survived = False
    if not survived:
        raise ValueError(f"{where}: the config does not survive embedding as a YAML block scalar "
                         "(does its first line start with a space?); start the config file with a "
                         "comment or a top-level key")
    return rendered


def _check_block_is_last(tail: str, block_indent: int, where: str) -> None:
    """Refuse to overwrite anything but the block itself: a key after it would be lost."""
    for number, line in enumerate(tail.splitlines()[1:], start=1):
        if line.strip() and len(line) - len(line.lstrip(" ")) < block_indent:
            raise ValueError(f"{where}: `{line.strip()}` comes after serveConfigV2 ({number} lines below it); "
                             "move serveConfigV2 to the end of the file, as the last key of spec")


def embedded_serve_config(manifest_text: str, where: str = "manifest") -> str:
    """The string in `spec.serveConfigV2` of a one-document manifest."""
    data = yaml.safe_load(manifest_text) or {}
    value = (data.get("spec") or {}).get("serveConfigV2")
    if not isinstance(value, str):
        raise ValueError(f"{where}: spec.serveConfigV2 is missing or not a string")
    return value


def render_manifest(target: K8sTarget, deployments_dir: Path, k8s_dir: Path) -> tuple[Path, str, str]:
    """(manifest path, its current text, its rendered text) for one target."""
    config_path = Path(deployments_dir) / target.config
    manifest_path = Path(k8s_dir) / target.manifest
    for path, flag in ((config_path, "--deployments"), (manifest_path, "--k8s")):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run from the project root or pass {flag} DIR")
    current = manifest_path.read_text()
    config_text = render_serve_config(config_path, target.http_host)
    return manifest_path, current, splice_serve_config(current, config_text, str(manifest_path))


def render_all(deployments_dir: Path, k8s_dir: Path, check: bool = False,
               targets: tuple[K8sTarget, ...] = TARGETS) -> list[Path]:
    """Render every target; returns the manifests that differed from their rendering.

    With `check=True` nothing is written: the returned list is the drift to report.
    """
    changed = []
    for target in targets:
        path, current, rendered = render_manifest(target, deployments_dir, k8s_dir)
        if rendered != current:
            changed.append(path)
            if not check:
                path.write_text(rendered)
    return changed
