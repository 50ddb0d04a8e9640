"""Wide ResNets WRN-d-w (Zagoruyko & Komodakis 2016), pre-activation, as in the AT paper's code.

conv3x3(16) -> 3 groups of n = (d-4)/6 blocks with widths 16w/32w/64w (strides 1/2/2) -> BN-ReLU ->
global average pool -> linear. Block: o1 = ReLU(BN(x)); z = conv(ReLU(BN(conv(o1)))); output z + x, or
z + conv1x1(o1) when the shape changes (the projection reads the pre-activated o1, as the AT code does).
``kd_taps`` = the three groups' outputs: the raw residual sum of each group's last block, before the
final BN-ReLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import KdpipeError
from kdpipe.student.registry import register_model


class PreActBlock(nn.Module):
    """Pre-activation wide block; output is the raw residual sum (no activation after the add)."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = F.relu(self.bn1(x))
        y = F.relu(self.bn2(self.conv1(o1)))
        if self.dropout > 0:
            y = F.dropout(y, self.dropout, self.training)
        z = self.conv2(y)
        return z + (x if self.shortcut is None else self.shortcut(o1))


class WideResNet(nn.Module):
    """WRN-depth-width for small images; any input size."""

    def __init__(
        self, depth: int, width: float, num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise KdpipeError(f"WRN depth must be 6n+4 >= 10 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [int(16 * width), int(32 * width), int(64 * width)]
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        groups = []
        in_planes = 16
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        self.kd_taps = ["block1", "block2", "block3"]
        self.kd_blocks = [f"block{i + 1}.{j}" for i in range(3) for j in range(n)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model
def wrn(
    num_classes: int = 10, in_chans: int = 3, depth: int = 16, width: float = 1, dropout: float = 0.0
) -> WideResNet:
    """Generic WRN: ``create_model("wrn", 10, depth=28, width=10)``."""
    return WideResNet(depth, width, num_classes, in_chans, dropout)


def _make(depth: int, width: int):  # type: ignore[no-untyped-def]
    def factory(num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0) -> WideResNet:
        return WideResNet(depth, width, num_classes, in_chans, dropout)

    return factory


for _d, _w in ((16, 1), (16, 2), (16, 4), (40, 1), (40, 2)):
    register_model(f"wrn_{_d}_{_w}")(_make(_d, _w))
