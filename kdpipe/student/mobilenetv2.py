"""MobileNetV2 (Sandler et al. 2018), CIFAR-style: stride-1 stem and stride-1 second stage (32x32 input
reaches 4x4 at the end), width multiplier ``width_mult`` (channels rounded to multiples of 8).

Stages (expansion t, channels c, blocks n, stride s): (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2)
(6,96,3,1) (6,160,3,2) (6,320,1,1), then a 1x1 conv head (1280, or 1280*width_mult when > 1), global
average pool, dropout, linear. ``kd_taps`` = the last inverted-residual output at each resolution
(``stage2``, ``stage3``, ``stage5``, ``stage7``: linear bottleneck outputs, as RepDistiller taps them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.student.registry import register_model

_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _round8(v: float) -> int:
    r = max(8, int(v + 4) // 8 * 8)
    return r + 8 if r < 0.9 * v else r


class InvertedResidual(nn.Module):
    """1x1 expand - ReLU6 - 3x3 depthwise - ReLU6 - 1x1 project (linear); identity add when shapes match."""

    def __init__(self, inp: int, out: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = inp * t
        layers: list[nn.Module] = []
        if t != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_res else y


class MobileNetV2(nn.Module):
    """CIFAR-style MobileNetV2; any input size."""

    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        c = _round8(32 * width_mult)
        # stem as plain attributes (not a container) so the auto tap rule does not pick it
        self.conv_stem = nn.Conv2d(in_chans, c, 3, 1, 1, bias=False)
        self.bn_stem = nn.BatchNorm2d(c)
        for i, (t, ch, n, s) in enumerate(_SETTINGS):
            out = _round8(ch * width_mult)
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(c, out, s if j == 0 else 1, t))
                c = out
            setattr(self, f"stage{i + 1}", nn.Sequential(*blocks))
        self.last_channels = _round8(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv_head = nn.Conv2d(c, self.last_channels, 1, bias=False)
        self.bn_head = nn.BatchNorm2d(self.last_channels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.last_channels, num_classes)
        self.kd_taps = ["stage2", "stage3", "stage5", "stage7"]
        self.kd_blocks = [f"stage{i + 1}.{j}" for i, (_, _, n, _) in enumerate(_SETTINGS) for j in range(n)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn_stem(self.conv_stem(x)))
        for i in range(len(_SETTINGS)):
            x = getattr(self, f"stage{i + 1}")(x)
        x = F.relu6(self.bn_head(self.conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(self.dropout(x))


@register_model
def mobilenetv2(
    num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, dropout: float = 0.0
) -> MobileNetV2:
    """CIFAR-style MobileNetV2; ``width_mult=0.5`` is RepDistiller's ``MobileNetV2`` student width."""
    return MobileNetV2(num_classes, in_chans, width_mult, dropout)
