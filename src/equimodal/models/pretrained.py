"""Pretrained backbones as encoders: a ``timm`` image model or a Hugging Face ``transformers`` model,
built from local files only (nothing is downloaded at run time).

``model.encoder`` names them per modality, with options::

    model:
      encoder:
        visual: {name: "timm:resnet18", checkpoint: /models/resnet18.safetensors, lr_factor: 0.1}
        text:   {name: "hf:/models/distilbert-base-uncased", freeze: true}

- ``timm:<model>``: ``checkpoint`` is a weights file (``.safetensors``, or ``.pth`` / ``.bin`` read with
  ``weights_only=True``) or a folder holding ``model.safetensors`` / ``pytorch_model.bin``, as
  ``timm`` or the Hugging Face hub save them; ``checkpoint: scratch`` builds the architecture with
  random weights. The classifier is dropped (features: ``num_features``), and the input convolution
  is adapted when the data has another channel count than the weights (timm's ``adapt_input_conv``).
  Input: ``C x H x W`` or ``H x W``.
- ``hf:<folder>``: a folder saved by ``save_pretrained`` (``config.json`` and the weights); with
  ``checkpoint: scratch`` only ``config.json`` is read and the weights are random. Input: token ids
  ``T`` made with the model's own tokenizer (for ``reviews``: ``data.tokenizer=<folder>``); the
  features are the mean of the last hidden states over the non-padding positions.
- ``freeze: true`` keeps the backbone's weights (and its normalisation statistics) as loaded;
  ``lr_factor`` multiplies the learning rate of the backbone's parameter group (e.g. 0.1 to
  fine-tune gently); both default to training it like any encoder.

Install with ``pip install 'equimodal[timm]'`` / ``'equimodal[transformers]'``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")


class PretrainedEncoder(nn.Module):
    """A backbone with ``out_dim``, an optional freeze and a learning-rate factor
    (``build_optimizer`` reads ``lr_factor``)."""

    def __init__(self, backbone: nn.Module, out_dim: int, kind: str, freeze: bool = False, lr_factor: float = 1.0,
                 padding_id: int = 0) -> None:
        super().__init__()
        self.backbone, self.out_dim, self.kind = backbone, int(out_dim), kind
        self.frozen, self.lr_factor, self.padding_id = bool(freeze), float(lr_factor), int(padding_id)
        if self.frozen:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "PretrainedEncoder":
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps its normalisation statistics and skips dropout
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "timm":
            if x.dim() == 3:
                x = x.unsqueeze(1)
            return self.backbone(x if x.is_floating_point() else x.float())
        ids = x.long()
        mask = ids != self.padding_id
        mask[~mask.any(1), 0] = True  # a row of padding only: read its first position
        hidden = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        keep = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * keep).sum(1) / keep.sum(1)


def _weights_file(where: str, path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        raise ConfigError(f"{where}: no weights in {p} (looked for {', '.join(WEIGHT_FILES)}); nothing is downloaded "
                          "at run time: save the weights there first, or set checkpoint: scratch for random weights")
    if not p.is_file():
        raise ConfigError(f"{where}: weights file {p} not found; nothing is downloaded at run time: save the weights "
                          "there first, or set checkpoint: scratch for random weights")
    return p


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, else of a ``torch.save`` file read with ``weights_only=True``
    (a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _timm_backbone(where: str, model_name: str, options: dict[str, Any], shape: tuple[int, ...]) -> PretrainedEncoder:
    try:
        import timm
        from timm.models import adapt_input_conv
    except Exception as exc:  # ImportError, or a torchvision that does not match torch
        raise ConfigError(f"{where}: timm:{model_name} needs timm (pip install 'equimodal[timm]'): {exc}") from None
    if len(shape) not in (2, 3):
        raise ConfigError(f"{where}: a timm model reads images C x H x W or H x W, not a sample of shape {shape}")
    channels = shape[0] if len(shape) == 3 else 1
    ckpt = options.get("checkpoint")
    if ckpt is None:
        raise ConfigError(f"{where}: timm:{model_name} needs checkpoint: a local weights file or folder (nothing is "
                          "downloaded at run time), or checkpoint: scratch for random weights")
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=channels)
    except RuntimeError as exc:  # unknown model name
        raise ConfigError(f"{where}: timm cannot build {model_name!r}: {exc}") from None
    if ckpt != "scratch":
        path = _weights_file(where, ckpt)
        state = read_state_dict(path)
        classifier = model.pretrained_cfg.get("classifier", "")
        classifiers = [classifier] if isinstance(classifier, str) else list(classifier)
        state = {k: v for k, v in state.items() if not any(c and k.startswith(c + ".") for c in classifiers)}
        first = model.pretrained_cfg.get("first_conv")
        for conv in ([first] if isinstance(first, str) else list(first or ())):
            key = conv + ".weight"
            if key in state and state[key].shape[1] != channels:
                state[key] = adapt_input_conv(channels, state[key])
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ConfigError(f"{where}: {path} does not hold weights of timm:{model_name} (missing "
                              f"{len(result.missing_keys)} tensors, e.g. {result.missing_keys[:3]})")
    return PretrainedEncoder(model, model.num_features, "timm", options.get("freeze", False),
                             options.get("lr_factor", 1.0))


def _hf_backbone(where: str, folder: str, options: dict[str, Any], shape: tuple[int, ...],
                 decl: dict[str, Any]) -> PretrainedEncoder:
    try:
        from transformers import AutoConfig, AutoModel
    except Exception as exc:
        raise ConfigError(f"{where}: hf:{folder} needs transformers (pip install 'equimodal[transformers]'): "
                          f"{exc}") from None
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"{where}: hf:{folder} must be a local folder saved by save_pretrained (config.json and "
                          "the weights); nothing is downloaded at run time")
    if len(shape) != 1:
        raise ConfigError(f"{where}: a transformers model reads token ids of shape T, not a sample of shape {shape}")
    if options.get("checkpoint") == "scratch":
        model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    else:
        if options.get("checkpoint") not in (None, str(folder)):
            raise ConfigError(f"{where}: an hf: model is read from its folder; checkpoint takes only 'scratch'")
        if not any((path / n).is_file() for n in (*WEIGHT_FILES, "model.safetensors.index.json",
                                                  "pytorch_model.bin.index.json")):
            raise ConfigError(f"{where}: no weights in {path} (model.safetensors or pytorch_model.bin); nothing is "
                              "downloaded at run time: save them there, or set checkpoint: scratch for random weights")
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot load hf:{folder}: {' '.join(str(exc).split())[:300]}") from None
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and decl.get("vocab_size") and int(decl["vocab_size"]) > vocab:
        raise ConfigError(f"{where}: the data's token ids reach {decl['vocab_size']} but hf:{folder} has a vocabulary "
                          f"of {vocab}; tokenize with the model's own tokenizer (data.tokenizer={folder})")
    pad = getattr(model.config, "pad_token_id", None)
    pad = int(decl.get("padding_id", 0)) if pad is None else int(pad)
    return PretrainedEncoder(model, model.config.hidden_size, "hf", options.get("freeze", False),
                             options.get("lr_factor", 1.0), padding_id=pad)


def build_backbone(modality: str, name: str, options: dict[str, Any], shape: tuple[int, ...],
                   decl: dict[str, Any]) -> PretrainedEncoder:
    """The pretrained encoder ``model.encoder`` names for one modality (``timm:...`` or ``hf:...``)."""
    prefix, target = name.split(":", 1)
    where = f"model.encoder.{modality}"
    if prefix == "timm":
        return _timm_backbone(where, target, options, shape)
    return _hf_backbone(where, target, options, shape, decl)
