"""How large is each AT term against CE? Per tap: the weighted loss and the size of its gradient.

For a student (fresh, or from a distill run's checkpoint) and a cache, on ``--batches`` training
batches of cached views: CE, and for every tap pair ``beta * mean_{b,hw} (at_S - at_T)**2`` (kdpipe's
``at`` term with the paper's beta = 1000), each with the L2 norm of its gradient with respect to the
student's parameters. Two maps of unit norm differ by at most 4 in squared L2 norm, so a tap's term
is at most ``4 beta / (h w)``: at beta = 1000 the coarsest tap gets the largest weight.

    python pipelines/evidence/at_terms.py out/evidence/animals/cache-k8 --data animals \\
        [--student resnet8] [--checkpoint RUN/checkpoints/last.pt] [--batches 8] [--out at_terms.json]
        [--student-taps layer1.0.preact,layer2.0.preact,layer3.0.preact]   # with a cache of preact taps
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BETA = 1000.0


def grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def main() -> None:
    from kdpipe import cache as kc
    from kdpipe.batches import BatchSource
    from kdpipe.data import load_dataset
    from kdpipe.data.preprocess import Normalize
    from kdpipe.data.views import ViewPolicy
    from kdpipe.losses.at import attention_map
    from kdpipe.student import StudentTaps, create_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("--data", required=True)
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--student-taps", default="auto", help="auto, or comma-separated module paths")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    cache = kc.open(a.cache)
    m = cache.manifest
    taps = len(m["taps"])
    norm = Normalize.from_dict(m["teacher"]["spec"]["normalize"])
    model = create_model(a.student, num_classes=int(m["teacher"]["num_classes"]), in_chans=norm.channels)
    if a.checkpoint:
        state = torch.load(a.checkpoint, weights_only=False)["module"]
        model.load_state_dict({k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")})
    model.train()
    hooks = StudentTaps(model, a.student_taps if a.student_taps == "auto" else a.student_taps.split(","))
    src = BatchSource(load_dataset(a.data), ViewPolicy.from_dict(m["views"]["policy"]),
                      norm, cache=cache,
                      target_names=tuple(f"at.{i}" for i in range(taps)))  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    for _ in range(a.batches):
        s = rng.choice(len(cache), a.batch_size, replace=False).astype(np.int64)
        batch = src[(s, rng.integers(0, cache.num_views, a.batch_size))]
        logits = model(batch["x"])
        ce = F.cross_entropy(logits, batch["y"])
        row = {"ce": float(ce.detach()), "ce_grad": grad_norm(ce, params)}
        for i, feat in enumerate(hooks.features):
            vt = batch["targets"][f"at.{i}"]
            size = (int(vt.shape[-2]), int(vt.shape[-1]))
            term = BETA * (attention_map(feat, size) - vt.reshape(len(vt), -1)).pow(2).mean()
            row[f"at.{i}"] = float(term.detach())
            row[f"at.{i}_grad"] = grad_norm(term, params)
            row[f"at.{i}_hw"] = size[0] * size[1]
        rows.append(row)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    print(f"student {a.student} ({'checkpoint ' + a.checkpoint if a.checkpoint else 'fresh'}), "
          f"{a.batches} batches of {a.batch_size}")  # fmt: skip
    print(f"{'term':<8} {'h x w':>6} {'weighted loss':>14} {'grad norm':>10} {'grad / CE grad':>15}")
    print(f"{'CE':<8} {'':>6} {mean['ce']:14.4f} {mean['ce_grad']:10.4f} {1.0:15.2f}")
    for i in range(taps):
        g = mean[f"at.{i}_grad"]
        print(f"{'at.' + str(i):<8} {int(mean[f'at.{i}_hw']):>6} {mean[f'at.{i}']:14.4f} {g:10.4f} "
              f"{g / mean['ce_grad']:15.2f}")  # fmt: skip
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "mean": mean, "batches": rows}, indent=1))


if __name__ == "__main__":
    main()
