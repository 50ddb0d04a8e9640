"""Do two source trees train the same? Per-step losses of `kdpipe distill` from each, compared exactly.

Runs the tests' tiny fixture (tests/_distill.py: resnet8 teacher and student, 128 16x16 images, a
2-view float16 cache) for at+kd, afd+kd and dct, 2 epochs x 4 steps, once per tree in a fresh process
(the tree's kdpipe ahead of an editable install), and prints whether the step records are identical.

Usage: ``python bench/distill_identical.py BEFORE_TREE AFTER_TREE`` (each tree with its
``kdpipe/_native*.so``, as for bench/distill_ab.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

_SHIM = """
import json, os, sys, tempfile
tree = sys.argv[1]
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:0] = [tree, tree + "/tests"]
os.environ["KDPIPE_LOG_STEPS"] = "1"
from pathlib import Path
import _distill as d
out = Path(tempfile.mkdtemp())
for method in ("at+kd", "afd+kd", "dct"):
    o = out / method.replace("+", "_")
    args = d.distill_args(o, "--method", method, "--no-export", cache_path=d.cached(2, "float16"), epochs=2)
    d.run_ok(args)
    recs = [{k: v for k, v in r.items() if k != "seconds"} for r in d.read_jsonl(o / "steps.jsonl")]
    print(json.dumps({"method": method, "steps": recs}))
"""


def steps_of(tree: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", _SHIM, tree], check=True, capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    before, after = steps_of(sys.argv[1]), steps_of(sys.argv[2])
    for a, b in zip(before, after, strict=True):
        same = a["steps"] == b["steps"]
        print(f"{a['method']:<8} {len(a['steps'])} steps: {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
