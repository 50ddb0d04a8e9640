"""Print the demo's table: teacher, student without distillation, student distilled from the cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    teacher = json.loads((out / "teacher_eval.json").read_text())
    rows = [("teacher (ONNX, onnxruntime)", teacher["top1"], None)]
    for name, label in (
        ("plain", "student resnet8, no distillation"),
        ("at_kd", "student resnet8, AT+KD cache"),
    ):
        s = json.loads((out / name / "summary.json").read_text())
        rows.append((label, s["last_top1"], s["seconds_per_epoch"]))
    print(f"\n{'model':<36} {'val top-1 %':>11} {'s/epoch':>8}")
    for label, top1, spe in rows:
        print(f"{label:<36} {top1:>11.2f} {'' if spe is None else f'{spe:8.1f}'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo"))
