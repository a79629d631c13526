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
VGGSound loader takes a random 5 s window). Spectrograms (float16) and decoded frames (uint8, at
short side ``frame_side``) are cached on first use as ``.npy`` files read memory-mapped (so from
the second epoch on neither the STFT nor the JPEG decoding is redone) in ``cache_dir``, keyed by
the preprocessing parameters; crops, flips, resizing and normalisation run on tensors, the same
with or without the cache, written straight into the batch (``fill_batch``: ``iterate_batches``
reuses batch buffers, see ``equimodal.data.base.BatchPool``). A damaged cache file is recomputed from the WAV or JPEGs and overwritten. Missing files stop the run with their
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
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .audio import log_stft_spectrogram, read_wav
from .base import DataSplits, describe, empty_batch, stratified_split
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


def crop_box(w: int, h: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, width, height) of torchvision's RandomResizedCrop rule, with an explicit random source."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    side = min(w, h)  # fallback: central crop
    return (w - side) // 2, (h - side) // 2, side, side


def random_resized_crop(img: Image.Image, size: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop rule, on a PIL image, with an explicit random source."""
    left, top, cw, ch = crop_box(*img.size, rng, scale, ratio)
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))


def to_tensor(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (arr - IMAGENET_MEAN) / IMAGENET_STD


_NPY_MAGIC = b"\x93NUMPY"
_NPY_DICT = re.compile(r"\{'descr': '([^']+)', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}")


def npy_layout(fh: BinaryIO) -> tuple[str, tuple[int, ...], int] | None:
    """(dtype string, shape, offset of the data) of an ``.npy`` file as ``np.save`` writes it, read
    from the header with one regular expression (``np.load`` parses it with ``ast``, a large share
    of a cached sample's cost); None for anything else (then the cache file is rebuilt)."""
    head = fh.read(12)
    if len(head) < 12 or head[:6] != _NPY_MAGIC or head[6] not in (1, 2, 3):
        return None
    start = 10 if head[6] == 1 else 12
    size = int.from_bytes(head[8:start], "little")
    fh.seek(start)
    match = _NPY_DICT.match(fh.read(size).decode("latin1").strip())
    if match is None:
        return None
    return match.group(1), tuple(int(v) for v in match.group(2).split(",") if v.strip()), start + size


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as ``.npy`` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)  # C order: what npy_layout reads
    os.replace(tmp, path)


#: ImageNet normalisation of 0..255 values as one multiply-subtract: x * _SCALE - _SHIFT
_SCALE = (1.0 / (255.0 * IMAGENET_STD))
_SHIFT = IMAGENET_MEAN / IMAGENET_STD


def resize_short_side(img: Image.Image, side: int) -> np.ndarray:
    """H x W x 3 uint8 array of ``img`` (RGB) resized so that its short side is ``side`` (PIL
    bilinear, antialiased): the decoded form of a frame, cached or not."""
    w, h = img.size
    if min(w, h) != side:
        scale = side / min(w, h)
        size = (side, max(side, round(h * scale))) if w <= h else (max(side, round(w * scale)), side)
        img = img.resize(size, Image.BILINEAR)
    return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """3 x h x w uint8 -> 3 x size x size (0..255), bilinear with antialiasing: uint8 from torch's
    uint8 kernel where this torch has it, float from the same filter otherwise."""
    try:
        out = torch.nn.functional.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear",
                                              align_corners=False, antialias=True)
    except RuntimeError:  # older torch: no uint8 path
        out = torch.nn.functional.interpolate(x.unsqueeze(0).float(), size=(size, size), mode="bilinear",
                                              align_corners=False, antialias=True)
    return out[0]


def augment_frame(frame: torch.Tensor, size: int, rng: random.Random | None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """One decoded frame (H x W x 3 uint8) -> 3 x size x size normalised float (written into ``out``
    when given: a batch's slot, no further copy). Training (``rng`` given): random resized crop +
    horizontal flip with probability 1/2, drawn from ``rng`` in that order; test (``rng=None``):
    resized to size x size."""
    x = frame.permute(2, 0, 1)
    if rng is not None:
        left, top, cw, ch = crop_box(x.shape[2], x.shape[1], rng)
        x = x[:, top:top + ch, left:left + cw]
        flip = rng.random() < 0.5
    else:
        flip = False
    resized = _resize_uint8(x.contiguous(), size)
    if flip:
        resized = resized.flip(-1)
    if out is None:
        out = torch.empty((3, size, size))
    torch.mul(resized, _SCALE, out=out)
    return out.sub_(_SHIFT)


class AVClipDataset(Dataset):
    """Clips of one split: ``dataset[i]`` -> ({"audio": 1 x F x T, "visual": 3 x frames x S x S}, label).

    Visual frames: training draws ``frames`` sorted random frame indices (and uses them), test takes
    evenly spaced ones. Random choices come from ``random.Random(seed, epoch, index)``, so a run is
    reproducible; call ``set_epoch`` to vary them per epoch.
    """

    preferred_encoders = {"audio": "resnet18-audio", "visual": "resnet18-visual"}

    def __init__(self, root: Path, clips: list[str], labels: list[int], preset: Preset, train: bool, num_classes: int,
                 frames: int, image_size: int, cache_dir: Path | None, seed: int = 0,
                 frame_cache: Path | None = None, frame_side: int = 256) -> None:
        self.root, self.clips, self.preset, self.train = root, clips, preset, train
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes, self.frames, self.image_size = num_classes, frames, image_size
        self.cache_dir, self.seed, self.epoch = cache_dir, seed, 0
        self.frame_cache, self.frame_side = frame_cache, int(frame_side)
        self.frame_dir = root / "visual" / f"Image-{preset.fps:02d}-FPS"

    modalities = ("audio", "visual")
    #: ``iterate_batches(persistent_workers=True)`` may keep its loader (and worker processes) here
    keeps_loaders = True

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_equimodal_loaders"}

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def subset(self, indices: torch.Tensor) -> "AVClipDataset":
        idx = [int(i) for i in indices]
        return AVClipDataset(self.root, [self.clips[i] for i in idx], [int(self.labels[i]) for i in idx], self.preset,
                             self.train, self.num_classes, self.frames, self.image_size, self.cache_dir, self.seed,
                             self.frame_cache, self.frame_side)

    def spectrogram_shape(self) -> tuple[int, int]:
        """(frequency bins, frames) of this preset's spectrograms (centred STFT frames)."""
        p = self.preset
        return p.n_fft // 2 + 1, int(round(p.seconds * p.sample_rate)) // p.hop + 1

    def spectrogram(self, clip: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """F x T log-|STFT| of the clip's WAV, cached in ``cache_dir/<clip>.npy`` (float16, read
        memory-mapped: much cheaper per sample than unpickling a tensor). A cache file that cannot be
        loaded or holds anything but a finite F x T float16 array is rebuilt from the WAV
        (overwritten); a bad WAV raises ``DataError`` naming it."""
        p = self.preset
        length = int(round(p.seconds * p.sample_rate))
        shape = self.spectrogram_shape()
        cached = self.cache_dir / f"{clip}.npy" if self.cache_dir is not None else None
        if cached is not None:
            try:
                with open(cached, "rb") as fh:
                    layout = npy_layout(fh)
                    if layout is not None and layout[:2] == ("<f2", shape):
                        fh.seek(layout[2])
                        half = np.empty(shape, dtype=np.float16)
                        if fh.readinto(half) == half.nbytes:
                            spec = torch.empty(shape) if out is None else out
                            np.copyto(spec.numpy(), half)  # to float32 in the slot: one pass
                            if np.isfinite(spec.numpy()).all():
                                return spec
            except (OSError, ValueError, UnicodeDecodeError):  # missing or damaged: (re)build it below
                pass
        wave, rate = read_wav(self.root / "audio" / f"{clip}.wav")
        wave = resample(wave, rate, p.sample_rate)
        wave = wave.repeat(math.ceil(length / wave.numel()))[:length].clamp(-1, 1)  # tile, as the official code
        spec = log_stft_spectrogram(wave.unsqueeze(0), n_fft=p.n_fft, hop=p.hop)[0]
        if cached is not None:  # every epoch, the first included, sees the same (float16-rounded) values
            half = spec.half()
            _save_npy(cached, half.numpy())
            spec = half.float()
        return spec if out is None else out.copy_(spec)

    def _frame_names(self, clip: str) -> list[str]:
        folder = self.frame_dir / clip
        try:
            names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg", ".png")))
        except OSError as exc:
            raise DataNotFoundError(f"{folder}: cannot list the frames: {describe(exc)}") from None
        if not names:
            raise DataNotFoundError(f"no frames in {folder}")
        return names

    def _decode(self, clip: str, name: str) -> np.ndarray:
        """One frame file, decoded and resized to the short side ``frame_side`` (H x W x 3 uint8)."""
        path = self.frame_dir / clip / name
        try:
            with Image.open(path) as src:
                img = src.convert("RGB")
        # PIL raises OSError (unidentified or truncated), ValueError, SyntaxError, struct.error,
        # DecompressionBombError, ... for a damaged image; nothing else happens in this block
        except Exception as exc:
            raise DataError(f"{path}: cannot read frame: {describe(exc)}") from None
        if min(img.size) < 1:
            raise DataError(f"{path}: frame has size {img.size}")
        return resize_short_side(img, self.frame_side)

    def _open_cached_frames(self, clip: str) -> tuple[BinaryIO, tuple[int, ...], int] | None:
        """(open file, shape, data offset) of the clip's frame cache file when it is a complete
        n x H x W x 3 uint8 array at short side ``frame_side``; None when missing or damaged."""
        try:
            fh = open(self.frame_cache / f"{clip}.npy", "rb")
        except OSError:
            return None
        try:
            layout = npy_layout(fh)
            if layout is not None:
                dtype, shape, offset = layout
                if dtype == "|u1" and len(shape) == 4 and shape[0] >= 1 and shape[3] == 3 \
                        and min(shape[1:3]) == self.frame_side \
                        and os.fstat(fh.fileno()).st_size == offset + math.prod(shape):
                    return fh, shape, offset
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        fh.close()
        return None

    def decoded_frames(self, clip: str) -> np.ndarray:
        """Every frame of the clip, decoded at short side ``frame_side``: n x H x W x 3 uint8,
        memory-mapped from ``frame_cache/<clip>.npy`` (written on first use; a damaged or foreign
        file is rebuilt from the JPEGs and overwritten)."""
        cached = self.frame_cache / f"{clip}.npy"
        opened = self._open_cached_frames(clip)
        if opened is not None:
            opened[0].close()
            return np.load(cached, mmap_mode="r", allow_pickle=False)
        frames = [self._decode(clip, n) for n in self._frame_names(clip)]
        if len({f.shape for f in frames}) > 1:  # one clip's frames come from one video: one size
            frames = [np.asarray(Image.fromarray(f).resize(frames[0].shape[1::-1], Image.BILINEAR)) for f in frames]
        arr = np.stack(frames)
        _save_npy(cached, arr)
        return arr

    def frame_tensor(self, clip: str, rng: random.Random, out: torch.Tensor | None = None) -> torch.Tensor:
        """3 x frames x S x S: the chosen frames (random sorted indices in training, evenly spaced in
        test), each decoded at short side ``frame_side`` (with a frame cache: only the chosen frames'
        bytes are read from it) then cropped/flipped/resized and normalised as tensors. Cached and
        uncached give the same tensors: both augment the same decoded uint8 frames with the same
        random draws."""
        opened = self._open_cached_frames(clip) if self.frame_cache is not None else None
        stack = names = None
        if opened is not None:
            count = opened[1][0]
        elif self.frame_cache is not None:
            stack = self.decoded_frames(clip)  # builds the cache file
            count = stack.shape[0]
        else:
            names = self._frame_names(clip)
            count = len(names)
        try:
            if self.train:
                chosen = sorted(rng.sample(range(count), self.frames)) if count >= self.frames \
                    else sorted(rng.choices(range(count), k=self.frames))
            else:
                chosen = [int(i) for i in np.linspace(0, count - 1, self.frames).round()]
            if out is None:
                out = torch.empty((3, self.frames, self.image_size, self.image_size))
            for t, i in enumerate(chosen):
                if opened is not None:
                    fh, shape, offset = opened
                    frame = np.empty(shape[1:], dtype=np.uint8)
                    fh.seek(offset + i * frame.nbytes)
                    if fh.readinto(frame) != frame.nbytes:
                        raise DataError(f"{fh.name}: frame cache file shrank while reading; delete it")
                else:
                    frame = np.array(stack[i]) if stack is not None else self._decode(clip, names[i])
                augment_frame(torch.from_numpy(frame), self.image_size, rng if self.train else None, out=out[:, t])
        finally:
            if opened is not None:
                opened[0].close()
        return out  # 3 x T x S x S

    def batch_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Each modality's per-sample shape and dtype (for ``BatchPool``)."""
        return {"audio": ((1, *self.spectrogram_shape()), torch.float32),
                "visual": ((3, self.frames, self.image_size, self.image_size), torch.float32)}

    def fill_batch(self, indices: list[int], out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Write the samples at ``indices`` into ``out`` (``len(indices)`` x the ``batch_layout``
        shapes) with this epoch's random draws; returns their labels."""
        for j, i in enumerate(indices):  # every sample is written into its slot of the batch
            rng = random.Random(hash((self.seed, self.epoch, i)) & 0xFFFFFFFF)
            self.spectrogram(self.clips[i], out=out["audio"][j, 0])
            self.frame_tensor(self.clips[i], rng, out=out["visual"][j])
        return self.labels[indices]

    def __getitem__(self, index):
        batch = isinstance(index, (list, tuple, torch.Tensor))
        idx = [int(i) for i in index] if batch else [int(index)]
        # a worker's batch goes to the main process in shared memory, allocated there (no copy)
        shared = batch and torch.utils.data.get_worker_info() is not None
        out = {m: empty_batch((len(idx), *shape), dtype, shared) for m, (shape, dtype) in self.batch_layout().items()}
        labels = self.fill_batch(idx, out)
        if batch:
            return out, labels
        return {m: x[0] for m, x in out.items()}, labels[0]


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
                   image_size: int = 224, frame_side: int = 256, skip_missing: bool = False, val_fraction: float = 0.1,
                   split_seed: int = 0) -> DataSplits:
    """Train/val/test for one of the paper's datasets (``name`` in PRESETS). ``frames=0``: the preset's;
    ``frame_side``: the short side frames are decoded to (and cached at) before cropping to
    ``image_size``; ``cache_dir="off"``: recompute every spectrogram and decode every frame (no cache)."""
    preset = PRESETS[name]
    if isinstance(frame_side, bool) or not isinstance(frame_side, int) or frame_side < 1:
        raise DataError(f"data.frame_side must be a positive integer (pixels), got {frame_side!r}")
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
    params["format"] = "npy-float16"  # the .pt files of earlier versions live under another key
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    from .avdigits import default_cache
    base = None if cache_dir == "off" else (Path(cache_dir) if cache_dir else default_cache())
    cache = None if base is None else base / f"{name}-spec-{key}"
    frame_key = hashlib.sha256(json.dumps({"fps": preset.fps, "side": frame_side, "format": "npy-uint8-nhwc-1"},
                                          sort_keys=True).encode()).hexdigest()[:12]
    frame_cache = None if base is None else base / f"{name}-frames-{frame_key}"
    n_frames = frames or preset.frames

    def make(part: str, train: bool) -> AVClipDataset:
        return AVClipDataset(root_path, [c for c, _ in rows[part]], [index[lab] for _, lab in rows[part]], preset,
                             train, len(classes), n_frames, image_size, cache, seed=split_seed,
                             frame_cache=frame_cache, frame_side=frame_side)

    full_train, test = make("train", True), make("test", False)
    keep, held = stratified_split(full_train.labels, val_fraction, seed=split_seed)
    val = full_train.subset(held)
    val.train = False  # validation uses the test-time transform
    return DataSplits(full_train.subset(keep), val, test, name=name)
