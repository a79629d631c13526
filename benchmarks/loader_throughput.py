"""Loader throughput on a fake CREMA-D layout, with and without the spectrogram cache.

Builds ``--clips`` fake clips (2.5 s WAV at 16 kHz, one 320x240 JPEG frame) in a temporary folder,
then times full passes over the training split: without the cache (every STFT recomputed, every
WAV decoded and resampled) and with a warmed cache (the state from the second epoch on). Prints
clips per second for each and, last, ``spectrogram cache speed-up: X.XX``.

    python benchmarks/loader_throughput.py [--clips 300] [--passes 2] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from equimodal.data import load_dataset
from equimodal.data.video import write_wav

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


def build_layout(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        clip, emotion = f"{1000 + i}_FAKE_{EMOTIONS[i % 6]}_XX", EMOTIONS[i % 6]
        t = np.arange(int(16000 * 2.5)) / 16000
        write_wav(root / "audio" / f"{clip}.wav", (6000 * np.sin(2 * np.pi * (200 + i) * t)
                                                   + rng.normal(0, 500, t.size)).astype(np.int16), 16000)
        folder = root / "visual" / "Image-01-FPS" / clip
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(folder / "frame_00001.jpg")
        rows.append(f"{clip},{emotion}\n")
    (root / "train.csv").write_text("".join(rows))
    (root / "test.csv").write_text("".join(rows[:6]))


def one_pass(dataset, part: str = "both") -> float:
    start = time.perf_counter()
    for i in range(len(dataset)):
        if part == "audio":
            dataset.spectrogram(dataset.clips[i])
        else:
            dataset[i]
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=300)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cremad"
        build_layout(root, args.clips)
        results = {}
        for label, cache in (("no cache", "off"), ("cache", str(Path(tmp) / "cache"))):
            train = load_dataset("cremad", root=str(root), cache_dir=cache, val_fraction=0.0).train
            if cache != "off":
                one_pass(train, "audio")  # warm the cache, as the first epoch does
            full = min(one_pass(train) for _ in range(args.passes))
            audio = min(one_pass(train, "audio") for _ in range(args.passes))
            results[label] = {"clips_per_s": len(train) / full, "audio_clips_per_s": len(train) / audio}
            print(f"{label:>8}: {results[label]['clips_per_s']:.1f} clips/s (audio + frame), "
                  f"{results[label]['audio_clips_per_s']:.1f} clips/s (spectrogram only)", flush=True)
    ratio = results["cache"]["clips_per_s"] / results["no cache"]["clips_per_s"]
    audio_ratio = results["cache"]["audio_clips_per_s"] / results["no cache"]["audio_clips_per_s"]
    results.update({"clips": args.clips, "speedup": ratio, "audio_speedup": audio_ratio, "python": sys.version.split()[0]})
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"spectrogram-only speed-up: {audio_ratio:.2f}")
    print(f"spectrogram cache speed-up: {ratio:.2f}")


if __name__ == "__main__":
    main()
