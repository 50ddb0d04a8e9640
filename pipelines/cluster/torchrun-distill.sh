#!/usr/bin/env bash
# Train a student with DDP on one node (torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; kdpipe reads them).
# gloo on CPU, nccl on GPUs; the effective batch is --batch-size x processes.
set -euo pipefail
torchrun --standalone --nproc_per_node "${NPROC:-2}" -m kdpipe distill \
    --cache "${CACHE:?}" --data "${DATA:?}" --val-data "${VAL_DATA:-}" \
    --student "${STUDENT:-resnet20}" --method "${METHOD:-at+kd}" --epochs "${EPOCHS:-200}" \
    --out "${OUT:?}" --no-progress
