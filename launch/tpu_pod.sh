#!/usr/bin/env bash
# Run training on every worker of a Cloud TPU VM pod slice (jax.distributed finds the coordinator itself):
#   launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/run --config=configs/m4seg.py --config.data.data_dir=/gcs/data
# The repository is expected at ~/prima_jax on every worker (e.g. after `gcloud ... scp` or a git clone),
# with its virtual environment in ~/prima_jax/.venv installed with the gcs extra
# (pip install -e ".[gcs]": gcsfs and google-cloud-storage, which a gs:// workdir needs). The ArrayRecord
# dataset is read from a local or gcsfuse-mounted path. SIGTERM (preemption) checkpoints and exits 0.
set -euo pipefail
TPU_NAME=${1:?usage: $0 TPU_NAME ZONE WORKDIR [train flags...]}
ZONE=${2:?zone}
WORKDIR=${3:?workdir (gs:// or a shared path)}
shift 3
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
  "cd ~/prima_jax && .venv/bin/python -m prima_jax.train --workdir=$WORKDIR $ARGS"
