"""Encoders: map one modality's input to a feature vector. Each exposes ``out_dim``."""
from __future__ import annotations

import torch
from torch import nn


NORMS = ("batch", "group", "none")


def norm_layer(kind: str, channels: int, dims: int = 2) -> nn.Module:
    """``batch``: BatchNorm (the default); ``group``: GroupNorm with one group per sample (statistics
    of one sample only, so a data-parallel run equals one process exactly); ``none``."""
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if kind == "group":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {list(NORMS)}")


class SmallCNN(nn.Module):
    """A three-block 2-D CNN for small images or spectrograms (input B x C x H x W).

    Conv -> BatchNorm -> ReLU blocks with max pooling, then global average pooling, so any input
    size of at least 8x8 works. Sized for the CPU: about 25k parameters at width 32.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, out_dim: int = 64, norm: str = "batch") -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width // 2, 3, padding=1, bias=False),
            norm_layer(norm, width // 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width // 2, width, 3, padding=1, bias=False),
            norm_layer(norm, width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, out_dim, 3, padding=1, bias=False),
            norm_layer(norm, out_dim),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # B x H x W -> add the channel axis
            x = x.unsqueeze(1)
        return self.net(x)


class MLPEncoder(nn.Module):
    """Two-layer MLP for vector inputs (e.g. tabular views). Has no convolution weights, so
    OGM's paper default (``params="conv"``) finds nothing to modulate here: use ``params="all"``."""

    def __init__(self, in_dim: int, hidden: int = 128, out_dim: int = 64, norm: str = "batch") -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), norm_layer(norm, hidden, dims=1), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


from .resnet import AudioResNet18, VisualResNet18  # noqa: E402

ENCODERS = {"cnn": SmallCNN, "mlp": MLPEncoder, "resnet18-audio": AudioResNet18, "resnet18-visual": VisualResNet18}
