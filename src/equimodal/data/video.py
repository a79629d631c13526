"""Extract frames and audio from original videos with PyAV (no system ffmpeg needed).

Writes the layout the paper-dataset loaders read (see ``avclips``):
``OUT/visual/Image-{fps:02d}-FPS/<clip>/frame_00001.jpg ...`` and ``OUT/audio/<clip>.wav`` (mono,
16-bit, ``sample_rate``). PyAV is an optional dependency: ``pip install "equimodal[video]"``.
"""
from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from .._progress import show_progress
from ..errors import DataError, DataNotFoundError

VIDEO_SUFFIXES = (".mp4", ".flv", ".avi", ".mkv", ".webm", ".mov")


def _import_av():
    try:
        import av
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("extracting frames and audio needs PyAV: pip install 'equimodal[video]'") from None
    return av


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM WAV from int16 samples (atomic write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".wav.tmp")
    with wave.open(str(tmp), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(samples.astype("<i2").tobytes())
    os.replace(tmp, path)


def extract_clip(video: Path, out: Path, fps: int = 1, sample_rate: int = 22050, audio: bool = True) -> tuple[int, int]:
    """Frames at ``fps`` (the first frame at or after each 1/fps instant) and the audio track.

    Returns (frames written, audio samples written). Raises ``ValueError`` naming the file when it
    cannot be decoded or lacks a video (or, with ``audio=True``, an audio) stream."""
    av = _import_av()
    clip = video.stem
    try:
        container = av.open(str(video))
    except Exception as exc:  # PyAV raises several error types (av.error.*)
        raise DataError(f"cannot open video {video}: {exc}") from None
    with container:
        if not container.streams.video:
            raise DataError(f"{video} has no video stream")
        if audio and not container.streams.audio:
            raise DataError(f"{video} has no audio stream (pass audio=False / --no-audio and provide WAVs)")
        frame_dir = out / "visual" / f"Image-{fps:02d}-FPS" / clip
        frame_dir.mkdir(parents=True, exist_ok=True)
        n_frames, next_time = 0, 0.0
        try:
            for frame in container.decode(video=0):
                t = float(frame.time) if frame.time is not None else n_frames / fps
                if t + 1e-6 >= next_time:
                    n_frames += 1
                    frame.to_image().save(frame_dir / f"frame_{n_frames:05d}.jpg", quality=95)
                    next_time += 1.0 / fps
        except Exception as exc:
            raise DataError(f"cannot decode the video stream of {video}: {exc}") from None
        if n_frames == 0:
            raise DataError(f"{video}: no frame decoded")
        n_samples = 0
        if audio:
            container.seek(0)
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            chunks = []
            try:
                for frame in container.decode(audio=0):
                    for out_frame in resampler.resample(frame):
                        chunks.append(out_frame.to_ndarray().reshape(-1))
                for out_frame in resampler.resample(None):
                    chunks.append(out_frame.to_ndarray().reshape(-1))
            except Exception as exc:
                raise DataError(f"cannot decode the audio stream of {video}: {exc}") from None
            samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
            if samples.size == 0:
                raise DataError(f"{video}: the audio stream is empty")
            write_wav(out / "audio" / f"{clip}.wav", samples, sample_rate)
            n_samples = int(samples.size)
    return n_frames, n_samples


def prepare_clips(videos: str | Path, out: str | Path, fps: int = 1, sample_rate: int = 22050, audio: bool = True,
                  skip_bad: bool = False, progress: bool = True) -> dict[str, int]:
    """Extract every video in ``videos`` (recursively) into ``out``. Returns counts
    {"clips": ..., "skipped": ...}; a bad video stops the run unless ``skip_bad``, which counts it."""
    videos, out = Path(videos), Path(out)
    files = sorted(p for p in videos.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise DataNotFoundError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {videos}")
    done, skipped = 0, []
    for path in tqdm(files, desc="extract frames and audio", disable=not show_progress(progress)):
        try:
            extract_clip(path, out, fps=fps, sample_rate=sample_rate, audio=audio)
            done += 1
        except ValueError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable video(s); first: {skipped[0]}")
    return {"clips": done, "skipped": len(skipped)}
