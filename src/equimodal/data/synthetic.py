"""The embedded default dataset: procedurally generated audio-visual classification, made from a seed.

Every class has one visual prototype (a smooth random 16x16 image), one audio prototype (a 24x24
log-spectrogram-like array: two harmonic bands at class-specific frequencies with an onset at a random
time) and, for the three-modality variant, one tactile prototype (a smooth 12x12 image). A sample is
its class prototype, randomly shifted, scaled by a signal amplitude, plus Gaussian noise of a
per-modality strength; with probability ``<modality>_missing`` a sample's pattern is absent (pure
noise), so that modality cannot decide that sample and the other modality must.

Why these defaults (measured, see README): the visual pattern is clean and learns within a couple of
epochs, so under joint training it dominates and the audio encoder gets little gradient; audio is
noisier but present in every sample, so a well-trained audio encoder adds information the visual
one lacks (visual patterns are absent in 30% of samples).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DataSplits, TensorMultimodalDataset, stratified_split

MODALITIES = ("visual", "audio", "tactile")
SIZES = {"visual": 16, "audio": 24, "tactile": 12}


def _smooth_prototypes(num_classes: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Per-class smooth random images: 4x4 Gaussian fields upsampled, zero-mean, unit-std."""
    coarse = torch.randn(num_classes, 1, 4, 4, generator=gen)
    img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    img = img - img.mean(dim=(2, 3), keepdim=True)
    return img / img.std(dim=(2, 3), keepdim=True)


def _audio_samples(labels: torch.Tensor, size: int, gen: torch.Generator, class_freqs: torch.Tensor) -> torch.Tensor:
    """Spectrogram-like arrays (B x 1 x freq x time): two Gaussian bands at the class's frequencies,
    each jittered by up to one bin, active from a random onset for a random duration."""
    n = labels.numel()
    freqs = torch.arange(size).float().view(1, 1, size)  # 1 x 1 x F
    centres = class_freqs[labels].float() + torch.randint(-1, 2, (n, 2), generator=gen).float()  # n x 2
    bands = torch.exp(-0.5 * ((freqs - centres.unsqueeze(-1)) / 1.0) ** 2).sum(1)  # n x F
    t = torch.arange(size).float().view(1, size)
    onset = torch.randint(0, size // 2, (n, 1), generator=gen).float()
    length = torch.randint(size // 3, size // 2 + 1, (n, 1), generator=gen).float()
    env = ((t >= onset) & (t < onset + length)).float()  # n x T
    spec = bands.unsqueeze(-1) * env.unsqueeze(1)  # n x F x T
    spec = (spec - spec.mean(dim=(1, 2), keepdim=True)) / spec.std(dim=(1, 2), keepdim=True)
    return spec.unsqueeze(1)


def _image_samples(labels: torch.Tensor, protos: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Class prototypes rolled by a random shift (vectorised: one gather over shifted index grids)."""
    n, size = labels.numel(), protos.shape[-1]
    sx = torch.randint(-max_shift, max_shift + 1, (n, 1, 1), generator=gen)
    sy = torch.randint(-max_shift, max_shift + 1, (n, 1, 1), generator=gen)
    rows = (torch.arange(size).view(1, size, 1) - sy) % size
    cols = (torch.arange(size).view(1, 1, size) - sx) % size
    base = protos[labels, 0]  # n x S x S
    flat = rows * size + cols
    return base.flatten(1).gather(1, flat.flatten(1)).view(n, 1, size, size)


def make_synthetic(n: int, seed: int, num_classes: int = 10, modalities: tuple[str, ...] = ("visual", "audio"),
                   noise: dict[str, float] | None = None, missing: dict[str, float] | None = None,
                   amplitude: float = 1.0, prototype_seed: int = 12345) -> TensorMultimodalDataset:
    """Draw ``n`` samples. Prototypes come from ``prototype_seed`` (shared by all splits), samples from ``seed``."""
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"synthetic data has no modality {unknown}; available: {list(MODALITIES)}")
    noise = noise or {}
    missing = missing or {}
    proto_gen = torch.Generator().manual_seed(prototype_seed)
    protos = {m: _smooth_prototypes(num_classes, SIZES[m], proto_gen) for m in ("visual", "tactile")}
    perm = torch.randperm(SIZES["audio"] - 4, generator=proto_gen) + 2  # band centres away from the edges
    classes = torch.arange(num_classes)
    class_freqs = torch.stack([perm[classes % perm.numel()], perm[(classes + num_classes) % perm.numel()]], dim=1)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    inputs = {}
    for m in MODALITIES:  # always draw every modality so a 2-modality set equals a 3-modality one minus a key
        clean = (_audio_samples(labels, SIZES[m], gen, class_freqs) if m == "audio"
                 else _image_samples(labels, protos[m], gen))
        present = (torch.rand(n, 1, 1, 1, generator=gen) >= missing.get(m, 0.0)).float()
        x = amplitude * present * clean + noise.get(m, 0.0) * torch.randn(clean.shape, generator=gen)
        if m in modalities:
            inputs[m] = x
    return TensorMultimodalDataset({m: inputs[m] for m in modalities}, labels, num_classes)


def synthetic_splits(n_train: int = 3000, n_test: int = 1000, num_classes: int = 10,
                     modalities: list[str] = ("visual", "audio"), visual_noise: float = 1.0,
                     audio_noise: float = 2.0, tactile_noise: float = 2.0, visual_missing: float = 0.3,
                     audio_missing: float = 0.0, tactile_missing: float = 0.0, val_fraction: float = 0.1,
                     split_seed: int = 0) -> DataSplits:
    """Train/val/test of the synthetic set; validation is a stratified ``val_fraction`` of train.

    The data depend only on ``split_seed``, so every run seed sees the same data (the run seed
    drives model initialisation and batch order)."""
    noise = {"visual": visual_noise, "audio": audio_noise, "tactile": tactile_noise}
    missing = {"visual": visual_missing, "audio": audio_missing, "tactile": tactile_missing}
    for key, value in [*(("%s_noise" % m, v) for m, v in noise.items()), *(("%s_missing" % m, v) for m, v in missing.items())]:
        if value < 0 or (key.endswith("missing") and value > 1):
            raise ValueError(f"synthetic option {key} out of range: {value}")
    modalities = tuple(modalities)
    full_train = make_synthetic(n_train, seed=1000 + split_seed, num_classes=num_classes,
                                modalities=modalities, noise=noise, missing=missing)
    test = make_synthetic(n_test, seed=2000 + split_seed, num_classes=num_classes,
                          modalities=modalities, noise=noise, missing=missing)
    keep, held = stratified_split(full_train.labels, val_fraction, seed=split_seed)
    return DataSplits(full_train.subset(keep), full_train.subset(held), test, name="synthetic")
