"""ImageNet-style ResNet-18/34 (He et al. 2016): 7x7/2 conv + 3x3/2 max-pool stem, four stages of
BasicBlocks (64/128/256/512; option-B projection shortcuts), global average pool, linear.

``cifar_stem=True`` replaces the stem with a 3x3/1 conv and no max-pool (small images).
``kd_taps`` = the post-ReLU outputs of the four stages (``layer1..layer4``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.student.registry import register_model
from kdpipe.student.resnet_cifar import BasicBlock


class ResNet(nn.Module):
    """ResNet with BasicBlocks; any input size."""

    def __init__(
        self, layers: tuple[int, ...], num_classes: int = 1000, in_chans: int = 3, cifar_stem: bool = False
    ) -> None:
        super().__init__()
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, "B"))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512, num_classes)
        self.kd_taps = ["layer1", "layer2", "layer3", "layer4"]
        self.kd_blocks = [f"layer{i + 1}.{j}" for i, n in enumerate(layers) for j in range(n)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model
def resnet18(num_classes: int = 1000, in_chans: int = 3, cifar_stem: bool = False) -> ResNet:
    """ResNet-18 (ImageNet stem unless ``cifar_stem``)."""
    return ResNet((2, 2, 2, 2), num_classes, in_chans, cifar_stem)


@register_model
def resnet34(num_classes: int = 1000, in_chans: int = 3, cifar_stem: bool = False) -> ResNet:
    """ResNet-34 (ImageNet stem unless ``cifar_stem``)."""
    return ResNet((3, 4, 6, 3), num_classes, in_chans, cifar_stem)
