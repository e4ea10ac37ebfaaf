#!/usr/bin/env bash
# Launch a phoenix run on several nodes with torchrun's c10d rendezvous.
# Run this same command on every node (e.g. via pdsh/ssh), with:
#   NNODES      number of nodes                    (default 1)
#   GPUS        processes per node                 (default 8)
#   RDZV_HOST   address of one node all can reach  (default localhost)
#   RDZV_PORT   a free port on that node           (default 29500)
#   JOB_ID      the same id on every node          (default phoenix)
# Usage: examples/torchrun_multinode.sh CONFIG.yaml [dotted.key=value ...]
# Checkpoints are written by all ranks into output_dir: it must be on a filesystem
# shared by all nodes (NFS/Lustre/GPFS).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [key=value ...]}; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron TP comm overlap
exec torchrun \
    --nnodes "${NNODES:-1}" --nproc_per_node "${GPUS:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "${RDZV_HOST:-localhost}:${RDZV_PORT:-29500}" \
    --rdzv_id "${JOB_ID:-phoenix}" \
    -m phoenix.train "$CONFIG" "$@"
