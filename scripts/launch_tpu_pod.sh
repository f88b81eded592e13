#!/usr/bin/env bash
# Run the same moe-train command on every worker of a Cloud TPU VM slice (TPU pod).
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE [moe-train args...]
#   scripts/launch_tpu_pod.sh my-v5p-32 us-east5-a \
#       --config=configs/tpu_1b.py --workdir=/mnt/gcs/runs/tpu_1b \
#       --config.data.path='/mnt/data/*.jsonl'
#
# Every worker must have the repository at REPO (default ~/switchyard) and a virtual environment
# with `pip install -e '.[dev]' 'jax[tpu]'` (do it once with SETUP=1). JAX finds the other
# workers from the TPU metadata (--distributed=auto); all workers must see the same WORKDIR
# (a bucket mounted with Cloud Storage FUSE at the same path, or a shared disk). Ctrl-C stops the command on every worker.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [moe-train args...]" >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2
repo=${REPO:-'~/switchyard'}
args=$(printf ' %q' "$@")
if [[ ${SETUP:-0} == 1 ]]; then
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
    "cd $repo && python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' 'jax[tpu]'"
fi
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd $repo && .venv/bin/moe-train --distributed=auto$args"
