"""Validation of the student on the plain (un-augmented) views of a dataset."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdpipe.batches import BatchSource


@torch.no_grad()
def evaluate(
    model: nn.Module, source: BatchSource, batch_size: int, device: torch.device, channels_last: bool = False
) -> dict[str, float]:
    """Top-1, top-5 (%) and mean CE loss on the plain views of ``source.dataset``."""
    model.eval()
    n = len(source.dataset)
    correct1 = correct5 = 0
    loss_sum = 0.0
    for start in range(0, n, batch_size):
        samples = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        batch = source[(samples, np.full_like(samples, -1))]
        x = batch["x"].to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["y"].to(device)
        logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
    model.train()
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n}
