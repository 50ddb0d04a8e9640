"""The input-gradient target of gradient-based attention transfer, shared by the teacher and the student.

Definition (docs/methods.md): for a batch of views with true labels y,

    J = d( sum_b CE(net(x_b), y_b) ) / du          (per sample; sum, so J does not depend on B)

where ``u`` is the image in RGB, NCHW, scaled to [0, 1] (``pixel / 255``, after the grey<->RGB
conversion the model's channel count asks for) and ``x`` is the network's own input made from it:
``x = (255 * scale * u - mean) / std`` in the network's channel order and layout. So
``dCE/du = dCE/dx * 255 * scale / std`` per channel (channels reordered back to RGB, the layout
moved to NCHW). Teacher and student are compared in the same ``u`` space whatever their preprocessing.

Reduced forms (``--grad-form``), applied to J (C, H, W), all linear, so that the student's J is
reduced the same way and ``R(J_S) - R(J_T) = R(J_S - J_T)``:
- ``full``: J itself (C, H, W);
- ``csum``: the sum over channels (1, H, W);
- ``pool:K``: each channel area-averaged (adaptive average pooling) to (K, K);
- ``csum+pool:K``: both (1, K, K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.data.preprocess import Normalize
from kdpipe.errors import KdpipeError

FORMS_HELP = "full, csum, pool:K or csum+pool:K"


@dataclass(frozen=True)
class GradForm:
    """A parsed ``--grad-form``: ``csum`` (sum over channels) and ``pool`` (side K, 0 = none)."""

    csum: bool = False
    pool: int = 0

    @property
    def text(self) -> str:
        parts = (["csum"] if self.csum else []) + ([f"pool:{self.pool}"] if self.pool else [])
        return "+".join(parts) or "full"

    def shape(self, chw: tuple[int, int, int]) -> tuple[int, int, int]:
        """The stored (C', H', W') of a J of shape ``chw``."""
        c, h, w = chw
        return (1 if self.csum else c, self.pool or h, self.pool or w)

    def reduce(self, j: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C', H', W'), differentiable (the student's J goes through it too)."""
        if self.csum:
            j = j.sum(dim=1, keepdim=True)
        if self.pool and tuple(j.shape[-2:]) != (self.pool, self.pool):
            j = F.adaptive_avg_pool2d(j, (self.pool, self.pool))
        return j


def parse_form(text: str, size: tuple[int, int] | None = None) -> GradForm:
    """``--grad-form`` text -> GradForm; KdpipeError names the part that is wrong. ``size``: the
    teacher input (height, width) in px, to refuse a pool larger than either side."""
    csum, pool = False, 0
    for part in [p.strip() for p in text.lower().split("+") if p.strip()] or [""]:
        kind, _, k = part.partition(":")
        if part == "full" and text.strip().lower() == "full":
            continue
        if part == "csum" and not csum:
            csum = True
        elif kind == "pool" and k.isdigit() and int(k) >= 1 and not pool:
            pool = int(k)
        else:
            raise KdpipeError(f"--grad-form {text!r}: {part!r} is not understood; use {FORMS_HELP}")
    if pool and size is not None and pool > min(size):
        raise KdpipeError(
            f"--grad-form {text!r}: pool:{pool} is larger than the {size[0]}x{size[1]} px input; "
            f"use pool:{min(size)} or less"
        )
    return GradForm(csum, pool)


def input_scale(normalize: Normalize) -> np.ndarray:
    """(C,) float64 ``dx/du = 255 * scale / std`` per model-input channel."""
    std = np.broadcast_to(np.asarray(normalize.std, np.float64), (normalize.channels,))
    return 255.0 * float(normalize.scale) / std


def to_image_space(dx: torch.Tensor, normalize: Normalize) -> torch.Tensor:
    """dCE/dx in the model's layout and channel order -> dCE/du (B, C, H, W) in RGB order."""
    if normalize.layout == "NHWC":
        dx = dx.permute(0, 3, 1, 2)
    factor = torch.as_tensor(input_scale(normalize), dtype=dx.dtype, device=dx.device)
    du = dx * factor.reshape(1, -1, 1, 1)
    if normalize.channel_order == "bgr" and du.shape[1] == 3:
        du = du.flip(1)
    return du


def input_gradient(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dCE_sum/dx, logits) of the function ``logits_of`` at ``x`` (a tensor that will get
    ``requires_grad``); ``create_graph`` keeps the graph for double back-propagation."""
    with torch.enable_grad():  # also under an outer no_grad (evaluation code, finite differences)
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        logits = logits_of(x)
        z = logits.float() if logits.dtype != torch.float64 else logits
        ce = F.cross_entropy(z, labels, reduction="sum")
        (dx,) = torch.autograd.grad(ce, x, create_graph=create_graph)
    return dx, logits
