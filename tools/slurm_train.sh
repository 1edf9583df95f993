#!/usr/bin/env bash
# bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG [tools/train.py options]
# GPUS: processes in all (default 4), GPUS_PER_NODE: per node (default 4). GRES defaults to
# gpu:$GPUS_PER_NODE; GRES= (empty) runs on a CPU partition (gloo). SRUN_ARGS: more srun
# options. MASTER_PORT: rendezvous port (default 29500).
if [ $# -lt 3 ]; then
  echo "usage: bash $0 PARTITION JOB_NAME CONFIG [train.py options]" >&2
  exit 2
fi
set -x

PARTITION=$1
JOB_NAME=$2
CONFIG=$3
GPUS=${GPUS:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
GRES=${GRES-gpu:${GPUS_PER_NODE}}
read -r -a SRUN_ARGS <<< "${SRUN_ARGS:-}"  # several srun options in one variable
PYTHON=${PYTHON:-python}
ROOT="$(dirname "$0")/.."

PYTHONPATH="$ROOT:$ROOT/plugin${PYTHONPATH:+:$PYTHONPATH}" \
srun -p "${PARTITION}" \
    --job-name="${JOB_NAME}" \
    ${GRES:+--gres="${GRES}"} \
    --ntasks="${GPUS}" \
    --ntasks-per-node="${GPUS_PER_NODE}" \
    --cpus-per-task="${CPUS_PER_TASK}" \
    --kill-on-bad-exit=1 \
    "${SRUN_ARGS[@]}" \
    "$PYTHON" -u "$(dirname "$0")/train.py" "${CONFIG}" --launcher="slurm" "${@:4}"
