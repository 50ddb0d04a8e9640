"""Helpers shared by the bench/ scripts (not a benchmark itself)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from pathlib import Path
from types import ModuleType


def sibling(name: str) -> ModuleType:
    """Load bench/``name``.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def export_zoo(name: str, path: Path, num_classes: int, side: int, in_chans: int = 3) -> None:
    """kdpipe's zoo model ``name`` with random weights (BN statistics spread, so activations are not
    trivial) as a self-contained ONNX file: legacy exporter, opset 17, dynamic batch, input ``image``
    (B, in_chans, side, side), output ``logits``."""
    import onnx
    import torch

    from kdpipe.student import create_model

    torch.manual_seed(0)
    m = create_model(name, num_classes=num_classes, in_chans=in_chans).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_var.uniform_(0.5, 1.5)
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m, (torch.zeros(2, in_chans, side, side),), str(path), dynamo=False, input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )  # fmt: skip
    onnx.checker.check_model(str(path))
