"""Cross-entropy with the labels (optionally label-smoothed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.losses.common import as_float


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over the batch of ``-sum_k q_k log softmax(z)_k`` with ``q = (1-e) onehot + e/K``.

    logits (B,K) float, labels (B,) int64 -> scalar.
    """
    return F.cross_entropy(as_float(logits), labels, label_smoothing=label_smoothing)
