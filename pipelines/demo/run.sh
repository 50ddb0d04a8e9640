#!/usr/bin/env bash
# The demo (`make demo`): the pipeline pipelines/demo.yaml. Caches the committed animals teacher once,
# trains a small student without and with distillation from the cache, evaluates all three and prints a
# table. A few minutes on 2 CPU cores; run it again and every finished step is skipped.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${KDPIPE_DEMO_OUT:-out/demo}"
epochs="${KDPIPE_DEMO_EPOCHS:-6}"

kdpipe doctor
kdpipe inspect "$here/teacher-animals.onnx"
kdpipe run "$here/../demo.yaml" --set workdir="$out" --set distill.epochs="$epochs"
