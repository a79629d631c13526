"""Audio decoding and spectrograms with the standard library and torch only (no torchaudio)."""
from __future__ import annotations

import math
import os
import struct
import wave
from pathlib import Path

import numpy as np
import torch
from .base import describe
from ..errors import DataError, DataNotFoundError


#: sample rates outside this range (Hz) come from a corrupt header, not from audio
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000
#: the data-chunk size streaming writers (ffmpeg to a pipe) leave in the header: "until the end of the file"
_UNKNOWN_SIZE = 0xFFFFFFFF


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """Mono float32 waveform in [-1, 1] and its sample rate, from a PCM WAV file.

    Uses the standard library's ``wave`` (8/16/32-bit integer PCM); multi-channel audio is averaged.
    Anything it cannot read raises ``DataError`` ("<path>: <what is wrong>"): not a WAV, a non-PCM or
    unsupported format, no samples, a sample rate outside [1 kHz, 768 kHz] (a corrupt header), or a
    data chunk shorter than its header says (a truncated file). A header with the streaming
    placeholder size 0xFFFFFFFF reads every whole frame up to the end of the file.
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with wave.open(str(path), "rb") as fh:
            rate, channels, width, frames = fh.getframerate(), fh.getnchannels(), fh.getsampwidth(), fh.getnframes()
            frame_size = max(1, channels * width)
            streaming = frames >= _UNKNOWN_SIZE // frame_size
            raw = fh.readframes(min(frames, size // frame_size + 1))  # never ask for more than the file holds
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: WAV file not found") from None
    except RuntimeError:  # what wave raises when a chunk's size runs past the end of the file
        raise DataError(f"{path}: cannot read WAV file: a chunk runs past the end of the file") from None
    except (wave.Error, EOFError, OSError, struct.error, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: cannot read WAV file: {describe(exc)}") from None
    dtypes = {1: np.uint8, 2: np.int16, 4: np.int32}
    if width not in dtypes:
        raise DataError(f"{path}: cannot read WAV file: unsupported sample width {width} bytes")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise DataError(f"{path}: sample rate {rate} Hz is outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz "
                        "(corrupt WAV header)")
    whole = len(raw) - len(raw) % frame_size
    if whole < frames * frame_size and not streaming:
        raise DataError(f"{path}: truncated WAV file: the header says {frames} frames, the file holds "
                        f"{len(raw) // frame_size}")
    data = np.frombuffer(raw[:whole], dtype=dtypes[width]).astype(np.float32)
    if width == 1:
        data = (data - 128.0) / 128.0
    else:
        data /= float(2 ** (8 * width - 1))
    if channels > 1:
        data = data.reshape(-1, channels).mean(1)
    if data.size == 0:
        raise DataError(f"{path}: WAV file holds no samples")
    return torch.from_numpy(data.copy()), rate


def fix_length(wave_: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad at the end or crop centrally to ``length`` samples."""
    n = wave_.shape[-1]
    if n >= length:
        start = (n - length) // 2
        return wave_[..., start:start + length]
    return torch.nn.functional.pad(wave_, (0, length - n))


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """Triangular mel filters (HTK mel scale), shape n_mels x (n_fft // 2 + 1)."""
    f_max = f_max or sample_rate / 2
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    points = torch.linspace(mel(f_min), mel(f_max), n_mels + 2)
    hz = 700.0 * (10 ** (points / 2595.0) - 1.0)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs - lower) / (centre - lower)
    down = (upper - freqs) / (upper - centre)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def log_mel_spectrogram(waves: torch.Tensor, sample_rate: int, n_fft: int = 256, hop: int = 128, n_mels: int = 40,
                        eps: float = 1e-6) -> torch.Tensor:
    """log(mel power + eps) of a batch of waveforms (B x T) -> B x n_mels x frames, via ``torch.stft``
    with a Hann window of ``n_fft`` samples, centred frames."""
    window = torch.hann_window(n_fft)
    spec = torch.stft(waves, n_fft=n_fft, hop_length=hop, win_length=n_fft, window=window, center=True,
                      return_complex=True).abs() ** 2
    mel = mel_filterbank(n_fft, n_mels, sample_rate) @ spec
    return torch.log(mel + eps)


def log_stft_spectrogram(waves: torch.Tensor, n_fft: int = 512, hop: int = 353, eps: float = 1e-7) -> torch.Tensor:
    """log(|STFT| + eps), B x (n_fft/2 + 1) x frames (the OGM-GE CREMA-D preprocessing: n_fft 512, hop 353)."""
    window = torch.hann_window(n_fft)
    spec = torch.stft(waves, n_fft=n_fft, hop_length=hop, win_length=n_fft, window=window, center=True,
                      return_complex=True).abs()
    return torch.log(spec + eps)
