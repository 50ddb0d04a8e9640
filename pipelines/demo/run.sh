#!/usr/bin/env bash
# The demo (`make demo`): cache the committed animals teacher once, train a small student without and
# with distillation from the cache, and print a table. A few minutes on 2 CPU cores.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${KDPIPE_DEMO_OUT:-out/demo}"
epochs="${KDPIPE_DEMO_EPOCHS:-6}"
teacher="$here/teacher-animals.onnx"
card="$here/teacher-animals.yaml"
mkdir -p "$out"

kdpipe doctor
kdpipe inspect "$teacher"
kdpipe cache-teacher "$teacher" --card "$card" --data animals --views 4 --pad 2 --out "$out/cache"
kdpipe cache verify "$out/cache"
common=(--cache "$out/cache" --data animals --val-data animals:val --student resnet8 --epochs "$epochs"
        --batch-size 128 --lr 0.05 --seed 0)
[ -f "$out/plain/summary.json" ] || kdpipe distill "${common[@]}" --method ce --out "$out/plain" --no-progress
[ -f "$out/at_kd/summary.json" ] || kdpipe distill "${common[@]}" --method at+kd --out "$out/at_kd" --no-progress
kdpipe evaluate "$teacher" --card "$card" --data animals:val > "$out/teacher_eval.json"
python "$here/table.py" "$out"
