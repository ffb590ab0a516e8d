#!/bin/bash
# What each node of a Slurm job runs (train.sbatch starts it once per node with srun): afinar train, whose torchrun
# joins the other nodes through a c10d rendezvous on the job's first node. Reads Slurm's variables:
#   SLURM_JOB_NUM_NODES  nodes in the job          SLURM_NODEID     this node's rank
#   SLURM_JOB_NODELIST   the nodes (first: host)   SLURM_JOB_ID     the rendezvous id, the same on every node
#   SLURM_GPUS_ON_NODE   processes on this node (default 1: one CPU process)
# AFINAR_RDZV_PORT picks the rendezvous port on the first node (default 29500).
# Arguments are afinar train's: a config and any --set overrides.
set -euo pipefail
if command -v scontrol >/dev/null 2>&1; then
  head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
else  # outside a cluster (a local check): a plain comma-separated list
  head_node="${SLURM_JOB_NODELIST%%,*}"
fi
exec afinar train "$@" \
  --nnodes "$SLURM_JOB_NUM_NODES" --node-rank "$SLURM_NODEID" \
  --rdzv-endpoint "$head_node:${AFINAR_RDZV_PORT:-29500}" --rdzv-id "$SLURM_JOB_ID" \
  --nproc "${SLURM_GPUS_ON_NODE:-1}"
