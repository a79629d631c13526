"""Text as token ids, with a Hugging Face ``tokenizers`` tokenizer trained on the training split only.

``train_tokenizer(train_texts)`` learns a word-level vocabulary (lower-cased, Unicode-normalised,
split on whitespace and punctuation; words seen fewer than ``min_frequency`` times, and any word
only validation or test hold, are ``[UNK]``); ``encode(tokenizer, texts, max_len)`` gives padded
ids (``[PAD]`` is id 0), the input of the ``tokens`` kind (``TokenTransformer``). A tokenizer is one
JSON text (``tokenizer.to_str()``), saved with a run as ``data/tokenizer.json``; a pretrained
model's own ``tokenizer.json`` can be used instead (``load_tokenizer``). Nothing is downloaded.
Needs ``pip install 'equimodal[text]'``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..errors import ConfigError, DataError

PAD, UNK = "[PAD]", "[UNK]"
PAD_TOKENS = (PAD, "<pad>", "[pad]")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("text data needs Hugging Face tokenizers: pip install 'equimodal[text]'") from None
    return tokenizers


def train_tokenizer(texts: Iterable[str], vocab_size: int = 20000, min_frequency: int = 2) -> Any:
    """A word-level ``tokenizers.Tokenizer`` fitted on ``texts`` (give the training split only)."""
    tk = _tokenizers()
    from tokenizers import models, normalizers, pre_tokenizers, trainers
    tokenizer = tk.Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, UNK],
                                        show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer)
    return tokenizer


def tokenizer_from_json(text: str, where: str = "tokenizer.json") -> Any:
    tk = _tokenizers()
    try:
        return tk.Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises its own Exception type for a bad file
        raise DataError(f"{where}: not a tokenizers JSON file ({' '.join(str(exc).split())[:200]})") from None


def load_tokenizer(path: str | Path) -> Any:
    """A saved tokenizer: a ``tokenizer.json`` file, or a folder holding one (a pretrained model's)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"{p}: no tokenizer.json there (a pretrained model saved with save_pretrained has one)")
    return tokenizer_from_json(p.read_text(encoding="utf-8"), str(p))


def padding_id(tokenizer: Any) -> int:
    """The id of the tokenizer's padding token (``[PAD]``/``<pad>``), else 0."""
    for token in PAD_TOKENS:
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0


def encode(tokenizer: Any, texts: Sequence[str], max_len: int) -> torch.Tensor:
    """``len(texts) x max_len`` int32 token ids, cut at ``max_len`` and padded with the padding id."""
    pad = padding_id(tokenizer)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len)
    rows = [enc.ids + [pad] * (max_len - len(enc.ids)) for enc in tokenizer.encode_batch(list(texts))]
    return torch.tensor(rows, dtype=torch.int32).reshape(len(texts), max_len)
