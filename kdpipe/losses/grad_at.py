"""Gradient-based attention transfer (Zagoruyko & Komodakis 2017, paper only; kdpipe's reading).

The student's input gradient ``J_S = d(sum_b CE(student(x_b), y_b))/du`` (u: the image in [0, 1],
kdpipe.gradient) is computed with ``create_graph=True``, so that the loss on it is trained by double
back-propagation; the teacher's ``J_T`` comes from the cache (or the online replica) and is constant.

    grad-at = (1/B) sum_b ||R(J_S[b]) - J_T[b]||_2^2      R: the cache's --grad-form (linear)
    flip    = (1/B) sum_b ||J_S(x)[b] - flip_w(J_S(flip_w x))[b]||_2^2     (student only)

Both are weighted beta/2 in the total (docs/methods.md explains the choice of beta and of the squared
norm summed over the input's elements).
"""

from __future__ import annotations

from typing import Any

import torch

from kdpipe.gradient import GradForm, input_gradient, to_image_space


def grad_at_loss(student_grad: torch.Tensor, teacher_grad: torch.Tensor, form: GradForm) -> torch.Tensor:
    """``mean_b sum (R(J_S) - J_T)**2``: student_grad (B,C,H,W) full J_S (with its graph),
    teacher_grad (B,C',H',W') as stored in ``form`` (used as a constant)."""
    js = form.reduce(student_grad)
    jt = teacher_grad.reshape(js.shape).to(js.dtype).detach()
    return (js - jt).pow(2).flatten(1).sum(1).mean()


def flip_loss(student_grad: torch.Tensor, flipped_back: torch.Tensor) -> torch.Tensor:
    """``mean_b sum (J_S(x) - flip(J_S(flip x)))**2``, both (B,C,H,W); ``flipped_back`` is already
    flipped back to the orientation of x."""
    return (student_grad - flipped_back).pow(2).flatten(1).sum(1).mean()


def student_grads(
    student: Any, x: torch.Tensor, y: torch.Tensor, normalize: Any, flip: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logits, J_S, flip(J_S(flip x)) or None) of the student at its normalised input ``x``
    (B,C,H,W) with labels ``y``; ``normalize`` is the student's input Normalize (RGB, NCHW).

    The flipped pass runs first, so that the tap hooks keep the features of the unflipped batch.
    Both gradients keep their graphs (double back-propagation)."""
    flipped = None
    if flip:
        dxf, _ = input_gradient(student, x.flip(3), y, create_graph=True)
        flipped = to_image_space(dxf, normalize).flip(3)
    dx, logits = input_gradient(student, x, y, create_graph=True)
    return logits, to_image_space(dx, normalize), flipped
