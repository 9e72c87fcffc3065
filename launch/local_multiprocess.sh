#!/usr/bin/env bash
# N training processes on this machine (CPU, gloo collectives), e.g. to check multi-process behaviour:
#   launch/local_multiprocess.sh 2 --config=configs/demo.py --workdir=/tmp/prima_mp
# Each process sees DEVICES_PER_PROCESS fake CPU devices (default 1; appended to any XLA_FLAGS set, the
# last count wins); process 0 writes logs.
# MODULE=prima_jax.data.cache runs the feature-cache build (same flags) instead of training.
set -euo pipefail
N=${1:?usage: $0 NUM_PROCESSES [train flags...]}
shift
PORT=${PORT:-12355}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}
PYTHON=${PYTHON:-python}
MODULE=${MODULE:-prima_jax.train}
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
    "$PYTHON" -m "$MODULE" --distributed=yes --cpu_collectives=gloo \
    --coordinator_address="127.0.0.1:${PORT}" --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
