#!/usr/bin/env bash
# Build .whl/: what scripts/gpu_smoke.py needs on a GPU machine that has Python 3.12 and torch
# but no Ray and no package index (the `device` machines of this workplace). Run it here, in the
# repository root; it downloads ~110 MB of cp312 manylinux x86_64 wheels and writes ~33 MB.
#
#   bash scripts/gpu_bundle.sh            # then carry .whl to the GPU machine and run there:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   python3 -c "import glob, tarfile; [tarfile.open(p).extractall('/tmp/site', filter='fully_trusted') for p in glob.glob('.whl/*.tar.xz')]"
#   PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_smoke.py --out OUT
#
# The Ray wheel (79 MB) is too big to carry whole (64 MiB per call): it is unpacked and packed
# again as tar.xz without what Ray Serve never imports (Java jars, RLlib, Tune, Train, Data,
# LLM, AIR, the dashboard's web client). The other wheels are what Ray Serve and this app import
# at start that the GPU image lacks. Ray then runs in its "minimal" mode (no dashboard, no
# metrics agent), which Serve is fine with.
set -euo pipefail
RAY_VERSION=2.60.0
OUT=.whl
PACKAGES=(
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  starlette==1.10.0 fastapi==0.165.0 uvicorn==0.54.0
  jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1
  opentelemetry-api==1.45.2 grpcio-reflection==1.85.1 grpcio==1.85.3 protobuf==7.36.2
  typing-extensions==4.16.0 anyio==4.16.0 attrs==26.1.0
  pyzmq==27.3.0  # the experts' direct channels (transport auto / channel)
)
PLATFORM=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p "$OUT"
echo "downloading ${#PACKAGES[@]} wheels ..."
python3 -m pip download -q "${PLATFORM[@]}" -d "$OUT" "${PACKAGES[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "downloading ray $RAY_VERSION and slimming it ..."
python3 -m pip download -q "${PLATFORM[@]}" -d "$work" "ray==$RAY_VERSION"
unzip -q "$work"/ray-*.whl -d "$work/site"  # unzip keeps the binaries executable
for part in jars rllib tune train data llm air dashboard/client serve/llm; do
  rm -rf "$work/site/ray/$part"
done
tar -C "$work/site" -cf - . | xz -9 -T0 > "$OUT/ray-$RAY_VERSION-slim-cp312-manylinux2014_x86_64.tar.xz"
du -sh "$OUT"
