"""Small helpers for methods that own heads: seeded construction and re-initialisation."""
from __future__ import annotations

import torch
from torch import nn


def encoder_dims(model: nn.Module, method_name: str) -> dict[str, int]:
    """``out_dim`` of each encoder (methods that build heads need it); a named error if missing."""
    dims = {}
    for m in model.modalities:
        dim = getattr(model.encoder(m), "out_dim", None)
        if dim is None:
            raise TypeError(f"{method_name}: encoder {m!r} has no 'out_dim'; the method's heads need it")
        dims[m] = int(dim)
    return dims


def reset_module(module: nn.Module, seed: int) -> None:
    """Re-initialise every submodule that has ``reset_parameters`` (BatchNorm statistics included),
    from ``seed`` without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()


def seeded(build, seed: int) -> nn.Module:
    """Build a module with a seeded initialisation that leaves the global random state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def linear_heads(model: nn.Module, method_name: str, seed: int, bias: bool = True) -> nn.ModuleDict:
    """One seeded linear classifier per modality on that encoder's features (the heads many methods
    own: unimodal losses, teachers, learners), built without touching the global random state."""
    dims, classes = encoder_dims(model, method_name), int(model.num_classes)
    return seeded(lambda: nn.ModuleDict({m: nn.Linear(d, classes, bias=bias) for m, d in dims.items()}), seed)
