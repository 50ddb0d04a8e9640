#!/usr/bin/env bash
# Train a student with DDP on one node (torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; kdpipe reads them).
# gloo on CPU, nccl on GPUs; the effective batch is --batch-size x processes. Run it again to resume.
set -euo pipefail
args=(--cache "${CACHE:?}" --data "${DATA:?}" --student "${STUDENT:-resnet20}" --method "${METHOD:-at+kd}"
      --epochs "${EPOCHS:-200}" --out "${OUT:?}" --no-progress --resume)
if [ -n "${VAL_DATA:-}" ]; then args+=(--val-data "$VAL_DATA"); fi
torchrun --standalone --nproc_per_node "${NPROC:-2}" -m kdpipe distill "${args[@]}"
