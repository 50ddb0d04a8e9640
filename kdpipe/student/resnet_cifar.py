"""CIFAR ResNets (He et al. 2016, depth 6n+2) and RepDistiller's wide variants resnet8x4 / resnet32x4.

Post-activation BasicBlocks. Shortcut on a shape change: option "B" (1x1 conv + BN, the default, as in
RepDistiller whose CIFAR-100 benchmarks kdpipe compares against) or option "A" (parameter-free:
stride-2 subsampling and zero-padded channels, He et al.'s CIFAR choice).
Stem 3x3 conv (16 channels; 32 for the x4 models), stages 16/32/64 (x4: 64/128/256), global average
pool, linear. ``kd_taps`` = the post-ReLU outputs of the three stages (``layer1..layer3``). Every
block's pre-activation sum (before its last ReLU) is the output of its ``preact`` module (an
``nn.Identity``, no parameters): ``--student-taps layer1.0.preact,...`` taps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import KdpipeError
from kdpipe.student.registry import register_model


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad the extra channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU. Output: post-ReLU (B, planes, H/stride, W/stride);
    ``preact`` outputs the sum before that ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = ShortcutA(in_planes, planes, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )
        self.preact = nn.Identity()  # a tap point: the residual sum before the block's last ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.preact(out + identity))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; any input size (adaptive average pool)."""

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int] = (16, 16, 32, 64),
        num_classes: int = 10,
        in_chans: int = 3,
        shortcut: str = "B",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise KdpipeError(f"CIFAR ResNet depth must be 6n+2 >= 8 (8, 14, 20, 32, 56, 110), got {depth}")
        if shortcut not in ("A", "B"):
            raise KdpipeError(f"CIFAR ResNet shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_planes = widths[0]
        for i, planes in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_planes, num_classes)
        self.kd_taps = ["layer1", "layer2", "layer3"]
        self.kd_blocks = [f"layer{i + 1}.{j}" for i in range(3) for j in range(n)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _make(depth: int, widths: tuple[int, int, int, int]):  # type: ignore[no-untyped-def]
    def factory(num_classes: int = 10, in_chans: int = 3, shortcut: str = "B") -> CifarResNet:
        return CifarResNet(depth, widths, num_classes, in_chans, shortcut)

    return factory


for _d in (8, 14, 20, 32, 56, 110):
    register_model(f"resnet{_d}")(_make(_d, (16, 16, 32, 64)))
register_model("resnet8x4")(_make(8, (32, 64, 128, 256)))
register_model("resnet32x4")(_make(32, (32, 64, 128, 256)))
