#!/usr/bin/env bash
# Ahead-of-time compile of the 7B multi-task train step (configs/multitask.py, Table 8) for a
# 32-chip v5p slice (v5p-64) and a 64-chip v6e slice, on a CPU host with no TPU. Needs the tpu
# extra (pip install -e ".[tpu]"). Prints per-device params/optimizer bytes and the compiled
# memory analysis; each compile takes minutes (about 25 on a busy 2-core machine).
# The config's mesh.model=auto compiles model = 1 first and keeps it where it fits with remat no
# heavier than model = 2's: one compile on v5p-64, four on v6e-64 (--config.mesh.model=2: Table 8 only).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost ALLOW_MULTIPLE_LIBTPU_LOAD=1
python -m qwenvl_jax.train --config=configs/multitask.py --dry_run \
  --config.aot.topology=v5p:4x4x2 --config.aot.chip_config=megacore "$@"
python -m qwenvl_jax.train --config=configs/multitask.py --dry_run \
  --config.aot.topology=v6e:8x8 --config.aot.chip_config=default "$@"
