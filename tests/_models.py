"""Tiny torch teachers exported to ONNX for the teacher tests, with forward-hook references.

Each model has a list ``STAGES`` of the module paths whose outputs are its stage outputs (what
``--taps auto`` must pick), with the channel axis of each output. Models and exports are memoised per
process so several test files share them.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import tempfile
import warnings
from functools import cache

import numpy as np
import scipy.fft
import torch
import torch.nn as nn

SIZE = 8


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


class BasicBlock(nn.Module):
    """Post-activation ResNet block; one ReLU module used twice, as in torchvision."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(out + idt)


class TinyResNet(nn.Module):
    """Stem at 8x8, layer1 (2 blocks, 8x8), layer2 (4x4), layer3 (2x2); flatten by reshape."""

    STAGES = (("layer1", 1), ("layer2", 1), ("layer3", 1))

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(4, 4, 1), BasicBlock(4, 4, 1))
        self.layer2 = nn.Sequential(BasicBlock(4, 6, 2))
        self.layer3 = nn.Sequential(BasicBlock(6, 8, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.fc(x.reshape(x.shape[0], -1))


class PreActBlock(nn.Module):
    """WRN block (Zagoruyko & Komodakis): BN-ReLU first; returns the raw residual sum."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return (x if self.shortcut is None else self.shortcut(o)) + y


class TinyWRN(nn.Module):
    """Pre-activation WRN: conv stem, block1 (8x8, 2 blocks), block2 (4x4), block3 (2x2), BN-ReLU head."""

    STAGES = (("block1", 1), ("block2", 1), ("block3", 1))

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.block1 = nn.Sequential(PreActBlock(4, 6, 1), PreActBlock(6, 6, 1))
        self.block2 = nn.Sequential(PreActBlock(6, 8, 2), PreActBlock(8, 8, 1))
        self.block3 = nn.Sequential(PreActBlock(8, 8, 2))
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(x.mean((2, 3)))


class MlpBlock(nn.Module):
    """A residual block on NHWC features: x + Linear(ReLU(Linear(x))) over the channel axis."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, 2 * c)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class TinyNHWC(nn.Module):
    """NHWC input, permuted to NCHW for a conv stage (8x8), then back to NHWC for two MLP blocks (4x4)."""

    STAGES = (("res", 1), ("mlp.1", 3))

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 1, 1)
        self.act = nn.ReLU()
        self.res = BasicBlock(4, 4, 1)
        self.down = nn.Conv2d(4, 6, 3, 2, 1)
        self.mlp = nn.Sequential(MlpBlock(6), MlpBlock(6))
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res(self.act(self.stem(x.permute(0, 3, 1, 2))))
        x = self.mlp(self.down(x).permute(0, 2, 3, 1))
        return self.fc(x.mean((1, 2)))


MODELS = {"resnet": TinyResNet, "wrn": TinyWRN, "nhwc": TinyNHWC}


@cache
def model(name: str) -> nn.Module:
    """The torch model ``name`` with fixed random weights (eval mode)."""
    torch.manual_seed(0)
    m = MODELS[name]()
    _randomise_bn(m)
    return m.eval()


def input_shape(name: str, batch: int) -> tuple[int, int, int, int]:
    return (batch, SIZE, SIZE, 3) if name == "nhwc" else (batch, 3, SIZE, SIZE)


def sample_input(name: str, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(input_shape(name, batch)).astype(np.float32)


_DIR = tempfile.mkdtemp(prefix="kdpipe-teacher-models-")
atexit.register(shutil.rmtree, _DIR, True)


@cache
def export(name: str, exporter: str, dynamic: bool) -> str:
    """Export ``model(name)`` with the ``dynamo`` or ``legacy`` exporter; a dynamic or fixed (1) batch."""
    m = model(name)
    x = torch.from_numpy(sample_input(name, 1 if not dynamic else 2))
    path = os.path.join(_DIR, f"{name}-{exporter}-{'dyn' if dynamic else 'b1'}.onnx")
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
            torch.onnx.export(
                m,
                (x,),
                path,
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=["image"],
                output_names=["logits"],
                verbose=False,
            )
        else:
            axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
            torch.onnx.export(
                m,
                (x,),
                path,
                dynamo=False,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=17,
            )
    return path


def hooked(name: str, x: np.ndarray, paths: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and the outputs of modules ``paths`` (last call of each) of the torch model, float64."""
    m = model(name)
    mods = dict(m.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = [
        mods[p].register_forward_hook(lambda _m, _i, o, p=p: got.__setitem__(p, o.detach().clone()))
        for p in paths
    ]
    try:
        with torch.no_grad():
            logits = m(torch.from_numpy(x))
    finally:
        for h in handles:
            h.remove()
    return logits.double().numpy(), [got[p].double().numpy() for p in paths]


DCT_VARIANTS = ("dft-abs", "dft", "dct2")


def reference_targets(f: np.ndarray, axis: int) -> dict[str, np.ndarray]:
    """float64 targets of one activation (channel axis ``axis``), written from the papers' formulas:
    at = l2n(mean_c(F**2)), pooled = mean_hw(F), and the three DCT variants (numpy.fft / scipy.fft)."""
    f = np.moveaxis(f.astype(np.float64), axis, 1)
    a = (f**2).mean(axis=1)
    n = np.sqrt((a**2).sum(axis=(1, 2), keepdims=True))
    out = {"at": a / np.maximum(n, 1e-12), "pooled": f.mean(axis=(2, 3))}
    a0 = a - a.mean(axis=(1, 2), keepdims=True)
    for v in DCT_VARIANTS:
        if v == "dct2":
            r = scipy.fft.dctn(a0, type=2, norm="ortho", axes=(1, 2))
        else:
            r = np.fft.fft2(a0).real
            r = np.abs(r) if v == "dft-abs" else r
        lo, hi = r.min(axis=(1, 2), keepdims=True), r.max(axis=(1, 2), keepdims=True)
        out[f"dct.{v}"] = (r - lo) / (hi if v == "dft-abs" else hi - lo)
    return out


def ops_model(
    path: str | os.PathLike[str],
    ops: list[tuple[str, list[str], str, dict]],
    inits: dict[str, np.ndarray],
    x_shape: list[str | int],
    logits_shape: list[str | int],
) -> str:
    """Save a hand-built ONNX graph (opset 17): float input "x" of ``x_shape`` -> ``ops``, each
    (op_type, inputs, output, attributes) -> float output "logits" of ``logits_shape``; ``inits`` are
    its constants, in their own dtypes. Returns the path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node(op, ins, [out], **kw) for op, ins, out, kw in ops]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits_shape)
    init = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, os.path.basename(os.fspath(path)), [x], [y], init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), os.fspath(path))
    return os.fspath(path)
