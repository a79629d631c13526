"""The OGM-GE paper's audio-visual datasets: CREMA-D, Kinetics-Sounds, VGGSound, AVE.

Layout (what ``equimodal data prepare <name>`` writes from the original videos, and what the official
OGM-GE code reads, with the paths made relative to one root)::

    ROOT/audio/<clip_id>.wav                          mono WAV (any rate; resampled on load)
    ROOT/visual/Image-{fps:02d}-FPS/<clip_id>/*.jpg   frames extracted at ``fps``
    ROOT/train.csv, ROOT/test.csv                     "clip_id,label" per line, no header

For CREMA-D the split lists default to the OGM-GE ones in ``../shared/data/crema-d`` when ROOT has
none. Preprocessing defaults are the paper's (CREMA-D: 22,050 Hz, tiled to 3 s, |STFT| with n_fft 512,
hop 353, log(|.| + 1e-7) -> 257 x 188; frames 224 x 224 with random resized crop and horizontal flip
for training, resized for testing, ImageNet normalisation).

Departures from the official code, each a fix: the randomly drawn frame indices are actually used
(the official loader draws them and then reads the first frames in directory order); test frames are
evenly spaced (deterministic); audio is always the first ``seconds`` of the tiled clip (the official
VGGSound loader takes a random 5 s window). Spectrograms are cached on first use (so from the second
epoch on the STFT is not recomputed) in ``cache_dir``, keyed by the preprocessing parameters; a
damaged cache file is recomputed from the WAV and overwritten. Missing files stop the run with their
names (``skip_missing=True`` skips them and reports the count); an unreadable one (a bad WAV, frame
or split list, a label outside the class list) stops it with a ``DataError`` naming the file.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .audio import log_stft_spectrogram, read_wav
from .base import DataSplits, describe, stratified_split
from ..errors import DataError, DataNotFoundError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@dataclass(frozen=True)
class Preset:
    name: str
    num_classes: int
    sample_rate: int
    seconds: float
    n_fft: int
    hop: int
    fps: int = 1
    frames: int = 1
    classes: tuple[str, ...] = ()


PRESETS = {
    "cremad": Preset("cremad", 6, 22050, 3.0, 512, 353, fps=1, frames=1,
                     classes=("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")),  # the official class order
    "kinetics-sounds": Preset("kinetics-sounds", 31, 16000, 5.0, 256, 128, fps=1, frames=3),
    "vggsound": Preset("vggsound", 309, 16000, 5.0, 256, 128, fps=1, frames=3),
    "ave": Preset("ave", 28, 16000, 5.0, 256, 128, fps=1, frames=3),
}


def read_split(path: Path) -> list[tuple[str, str]]:
    """(clip_id, label) rows of a split list ("clip_id,label" per line, no header; blank lines are
    skipped). A file that is not UTF-8 text or CSV, a row with a missing or empty column, or no rows
    raises ``DataError`` naming the file (and line)."""
    if not path.is_file():
        raise DataNotFoundError(f"split list not found: {path}")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for lineno, row in enumerate(csv.reader(fh), 1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 2:
                    raise DataError(f"{path}:{lineno}: expected 'clip_id,label', got {row!r}")
                clip, label = row[0].strip(), row[1].strip()
                if not clip or not label:
                    raise DataError(f"{path}:{lineno}: empty {'clip_id' if not clip else 'label'} in {row!r}")
                rows.append((clip, label))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the split list: {describe(exc)}") from None
    if not rows:
        raise DataError(f"split list {path} is empty")
    return rows


def resample(wave: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """Linear-interpolation resampling (cheap; the spectrogram's frequency resolution dominates)."""
    if rate == target:
        return wave
    n = max(1, int(round(wave.numel() * target / rate)))
    return torch.nn.functional.interpolate(wave.view(1, 1, -1), size=n, mode="linear", align_corners=False).view(-1)


def random_resized_crop(img: Image.Image, size: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop rule, on a PIL image, with an explicit random source."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    side = min(w, h)  # fallback: central crop
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def to_tensor(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (arr - IMAGENET_MEAN) / IMAGENET_STD


class AVClipDataset(Dataset):
    """Clips of one split: ``dataset[i]`` -> ({"audio": 1 x F x T, "visual": 3 x frames x S x S}, label).

    Visual frames: training draws ``frames`` sorted random frame indices (and uses them), test takes
    evenly spaced ones. Random choices come from ``random.Random(seed, epoch, index)``, so a run is
    reproducible; call ``set_epoch`` to vary them per epoch.
    """

    preferred_encoders = {"audio": "resnet18-audio", "visual": "resnet18-visual"}

    def __init__(self, root: Path, clips: list[str], labels: list[int], preset: Preset, train: bool, num_classes: int,
                 frames: int, image_size: int, cache_dir: Path | None, seed: int = 0) -> None:
        self.root, self.clips, self.preset, self.train = root, clips, preset, train
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes, self.frames, self.image_size = num_classes, frames, image_size
        self.cache_dir, self.seed, self.epoch = cache_dir, seed, 0
        self.frame_dir = root / "visual" / f"Image-{preset.fps:02d}-FPS"

    modalities = ("audio", "visual")

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def subset(self, indices: torch.Tensor) -> "AVClipDataset":
        idx = [int(i) for i in indices]
        return AVClipDataset(self.root, [self.clips[i] for i in idx], [int(self.labels[i]) for i in idx], self.preset,
                             self.train, self.num_classes, self.frames, self.image_size, self.cache_dir, self.seed)

    def spectrogram(self, clip: str) -> torch.Tensor:
        """F x T log-|STFT| of the clip's WAV, cached in ``cache_dir/<clip>.pt`` (float16). A cache file
        that cannot be loaded or holds anything but a finite F x T tensor is rebuilt from the WAV
        (overwritten); a bad WAV raises ``DataError`` naming it."""
        p = self.preset
        length = int(round(p.seconds * p.sample_rate))
        shape = (p.n_fft // 2 + 1, length // p.hop + 1)  # centred frames
        cached = self.cache_dir / f"{clip}.pt" if self.cache_dir is not None else None
        if cached is not None and cached.is_file():
            try:
                spec = torch.load(cached, weights_only=True)
            except Exception:  # a damaged cache file (any of torch.load's many errors): rebuild it below
                spec = None
            if isinstance(spec, torch.Tensor) and tuple(spec.shape) == shape and spec.is_floating_point() \
                    and bool(torch.isfinite(spec).all()):
                return spec.float()
        wave, rate = read_wav(self.root / "audio" / f"{clip}.wav")
        wave = resample(wave, rate, p.sample_rate)
        wave = wave.repeat(math.ceil(length / wave.numel()))[:length].clamp(-1, 1)  # tile, as the official code
        spec = log_stft_spectrogram(wave.unsqueeze(0), n_fft=p.n_fft, hop=p.hop)[0]
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            torch.save(spec.half(), tmp)
            os.replace(tmp, cached)
        return spec

    def frame_tensor(self, clip: str, rng: random.Random) -> torch.Tensor:
        folder = self.frame_dir / clip
        try:
            names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg", ".png")))
        except OSError as exc:
            raise DataNotFoundError(f"{folder}: cannot list the frames: {describe(exc)}") from None
        if not names:
            raise DataNotFoundError(f"no frames in {folder}")
        if self.train:
            chosen = sorted(rng.sample(range(len(names)), self.frames)) if len(names) >= self.frames \
                else sorted(rng.choices(range(len(names)), k=self.frames))
        else:
            chosen = [int(i) for i in np.linspace(0, len(names) - 1, self.frames).round()]
        out = []
        for i in chosen:
            path = folder / names[i]
            try:
                with Image.open(path) as src:
                    img = src.convert("RGB")
            # PIL raises OSError (unidentified or truncated), ValueError, SyntaxError, struct.error,
            # DecompressionBombError, ... for a damaged image; nothing else happens in this block
            except Exception as exc:
                raise DataError(f"{path}: cannot read frame: {describe(exc)}") from None
            if min(img.size) < 1:
                raise DataError(f"{path}: frame has size {img.size}")
            if self.train:
                img = random_resized_crop(img, self.image_size, rng)
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
            out.append(to_tensor(img))
        return torch.stack(out, dim=1)  # 3 x T x S x S

    def __getitem__(self, index):
        if isinstance(index, (list, tuple, torch.Tensor)):  # a batch
            items = [self[int(i)] for i in index]
            return ({m: torch.stack([it[0][m] for it in items]) for m in self.modalities},
                    torch.stack([it[1] for it in items]))
        clip = self.clips[index]
        rng = random.Random(hash((self.seed, self.epoch, index)) & 0xFFFFFFFF)
        return {"audio": self.spectrogram(clip).unsqueeze(0), "visual": self.frame_tensor(clip, rng)}, self.labels[index]


def _check_files(root: Path, preset: Preset, rows: list[tuple[str, str]], skip_missing: bool, where: str
                 ) -> tuple[list[tuple[str, str]], list[str]]:
    frame_dir = root / "visual" / f"Image-{preset.fps:02d}-FPS"
    kept, missing = [], []
    for clip, label in rows:
        problems = []
        if not (root / "audio" / f"{clip}.wav").is_file():
            problems.append(str(root / "audio" / f"{clip}.wav"))
        folder = frame_dir / clip
        try:
            has_frames = folder.is_dir() and any(n.lower().endswith((".jpg", ".jpeg", ".png"))
                                                 for n in os.listdir(folder))
        except OSError:  # unreadable folder
            has_frames = False
        if not has_frames:
            problems.append(f"{folder}/ (no frames)")
        if problems:
            missing += problems
        else:
            kept.append((clip, label))
    if missing and not skip_missing:
        shown = "\n  ".join(missing[:10])
        raise DataNotFoundError(f"{len(missing)} file(s) listed in {where} are missing:\n  {shown}"
                                + ("\n  ..." if len(missing) > 10 else "")
                                + "\n(pass data.skip_missing=true to skip those clips and count them)")
    return kept, missing


def av_clip_splits(name: str, root: str = "", split_dir: str = "", cache_dir: str = "", frames: int = 0,
                   image_size: int = 224, skip_missing: bool = False, val_fraction: float = 0.1,
                   split_seed: int = 0) -> DataSplits:
    """Train/val/test for one of the paper's datasets (``name`` in PRESETS). ``frames=0``: the preset's;
    ``cache_dir="off"``: recompute every spectrogram (no cache)."""
    preset = PRESETS[name]
    if not root:
        raise DataError(f"dataset {name!r} needs data.root: the folder with audio/ and visual/ (see `equimodal data prepare`)")
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataNotFoundError(f"data.root {root_path} does not exist")
    split_path = Path(split_dir) if split_dir else root_path
    if not split_dir and name == "cremad" and not (root_path / "train.csv").is_file():
        from .avdigits import default_source
        split_path = default_source() / "crema-d"
    rows = {part: read_split(split_path / f"{part}.csv") for part in ("train", "test")}
    classes = list(preset.classes) or sorted({label for _, label in rows["train"]})
    index = {c: i for i, c in enumerate(classes)}
    for part, items in rows.items():
        unknown = sorted({label for _, label in items if label not in index})
        if unknown:
            origin = "" if preset.classes else f" (taken from {split_path / 'train.csv'})"
            raise DataError(f"{split_path / f'{part}.csv'}: labels {unknown[:5]} are not in the class list "
                            f"{classes[:10]}{origin}")
    if len(classes) != preset.num_classes:
        print(f"note: {name} has {len(classes)} classes in {split_path}, the paper's has {preset.num_classes}")
    skipped = {}
    for part in rows:
        rows[part], missing = _check_files(root_path, preset, rows[part], skip_missing, str(split_path / f"{part}.csv"))
        if missing:
            skipped[part] = len(missing)
    if skipped:
        print(f"warning: skipped clips with missing files (data.skip_missing=true): {skipped}")
    params = {k: v for k, v in asdict(preset).items() if k not in ("frames", "classes", "num_classes")}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    from .avdigits import default_cache
    cache = None if cache_dir == "off" else (Path(cache_dir) if cache_dir else default_cache()) / f"{name}-spec-{key}"
    n_frames = frames or preset.frames

    def make(part: str, train: bool) -> AVClipDataset:
        return AVClipDataset(root_path, [c for c, _ in rows[part]], [index[lab] for _, lab in rows[part]], preset,
                             train, len(classes), n_frames, image_size, cache, seed=split_seed)

    full_train, test = make("train", True), make("test", False)
    keep, held = stratified_split(full_train.labels, val_fraction, seed=split_seed)
    val = full_train.subset(held)
    val.train = False  # validation uses the test-time transform
    return DataSplits(full_train.subset(keep), val, test, name=name)
