"""The embedded default dataset: procedurally generated audio-visual classification, made from a seed.

Every class has one visual prototype (a smooth random 16x16 image), one audio pattern (a 24x24
log-spectrogram-like array: two notes, i.e. frequency bands, one after the other from a random onset;
the class is the *ordered* pair, each class's reverse is another class) and, for the three-modality variant, one tactile prototype (a smooth 12x12 image). A sample is
its class prototype, randomly shifted, scaled by a signal amplitude, plus Gaussian noise of a
per-modality strength; with probability ``<modality>_missing`` a sample's pattern is absent (pure
noise), so that modality cannot decide that sample and the other modality must.

Why these defaults (measured, see README): the visual pattern is clean and learns within a couple of
epochs, so under joint training it dominates and the audio encoder gets little gradient; audio is
noisy and its class lies in the temporal order of two notes, which an encoder must learn, so a
well-trained audio encoder is slower to get but adds information the visual one lacks (visual
patterns are absent in 10% of samples).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DataSplits, TensorMultimodalDataset, stratified_split
from ..errors import DataError

MODALITIES = ("visual", "audio", "tactile")
SIZES = {"visual": 16, "audio": 24, "tactile": 12}


def _smooth_prototypes(num_classes: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Per-class smooth random images: 4x4 Gaussian fields upsampled, zero-mean, unit-std."""
    coarse = torch.randn(num_classes, 1, 4, 4, generator=gen)
    img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    img = img - img.mean(dim=(2, 3), keepdim=True)
    return img / img.std(dim=(2, 3), keepdim=True)


def audio_note_pairs(num_classes: int) -> list[tuple[int, int]]:
    """Class c -> (first note, second note). Each class's reverse is also a class, so the *set* of
    frequencies never identifies a class: only their temporal order does."""
    n_notes = 2
    while n_notes * (n_notes - 1) < num_classes:
        n_notes += 1
    pairs = []
    for i in range(n_notes):
        for j in range(i + 1, n_notes):
            pairs += [(i, j), (j, i)]
    return pairs[:num_classes], n_notes


def _audio_samples(labels: torch.Tensor, size: int, gen: torch.Generator, note_freqs: torch.Tensor,
                   pairs: torch.Tensor) -> torch.Tensor:
    """Spectrogram-like arrays (B x 1 x freq x time): two notes (Gaussian frequency bands, jittered by
    up to one bin) played one after the other from a random onset. The class is the ordered pair of
    notes, so an encoder must learn temporal order; average-pooled random features cannot see it."""
    n = labels.numel()
    f = torch.arange(size).float().view(1, size, 1)
    t = torch.arange(size).float().view(1, 1, size)
    note_len = size // 4
    onset = torch.randint(0, size - 2 * note_len + 1, (n, 1, 1), generator=gen).float()
    spec = torch.zeros(n, size, size)
    for k in range(2):
        centre = note_freqs[pairs[labels, k]].float().view(n, 1, 1)
        centre = centre + torch.randint(-1, 2, (n, 1, 1), generator=gen).float()
        band = torch.exp(-0.5 * (f - centre) ** 2)
        start = onset + k * note_len
        spec = spec + band * ((t >= start) & (t < start + note_len)).float()
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
        raise DataError(f"synthetic data has no modality {unknown}; available: {list(MODALITIES)}")
    noise = noise or {}
    missing = missing or {}
    proto_gen = torch.Generator().manual_seed(prototype_seed)
    protos = {m: _smooth_prototypes(num_classes, SIZES[m], proto_gen) for m in ("visual", "tactile")}
    pair_list, n_notes = audio_note_pairs(num_classes)
    pairs = torch.tensor(pair_list)
    spacing = (SIZES["audio"] - 4) / n_notes  # evenly spaced note frequencies, shuffled per prototype seed
    note_freqs = (2 + spacing * (0.5 + torch.arange(n_notes))).round()[torch.randperm(n_notes, generator=proto_gen)]
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    inputs = {}
    for m in MODALITIES:  # always draw every modality so a 2-modality set equals a 3-modality one minus a key
        clean = (_audio_samples(labels, SIZES[m], gen, note_freqs, pairs) if m == "audio"
                 else _image_samples(labels, protos[m], gen))
        present = (torch.rand(n, 1, 1, 1, generator=gen) >= missing.get(m, 0.0)).float()
        x = amplitude * present * clean + noise.get(m, 0.0) * torch.randn(clean.shape, generator=gen)
        if m in modalities:
            inputs[m] = x
    return TensorMultimodalDataset({m: inputs[m] for m in modalities}, labels, num_classes)


def synthetic_splits(n_train: int = 3000, n_test: int = 1000, num_classes: int = 10,
                     modalities: list[str] = ("visual", "audio"), visual_noise: float = 1.0,
                     audio_noise: float = 3.5, tactile_noise: float = 2.0, visual_missing: float = 0.1,
                     audio_missing: float = 0.0, tactile_missing: float = 0.0, val_fraction: float = 0.1,
                     split_seed: int = 0) -> DataSplits:
    """Train/val/test of the synthetic set; validation is a stratified ``val_fraction`` of train.

    The data depend only on ``split_seed``, so every run seed sees the same data (the run seed
    drives model initialisation and batch order)."""
    noise = {"visual": visual_noise, "audio": audio_noise, "tactile": tactile_noise}
    missing = {"visual": visual_missing, "audio": audio_missing, "tactile": tactile_missing}
    for key, value in [*(("%s_noise" % m, v) for m, v in noise.items()), *(("%s_missing" % m, v) for m, v in missing.items())]:
        if value < 0 or (key.endswith("missing") and value > 1):
            raise DataError(f"synthetic option {key} out of range: {value}")
    modalities = tuple(modalities)
    full_train = make_synthetic(n_train, seed=1000 + split_seed, num_classes=num_classes,
                                modalities=modalities, noise=noise, missing=missing)
    test = make_synthetic(n_test, seed=2000 + split_seed, num_classes=num_classes,
                          modalities=modalities, noise=noise, missing=missing)
    keep, held = stratified_split(full_train.labels, val_fraction, seed=split_seed)
    return DataSplits(full_train.subset(keep), full_train.subset(held), test, name="synthetic")
