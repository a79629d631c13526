"""ResNet-18 encoders as in the OGM-GE code (written here; no torchvision).

Audio: a spectrogram B x 1 x F x T through a one-input-channel ResNet-18, global average pooled.
Visual: frames B x 3 x T x H x W are folded into the batch ((B*T) x 3 x H x W), passed through a
three-channel ResNet-18, and the feature maps are average-pooled over time and space, as the
official ``AVClassifier`` does with ``F.adaptive_avg_pool3d``. Both return B x 512 features.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Trunk(nn.Module):
    """Conv 7x7/2, max-pool, four stages of two basic blocks (64, 128, 256, 512): a feature map."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        layers, inplanes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)]
            inplanes = planes
        self.layers = nn.Sequential(*layers)
        for m in self.modules():  # as torchvision: Kaiming for convs, BN weight 1 / bias 0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


class AudioResNet18(nn.Module):
    """ResNet-18 on a one-channel spectrogram (B x 1 x F x T or B x F x T) -> B x 512."""

    out_dim = 512

    def __init__(self) -> None:
        super().__init__()
        self.trunk = ResNet18Trunk(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.trunk(x).mean(dim=(2, 3))


class VisualResNet18(nn.Module):
    """ResNet-18 on video frames B x 3 x T x H x W (or one image B x 3 x H x W) -> B x 512,
    frames folded into the batch and pooled over time and space."""

    out_dim = 512

    def __init__(self) -> None:
        super().__init__()
        self.trunk = ResNet18Trunk(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(2)
        b, c, t, h, w = x.shape
        maps = self.trunk(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # (B*T) x 512 x h' x w'
        return maps.view(b, t, *maps.shape[1:]).mean(dim=(1, 3, 4))
