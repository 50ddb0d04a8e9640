"""Hinton knowledge distillation on cached teacher logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.losses.common import as_float


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """``T**2 / B * sum_b sum_k p_T log(p_T / p_S)`` with ``p = softmax(z / T)``.

    student_logits, teacher_logits (B,K) -> scalar. The teacher side carries no gradient.
    """
    s = F.log_softmax(as_float(student_logits) / T, dim=1)
    t = F.log_softmax(as_float(teacher_logits).detach().to(s.dtype) / T, dim=1)
    return F.kl_div(s, t, reduction="sum", log_target=True) * (T * T) / s.shape[0]
