#!/usr/bin/env bash
# bash tools/dist_train.sh CONFIG GPUS [tools/train.py options]
# GPUS: processes on this node, one per GPU; on machines without CUDA, CPU processes
# (gloo). Several nodes: run the same command on each with NNODES, NODE_RANK (0..NNODES-1),
# MASTER_ADDR (node 0's address) and PORT set. PYTHON picks the interpreter.
if [ $# -lt 2 ]; then
  echo "usage: bash $0 CONFIG GPUS [train.py options]" >&2
  exit 2
fi
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}
ROOT="$(dirname "$0")/.."

PYTHONPATH="$ROOT:$ROOT/plugin${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$(dirname "$0")/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
