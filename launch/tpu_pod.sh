#!/usr/bin/env bash
# Runs one training stage on every host of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra flags...]
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/multitask.py gs://bucket/stage2 \
#       --config.init.workdir=gs://bucket/stage1
#
# Every host runs the same command; jax.distributed finds the others (--distributed), each host
# feeds its shard of the global batch, and the run resumes from WORKDIR's latest complete
# checkpoint when restarted (e.g. after a preemption, which sends SIGTERM: the trainer saves first).
set -euo pipefail
TPU=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO=${REPO:?set REPO to the git URL of your qwenvl_jax checkout (cloned on every host)}
# The command runs in a remote shell: quote every argument for it (flags may hold spaces).
ARGS=$(printf ' %q' "--config=$CONFIG" "--workdir=$WORKDIR" --distributed "$@")
CMD="set -e; [ -d qwenvl_jax ] || git clone -q $(printf %q "$REPO") qwenvl_jax; cd qwenvl_jax; \
pip install -q -e '.[tpu,gcs]'; \
${LIBTPU_INIT_ARGS:+export LIBTPU_INIT_ARGS=$(printf %q "$LIBTPU_INIT_ARGS"); }\
python -m qwenvl_jax.train$ARGS"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$CMD"
