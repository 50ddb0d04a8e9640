"""The trained student as one self-contained ONNX file, checked against torch with onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn


def export_student(
    model: nn.Module, in_chans: int, size: int, path: Path, preprocess: dict[str, Any]
) -> float:
    """Export to ONNX (dynamic batch, one self-contained file carrying its preprocessing as metadata
    ``kdpipe.preprocess``) and return max |onnxruntime - torch| on a random batch."""
    import contextlib
    import io
    import logging
    import warnings

    import onnx
    import onnxruntime as ort

    model = model.eval().cpu().float()
    x = torch.randn(2, in_chans, size, size)
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(
                model,
                (x,),
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                dynamo=True,
                verbose=False,
            )
            proto = prog.model_proto  # type: ignore[union-attr]
        except Exception:  # the dynamo exporter cannot take every user model: the legacy one can
            buf = io.BytesIO()
            torch.onnx.export(
                model,
                (x,),
                buf,  # type: ignore[arg-type]
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
            proto = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, {"kdpipe.preprocess": json.dumps(preprocess)})
    onnx.save_model(proto, str(path), save_as_external_data=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xb = torch.randn(3, in_chans, size, size)
    got = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0]
    with torch.no_grad():
        want = model(xb).numpy()
    return float(np.abs(got - want).max())
