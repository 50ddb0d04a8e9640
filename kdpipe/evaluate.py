"""`kdpipe evaluate`: accuracy of an ONNX classifier (a teacher, or a student kdpipe exported)."""

from __future__ import annotations

from typing import Any

import numpy as np


def evaluate_onnx(model: str, data: str, batch_size: int = 256, card: str | None = None) -> dict[str, Any]:
    """Top-1 / top-5 (%) of ``model`` on the plain views of ``data`` through onnxruntime.

    Preprocessing comes from ``card``, else from the ``kdpipe.preprocess`` metadata that kdpipe writes
    into the students it exports, else from the teacher defaults (scale 1/255, mean 0, std 1).
    """
    from kdpipe.data import load_dataset
    from kdpipe.data.views import ViewPolicy, apply_views, draw_view_params
    from kdpipe.teacher import TeacherRunner, load_teacher, spec_for

    graph = load_teacher(model)
    spec = spec_for(graph, card=card)
    runner = TeacherRunner(
        graph,
        [],
        spec,
        targets={"logits"},
        provider="auto",
        threads=None,
        reduce="graph",
        dct_variants=(),
        spinning=True,
    )
    ds = load_dataset(data)
    policy = ViewPolicy(kind="none", size=spec.size[0], flip=False)
    n = len(ds)
    top1 = top5 = 0
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        params = draw_view_params(policy, 0, idx, np.full_like(idx, -1), ds.sizes()[idx])
        x = spec.preprocess(apply_views(ds.load(idx), params, policy))
        logits = runner.run(x)["logits"]
        y = ds.labels[idx]
        order = np.argsort(-logits, axis=1)[:, :5]
        top1 += int((order[:, 0] == y).sum())
        top5 += int((order == y[:, None]).any(axis=1).sum())
    return {
        "model": model,
        "data": data,
        "samples": n,
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "providers": runner.providers,
    }
