"""A tiny ViT teacher for the transformer tests, exported by both torch exporters, with references.

``TinyViT``: 32x32 RGB input, a 4x4 patch-embedding Conv (an 8x8 grid of 64 patch tokens), a class
token (and, with ``extra=2``, a DeiT-style distillation token after it), learned position embeddings,
6 pre-norm blocks ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))`` with explicit softmax attention (the
zoo ViT's ``Block``, MLP 2x), a final LayerNorm and a linear head on the class token. The module
paths ``blocks.{i}`` name the block outputs (the Add after each MLP), which is what ``--taps auto``
must pick. Models and exports are memoised per process.
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
import torch
import torch.nn as nn

from kdpipe.student.vit import Block  # pre-norm block with an nn.Softmax module (hooked below)

SIZE, PATCH, DIM, HEADS, DEPTH, CLASSES = 32, 4, 32, 2, 6, 5
GRID = SIZE // PATCH


class HybridStem(nn.Module):
    """A conv stem with one residual block at 32x32 (NCHW), for a hybrid (conv + transformer) ViT."""

    WIDTH = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.WIDTH, 3, 1, 1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(self.WIDTH, self.WIDTH, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x + self.body(x)


class TinyViT(nn.Module):
    """See the module docstring. ``extra``: leading extra tokens (0: none, mean-pooled head; 1: class;
    2: class + distillation); ``registers``: register tokens inserted after the class token once the
    position embedding is added (DINOv2's ``cat(x[:, :1], reg, x[:, 1:])``); ``patchify``: "conv" (a
    4x4 stride-4 Conv), "reshape" (Reshape/Transpose into (B, 8, 8, 4, 4, 3), then a Linear) or
    "hybrid" (a residual conv stem at 32x32, then the 4x4 Conv)."""

    def __init__(self, extra: int = 1, registers: int = 0, patchify: str = "conv") -> None:
        super().__init__()
        self.extra, self.patchify = extra, patchify
        self.stem = HybridStem() if patchify == "hybrid" else None
        cin = HybridStem.WIDTH if patchify == "hybrid" else 3
        self.patch = (
            nn.Conv2d(cin, DIM, PATCH, PATCH) if patchify != "reshape" else nn.Linear(3 * PATCH**2, DIM)
        )
        self.tokens = nn.Parameter(torch.randn(1, extra, DIM) * 0.5) if extra else None
        self.reg = nn.Parameter(torch.randn(1, registers, DIM) * 0.5) if registers else None
        self.pos = nn.Parameter(torch.randn(1, extra + GRID * GRID, DIM) * 0.2)
        self.blocks = nn.Sequential(*[Block(DIM, HEADS, mlp_ratio=2.0) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) -> patch tokens (B, 64, DIM), row-major over the 8x8 grid."""
        if self.stem is not None:
            x = self.stem(x)
        if self.patchify != "reshape":
            return self.patch(x).flatten(2).transpose(1, 2)
        b = x.shape[0]
        x = x.reshape(b, 3, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 3, 5, 1)
        return self.patch(x.reshape(b, GRID * GRID, PATCH * PATCH * 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if self.tokens is not None:
            x = torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        if self.reg is not None:
            x = torch.cat([x[:, :1], self.reg.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0] if self.tokens is not None else x.mean(1))


@cache
def model(extra: int = 1, registers: int = 0, patchify: str = "conv") -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(extra, registers, patchify).eval()


_DIR = tempfile.mkdtemp(prefix="kdpipe-vit-models-")
atexit.register(shutil.rmtree, _DIR, True)


@cache
def export(exporter: str, extra: int = 1, registers: int = 0, patchify: str = "conv") -> str:
    """ONNX file of ``model(...)`` from the ``dynamo`` or ``legacy`` (opset 17) exporter, dynamic batch."""
    m = model(extra, registers, patchify)
    x = torch.zeros(2, 3, SIZE, SIZE)
    path = os.path.join(_DIR, f"vit{extra}-{registers}-{patchify}-{exporter}.onnx")
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        names = {"input_names": ["image"], "output_names": ["logits"]}
        if exporter == "dynamo":
            batch = ({0: torch.export.Dim("batch", min=1)},)
            torch.onnx.export(m, (x,), path, dynamo=True, dynamic_shapes=batch, external_data=False, **names)
        else:
            axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
            torch.onnx.export(m, (x,), path, dynamo=False, dynamic_axes=axes, opset_version=17, **names)
    return path


def images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 32, 32, 3) random images."""
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def tokens_and_softmax(
    x: np.ndarray, extra: int = 1, registers: int = 0, patchify: str = "conv"
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Logits, the block outputs (B, T, DIM) and each block's softmax (B, heads, T, T) of float32 NCHW x."""
    m = model(extra, registers, patchify)
    outs: list[torch.Tensor] = []
    atts: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o)) for b in m.blocks]
    hooks += [b.attn.softmax.register_forward_hook(lambda _m, _i, o: atts.append(o)) for b in m.blocks]
    try:
        with torch.no_grad():
            logits = m(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    return logits.numpy(), [o.numpy() for o in outs], [a.numpy() for a in atts]


def reference_targets(tokens: np.ndarray, start: int, grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """float64 at (B,h,w) and pooled (B,C) of one block output (B,T,C) whose patch tokens begin at
    ``start``, from the issue's definitions: at = l2n(mean_c(patch tokens**2)) on the (h, w) grid,
    pooled = the mean over the patch tokens."""
    p = tokens.astype(np.float64)[:, start : start + grid[0] * grid[1], :]
    a = (p**2).mean(axis=2)
    at = a / np.maximum(np.sqrt((a**2).sum(axis=1, keepdims=True)), 1e-12)
    return {"at": at.reshape(len(p), *grid), "pooled": p.mean(axis=1)}


def reference_attn(softmax: np.ndarray, start: int, grid: tuple[int, int]) -> np.ndarray:
    """float64 (B,h,w): token 0's (the class token's) attention to the patch tokens, head mean."""
    a = softmax.astype(np.float64)[:, :, 0, start : start + grid[0] * grid[1]].mean(axis=1)
    return a.reshape(len(a), *grid)
