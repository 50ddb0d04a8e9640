"""Train a demo teacher on a built-in dataset and export it to ONNX (pipelines/demo/teacher-DATA.onnx).

This stands in for "a teacher trained in some framework": kdpipe only ever sees the ONNX file and its
card (teacher-DATA.yaml: the preprocessing). Commands that made the committed files (2 CPU cores):

    python pipelines/demo/train_teacher.py --data animals --model resnet20 --epochs 20 --out pipelines/demo
    python pipelines/demo/train_teacher.py --data digits --model resnet20 --epochs 30 --out pipelines/demo

The transformer teacher (issue 15; docs/results.md):

    python pipelines/demo/train_teacher.py --data animals --model vit_tiny --model-arg patch_size=4 \
        --model-arg img_size=28 --model-arg dim=64 --model-arg depth=6 --model-arg heads=4 \
        --optimizer adamw --lr 1e-3 --weight-decay 0.05 --epochs 20 --name teacher-vit-animals --out /tmp/vit
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.data import load_dataset
from kdpipe.data.preprocess import Normalize
from kdpipe.data.views import ViewPolicy, apply_views, draw_view_params
from kdpipe.student import create_model

SCALE, MEAN, STD = 1 / 255, (0.5,), (0.5,)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="animals")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="pipelines/demo")
    ap.add_argument("--name", default=None, help="file stem (default teacher-DATA)")
    ap.add_argument("--model-arg", action="append", default=[], help="KEY=VALUE for the zoo factory")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    args = ap.parse_args()
    kwargs = {k: _number(v) for k, _, v in (a.partition("=") for a in args.model_arg)}
    name = args.name or f"teacher-{args.data}"
    torch.manual_seed(args.seed)
    train, val = load_dataset(args.data), load_dataset(f"{args.data}:val")
    side = int(train.sizes()[0][0])
    norm = Normalize(scale=SCALE, mean=MEAN, std=STD, channels=1)
    # digits are not mirror-symmetric: no flips there
    policy = ViewPolicy(kind="pad-crop", size=side, pad=2, flip=args.data != "digits")
    plain = ViewPolicy(kind="none", size=side, flip=False)
    model = create_model(args.model, num_classes=train.num_classes, in_chans=1, **kwargs)
    if args.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.lr, weight_decay=args.weight_decay
        )
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                              weight_decay=args.weight_decay)  # fmt: skip
    n, bs = len(train), args.batch_size
    steps = args.epochs * (n // bs)
    step = 0
    xs_val = torch.from_numpy(
        norm(
            apply_views(
                val.load(np.arange(len(val))),
                draw_view_params(plain, 0, np.arange(len(val)), np.full(len(val), -1), val.sizes()),
                plain,
            )
        )
    )
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        order = np.random.default_rng([args.seed, epoch]).permutation(n)
        for b in range(n // bs):
            idx = order[b * bs : (b + 1) * bs]
            params = draw_view_params(policy, 1000 + epoch, idx, np.zeros_like(idx), train.sizes()[idx])
            x = torch.from_numpy(norm(apply_views(train.load(idx), params, policy)))
            y = torch.from_numpy(train.labels[idx])
            for g in opt.param_groups:
                g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        with torch.no_grad():
            acc = (model(xs_val).argmax(1).numpy() == val.labels).mean() * 100
        dt = time.perf_counter() - t0
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} val top-1 {acc:.2f}% ({dt:.0f} s)")
    out = Path(args.out)
    path = out / f"{name}.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(2, 1, side, side),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    card = f"input_size: {side}\nscale: 1/255\nmean: [{MEAN[0]}]\nstd: [{STD[0]}]\n"
    (out / f"{name}.yaml").write_text(card)
    (out / f"{name}.json").write_text(
        json.dumps(
            {
                "data": args.data,
                "model": args.model,
                "model_args": kwargs,
                "optimizer": args.optimizer,
                "lr": args.lr,
                "weight_decay": args.weight_decay,
                "epochs": args.epochs,
                "seed": args.seed,
                "val_top1_torch": float(acc),
                "command": " ".join(["python", *sys.argv]),
            },
            indent=2,
        )
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), val top-1 {acc:.2f}%")


def _number(text: str) -> int | float | str:
    """ "4" -> 4, "0.5" -> 0.5, anything else as given."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    main()
