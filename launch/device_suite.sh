#!/usr/bin/env bash
# The device suite in one call on a lent GPU machine (one H100/H200, about 9 minutes):
#
#   launch/device_wheels.sh                      # once, here: wheels the GPU image lacks -> .whl/
#   launch/device_suite.sh [OUT_DIR] [bench flags...]
#
# On the machine (the repository root, .whl carried) it installs .whl/*.whl offline into
# /tmp/site (no dependencies resolved: the image has the rest), prints the versions and the GPU,
# then runs `python -m qwenvl_jax.bench --suite=device`, which writes OUT_DIR/device_suite.json and
# OUT_DIR/device_suite.md (default: $OUT when set, else ./device_suite). The published PyTorch step
# runs beside ref8 and full when QWENVL_REFERENCE_DIR holds the published code (a carried,
# git-ignored folder) and QWENVL_REFERENCE_PYTHON (default python3) imports torch, transformers
# 4.37.2 and einops. Extra arguments go to the bench (e.g. --suite_budget_s=480, --tiny on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-device_suite}}
shift || true
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
  'optax', optax.__version__, jax.devices())" || exit 1
# The trainer's XLA flags on this JAX: XLA aborts on a flag it does not know, which would fail
# every item; then the suite runs without them and says so.
if ! "$py" -c "from qwenvl_jax import compiler; compiler.apply_flags(); import jax
print('trainer flags:', compiler.os.environ.get('XLA_FLAGS'), jax.devices())"; then
  echo "the trainer's XLA flags fail on this JAX: the suite runs without them"
  export QWENVL_NO_COMPILER_FLAGS=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
fi
ref=()
if [ -n "${QWENVL_REFERENCE_DIR:-}" ]; then
  ref=(--reference_dir="$QWENVL_REFERENCE_DIR" --reference_python="${QWENVL_REFERENCE_PYTHON:-$py}")
fi
exec "$py" -m qwenvl_jax.bench --suite=device --suite_out="$out" "${ref[@]}" "$@"
