"""The optimiser, the learning-rate schedule and mixed precision of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from kdpipe.errors import KdpipeError
from kdpipe.train.config import DistillConfig


def lr_at(cfg: DistillConfig, epoch_float: float) -> float:
    """Learning rate at a fractional epoch: linear warm-up, then multistep or cosine."""
    if cfg.warmup_epochs > 0 and epoch_float < cfg.warmup_epochs:
        return cfg.lr * (epoch_float + 1e-8) / cfg.warmup_epochs
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(epoch_float >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
        t = min(max(epoch_float - cfg.warmup_epochs, 0.0) / span, 1.0)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "constant":
        return cfg.lr
    raise KdpipeError(f"--schedule {cfg.schedule!r}: choose multistep, cosine or constant")


def make_optimizer(cfg: DistillConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW; weight decay on weights only, not on biases and norms."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases and norm weights
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise KdpipeError(f"--optimizer {cfg.optimizer!r}: choose sgd or adamw")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


@dataclass
class Precision:
    """``--amp``: the autocast dtype (None = float32) and the gradient scaler (enabled for fp16)."""

    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @classmethod
    def of(cls, amp: str, device: torch.device) -> Precision:
        choices: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if amp not in choices:
            raise KdpipeError(f"--amp {amp!r}: choose none, bf16 or fp16")
        return cls(choices[amp], torch.amp.GradScaler(device.type, enabled=amp == "fp16"))

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)
