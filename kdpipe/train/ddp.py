"""Several processes (torchrun): the process group, the device, BatchNorm over the global batch, and
the mean of the logged losses over ranks.

A step of N processes with a per-process batch B must be the step of one process with batch N x B, so
that a run may resume on another number of processes and continue the same loss curve (to float
rounding). DDP already averages the gradients; two things differ otherwise and are made global here:
BatchNorm statistics (each rank would normalise by its own B samples) and the logged losses (rank 0's
own batch). torch's SyncBatchNorm refuses CPU tensors, so :class:`GlobalBatchNorm` does the same on
any device with autograd-aware all-reduces.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from kdpipe.distributed import WorldInfo, discover_world
from kdpipe.errors import KdpipeError


def start_world(device: str) -> WorldInfo:
    """This process's place in a torchrun job; joins the process group (gloo on CPU, nccl on GPUs)."""
    world = discover_world()
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
    return world


def pick_device(name: str, world: WorldInfo) -> torch.device:
    """``auto``: this rank's GPU when there is one, else the CPU."""
    if name == "auto" and world.distributed and torch.cuda.is_available():
        name = f"cuda:{world.local_rank}"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdpipeError(f"--device {name}: no CUDA device is visible to torch here; use --device cpu")
    return torch.device(name)


def _global_sum(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)  # the backward all-reduces the gradient: each rank gets its inputs' share


class _GlobalBN:
    """Mixin: training-mode statistics over every rank's samples (two passes: mean, then variance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: Any = self
        if not (bn.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)  # type: ignore[misc]
        bn._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        s = _global_sum(torch.cat([x.sum(dims), n.reshape(1)]))
        count = s[-1]
        mean = s[:-1] / count
        var = _global_sum(((x - mean.reshape(shape)) ** 2).sum(dims)) / count
        if bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked += 1
                m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                bn.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp_min(1), alpha=m)
        y = (x - mean.reshape(shape)) * torch.rsqrt(var + bn.eps).reshape(shape)
        if bn.affine:
            y = y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
        return y


class GlobalBatchNorm1d(_GlobalBN, nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span all ranks (plain BatchNorm1d with one process)."""


class GlobalBatchNorm2d(_GlobalBN, nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all ranks (plain BatchNorm2d with one process)."""


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` by its global twin (same parameters and buffers)."""
    for name, child in module.named_children():
        twins: dict[type, type[nn.modules.batchnorm._BatchNorm]] = {
            nn.BatchNorm1d: GlobalBatchNorm1d,
            nn.BatchNorm2d: GlobalBatchNorm2d,
        }
        kind = twins.get(type(child))
        if kind is not None:
            bn: Any = child
            twin = kind(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            twin.load_state_dict(bn.state_dict())
            setattr(module, name, twin.to(next(iter(bn.state_dict().values())).device))
        else:
            global_batchnorm(child)
    return module


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over all ranks (the same dict back with one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor([values[k] for k in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(values, t.tolist(), strict=True)}


def barrier(world: WorldInfo) -> None:
    if world.distributed:
        dist.barrier()


def stop_world(world: WorldInfo) -> None:
    if world.distributed:
        dist.barrier()
        dist.destroy_process_group()
