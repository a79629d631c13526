"""Audio decoding and spectrograms with the standard library and torch only (no torchaudio)."""
from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import torch
from ..errors import DataError


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """Mono float32 waveform in [-1, 1] and its sample rate, from a PCM WAV file.

    Uses the standard library's ``wave`` (8/16/32-bit integer PCM); multi-channel audio is averaged.
    Raises ``ValueError`` naming the file for anything it cannot read.
    """
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as fh:
            rate, channels, width, frames = fh.getframerate(), fh.getnchannels(), fh.getsampwidth(), fh.getnframes()
            raw = fh.readframes(frames)
    except (wave.Error, EOFError, OSError) as exc:
        raise DataError(f"cannot read WAV file {path}: {exc}") from None
    dtypes = {1: np.uint8, 2: np.int16, 4: np.int32}
    if width not in dtypes:
        raise DataError(f"cannot read WAV file {path}: unsupported sample width {width} bytes")
    data = np.frombuffer(raw, dtype=dtypes[width]).astype(np.float32)
    if width == 1:
        data = (data - 128.0) / 128.0
    else:
        data /= float(2 ** (8 * width - 1))
    if channels > 1:
        data = data.reshape(-1, channels).mean(1)
    if data.size == 0:
        raise DataError(f"WAV file {path} holds no samples")
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
