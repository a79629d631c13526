"""Your own two-modality data and encoders in equimodal: is the model imbalanced, and which method helps?

A user's dataset: a camera frame (1 x 16 x 16) and a 3-axis sensor trace (3 x 64) per sample, 6
classes. The camera is easy (one clean pattern per class, absent in 15% of the samples); the
sensor is harder (the class is the order of two bursts at different frequencies) but it knows the
samples the camera misses. The data is held in tensors here; a dataset read from files works the
same way (open the file in ``__getitem__``; a ``targets`` attribute spares the label pass).

    python examples/own_data.py [OUT]          # diagnose, then bench three methods

The same from the command line, by import path (run from the repository root):

    equimodal diagnose --dataset examples.own_data:build_data --set model.factory=examples.own_data:build_model
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import Dataset

import equimodal
from equimodal import MultimodalModel

CLASSES = 6


class CameraSensorDataset(Dataset):
    """Items are ``({"camera": 1x16x16, "sensor": 3x64}, label)``, as equimodal expects."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        protos = torch.nn.functional.interpolate(torch.randn(CLASSES, 1, 4, 4, generator=torch.Generator().manual_seed(7)),
                                                 size=(16, 16), mode="bicubic", align_corners=False)
        self.targets = torch.randint(0, CLASSES, (n,), generator=g)
        seen = (torch.rand(n, generator=g) > 0.15).float().view(n, 1, 1, 1)  # camera misses 15% of the samples
        self.camera = seen * protos[self.targets] + 0.5 * torch.randn(n, 1, 16, 16, generator=g)
        # sensor: two bursts, frequency pair (a, b) in that order; class c -> an ordered pair
        pairs = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
        freqs = torch.tensor([0.08, 0.17, 0.29])
        t = torch.arange(64).float()
        start = torch.randint(0, 16, (n,), generator=g)
        sensor = torch.zeros(n, 3, 64)
        for i, (c, s) in enumerate(zip(self.targets.tolist(), start.tolist())):
            for k, note in enumerate(pairs[c]):
                span = slice(s + 24 * k, s + 24 * k + 24)
                sensor[i, :, span] = torch.sin(2 * torch.pi * freqs[note] * t[span])
        self.sensor = sensor + 2.0 * torch.randn(n, 3, 64, generator=g)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return {"camera": self.camera[i], "sensor": self.sensor[i]}, self.targets[i]


def build_data(n_train: int = 1200, n_test: int = 600) -> dict[str, Dataset]:
    """The builder equimodal calls: train and test (validation is carved from train)."""
    return {"train": CameraSensorDataset(n_train, seed=0), "test": CameraSensorDataset(n_test, seed=1)}


class CameraNet(nn.Module):
    def __init__(self, out_dim: int = 32) -> None:
        super().__init__()
        self.out_dim = out_dim  # MultimodalModel reads the feature size from here
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(64, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SensorNet(nn.Module):
    def __init__(self, out_dim: int = 32) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(nn.Conv1d(3, 16, 7, padding=3), nn.ReLU(), nn.MaxPool1d(2),
                                 nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(), nn.AdaptiveMaxPool1d(4),
                                 nn.Flatten(), nn.Linear(128, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(modalities: tuple[str, ...], num_classes: int, fusion: str = "concat") -> MultimodalModel:
    """The model factory: one encoder per modality asked for (one only for a modality-alone run)."""
    nets = {"camera": CameraNet, "sensor": SensorNet}
    return MultimodalModel({m: nets[m]() for m in modalities}, num_classes, fusion=fusion)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "own_data_out"
    budget = ["train.epochs=8", "train.device=cpu", "optim.lr=0.02"]  # the same for every run
    data = build_data()
    report = equimodal.diagnose(data, f"{out}/diagnosis", seeds=[0, 1, 2], model=build_model, overrides=budget,
                                name="camera-sensor")
    print(report["text"])
    result = equimodal.bench(data, ["joint", "ogm-ge", "mmpareto"], seeds=[0, 1, 2], out=f"{out}/bench",
                             model=build_model, overrides=budget, name="camera-sensor")
    print(result.table)
