"""Encoders: map one modality's input to a feature vector. Each exposes ``out_dim``."""
from __future__ import annotations

import torch
from torch import nn


NORMS = ("batch", "group", "none")


def norm_layer(kind: str, channels: int, dims: int = 2) -> nn.Module:
    """``batch``: BatchNorm (the default); ``group``: GroupNorm with one group per sample (statistics
    of one sample only, so a data-parallel run equals one process exactly); ``none``."""
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if kind == "group":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {list(NORMS)}")


class SmallCNN(nn.Module):
    """A three-block 2-D CNN for small images or spectrograms (input B x C x H x W).

    Conv -> BatchNorm -> ReLU blocks with max pooling, then global average pooling, so any input
    size of at least 8x8 works. Sized for the CPU: about 25k parameters at width 32.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, out_dim: int = 64, norm: str = "batch") -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width // 2, 3, padding=1, bias=False),
            norm_layer(norm, width // 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width // 2, width, 3, padding=1, bias=False),
            norm_layer(norm, width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, out_dim, 3, padding=1, bias=False),
            norm_layer(norm, out_dim),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    #: the smallest height and width the two 2x2 poolings leave at least one value of
    MIN_SIZE = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # B x H x W -> add the channel axis
            x = x.unsqueeze(1)
        if not x.is_floating_point():  # uint8 images, bool masks
            x = x.float()
        return self.net(x)


class MLPEncoder(nn.Module):
    """Two-layer MLP for vector inputs (e.g. tabular views). Has no convolution weights, so
    OGM's paper default (``params="conv"``) finds nothing to modulate here: use ``params="all"``."""

    def __init__(self, in_dim: int, hidden: int = 128, out_dim: int = 64, norm: str = "batch") -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), norm_layer(norm, hidden, dims=1), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.net(x if x.is_floating_point() else x.float())


class CNN1d(nn.Module):
    """A three-block 1-D CNN for channels x time (input B x C x T, or B x T for one channel):
    sensor windows, raw waveforms.

    The first convolution strides so that about 128 steps remain (a 1 s waveform at 8 kHz: stride
    62), then two conv -> norm -> ReLU -> max-pool blocks (a pool only where at least two steps are
    left, so any length of 1 or more works) and global average pooling over time.
    """

    def __init__(self, in_channels: int = 1, length: int | None = None, width: int = 32, out_dim: int = 64,
                 norm: str = "batch") -> None:
        super().__init__()
        self.out_dim = out_dim
        stride = max(1, (length or 0) // 128)
        kernel = max(5, 2 * stride + 1)
        steps = length if length is not None else 1 << 30
        steps = (steps + 2 * (kernel // 2) - kernel) // stride + 1

        def pool() -> nn.Module:
            nonlocal steps
            if steps < 2:
                return nn.Identity()
            steps //= 2
            return nn.MaxPool1d(2)

        self.net = nn.Sequential(
            nn.Conv1d(in_channels, width // 2, kernel, stride=stride, padding=kernel // 2, bias=False),
            norm_layer(norm, width // 2, dims=1), nn.ReLU(inplace=True), pool(),
            nn.Conv1d(width // 2, width, 3, padding=1, bias=False),
            norm_layer(norm, width, dims=1), nn.ReLU(inplace=True), pool(),
            nn.Conv1d(width, out_dim, 3, padding=1, bias=False),
            norm_layer(norm, out_dim, dims=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # B x T -> one channel
            x = x.unsqueeze(1)
        return self.net(x if x.is_floating_point() else x.float())


class TokenTransformer(nn.Module):
    """Token ids (B x T integers, padded with ``padding_id``) -> embedding + learned positions -> a
    small ``torch.nn.TransformerEncoder`` -> mean over the non-padding positions.

    Ids outside ``[0, vocab_size)`` share one extra "unknown" embedding row (validation or test data
    may hold ids the training split never did); a sequence of padding only attends to its first
    position, so it gives a finite feature instead of NaN. Longer sequences than ``max_len`` are cut;
    trailing columns that are padding in every sequence of the batch are dropped before the encoder
    (the same result, masked positions never reach the others, for less work on short texts).
    """

    def __init__(self, vocab_size: int, max_len: int, padding_id: int = 0, width: int = 32, out_dim: int = 64,
                 layers: int = 2, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if not 0 <= padding_id < vocab_size:
            raise ValueError(f"padding_id {padding_id} must lie in [0, vocab_size={vocab_size})")
        self.out_dim, self.vocab_size, self.max_len, self.padding_id = out_dim, int(vocab_size), int(max_len), int(padding_id)
        d = max(heads * 4, (2 * width) // heads * heads)
        self.embed = nn.Embedding(self.vocab_size + 1, d, padding_idx=self.padding_id)
        self.position = nn.Embedding(self.max_len, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Sequential(nn.Linear(d, out_dim), nn.ReLU(inplace=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()[:, :self.max_len]
        pad = ids == self.padding_id
        used = (~pad).any(0).nonzero()
        if used.numel() and int(used.max()) + 1 < ids.shape[1]:  # drop trailing columns of padding only
            ids, pad = ids[:, :int(used.max()) + 1], pad[:, :int(used.max()) + 1]  # (exact: they are masked)
        ids = ids.masked_fill((ids < 0) | (ids >= self.vocab_size), self.vocab_size)
        pad[pad.all(1), 0] = False
        h = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.proj((h * keep).sum(1) / keep.sum(1))


def embedding_size(cardinality: int) -> int:
    """Width of one categorical column's embedding (fast.ai's rule of thumb, at most 16 here)."""
    return max(2, min(16, round(1.6 * cardinality ** 0.56)))


class TabularEncoder(nn.Module):
    """One table row as one modality: ``x = [codes of the categorical columns..., numbers...]``
    (float, B x (len(categories) + numeric)), as ``equimodal.data.table.TableCodec`` writes it.

    Each categorical column has its own embedding (``categories[i]`` codes; code 0 is "unknown or
    missing", as is any code out of range); the embeddings and the (already standardised) numbers
    go through a two-layer MLP.
    """

    def __init__(self, categories: list[int] | tuple[int, ...], numeric: int, width: int = 32, out_dim: int = 64,
                 norm: str = "batch") -> None:
        super().__init__()
        self.out_dim, self.categories, self.numeric = out_dim, [int(c) for c in categories], int(numeric)
        self.embeddings = nn.ModuleList(nn.Embedding(c, embedding_size(c)) for c in self.categories)
        in_dim = sum(e.embedding_dim for e in self.embeddings) + self.numeric
        self.mlp = MLPEncoder(in_dim, hidden=4 * width, out_dim=out_dim, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.categories)
        parts = []
        for i, emb in enumerate(self.embeddings):
            codes = x[:, i].long()
            parts.append(emb(codes.masked_fill((codes < 0) | (codes >= self.categories[i]), 0)))
        parts.append(x[:, k:k + self.numeric].float())
        return self.mlp(torch.cat(parts, dim=1))


from .resnet import AudioResNet18, VisualResNet18  # noqa: E402

ENCODERS = {"cnn": SmallCNN, "cnn1d": CNN1d, "mlp": MLPEncoder, "transformer": TokenTransformer,
            "tabular": TabularEncoder, "resnet18-audio": AudioResNet18, "resnet18-visual": VisualResNet18}
