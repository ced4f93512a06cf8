"""Fetch the KubeRay CRD schemas that tests/k8s validates the manifests against.

    python k8s/schemas/fetch.py        # writes k8s/schemas/rayservices.v1.schema.json, rayclusters.v1.schema.json

Each file is the `openAPIV3Schema` of the `v1` version of a KubeRay CustomResourceDefinition
(`ray-operator/config/crd/bases/ray.io_<plural>.yaml` of ray-project/kuberay at COMMIT), as
compact JSON; its SHA-256 must match the one pinned here, so every checkout validates against
the same schema. The files are not committed (see README.md here); CI finds the same files
in its workspace (../shared/kuberay/).
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.request
from pathlib import Path

import yaml

COMMIT = "feeaf72facab4881ba2b179248bb67315634e229"  # ray-project/kuberay, 2026-08-19, after v1.7.0
URL = "https://raw.githubusercontent.com/ray-project/kuberay/{commit}/ray-operator/config/crd/bases/ray.io_{plural}.yaml"
SHA256 = {  # of the JSON files written
    "rayservices": "9b16fafa752351c31f2fa1878e3f0919ba3536b2857648dc21858c6f0f7215d2",
    "rayclusters": "b71a02806a7c9eccf6cc4b71c299c6720c520858ac116ba3446c75f1502c9dc7",
}
HERE = Path(__file__).resolve().parent


def v1_schema_json(crd_yaml: str) -> str:
    """The v1 openAPIV3Schema of a CRD manifest, as compact JSON (how the files are stored)."""
    crd = yaml.safe_load(crd_yaml)
    (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    return json.dumps(v1["schema"]["openAPIV3Schema"], separators=(",", ":"))


def fetch(plural: str, out_dir: Path = HERE) -> Path:
    """Download, extract, check the SHA-256, write out_dir/<plural>.v1.schema.json."""
    url = URL.format(commit=COMMIT, plural=plural)
    with urllib.request.urlopen(url, timeout=60) as response:
        schema = v1_schema_json(response.read().decode())
    digest = hashlib.sha256(schema.encode()).hexdigest()
    if digest != SHA256[plural]:
        raise SystemExit(f"{url}: its v1 schema has SHA-256 {digest}, expected {SHA256[plural]}; nothing written")
    path = out_dir / f"{plural}.v1.schema.json"
    path.write_text(schema)
    return path


if __name__ == "__main__":
    for plural in SHA256:
        print(f"wrote {fetch(plural)}")
    sys.exit(0)
