"""``train.compile``: compile the model's modules in place with ``torch.compile``.

Why in place and per part: the methods read the model through its contract (``encoder(name)``,
``fuse``, ``modalities``) and some switch parts to eval mode or call an encoder alone; an
``OptimizedModule`` wrapper around the whole model would hide those and prefix every checkpoint key
with ``_orig_mod.``. ``nn.Module.compile()`` keeps the module object, its attributes and its
``state_dict`` keys, and compiles only its forward, so the methods' own math (scores, gradient
modulation, their heads) stays outside the compiled graphs.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError


def compiled_parts(model: nn.Module) -> list[nn.Module]:
    """The modules ``compile_model`` compiles: each encoder (from the model contract) and the
    fusion head when the model has one (a ``MultimodalModel``)."""
    parts = [model.encoder(m) for m in model.modalities]
    fusion = getattr(model, "fusion", None)
    if isinstance(fusion, nn.Module):
        parts.append(fusion)
    return parts


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """Compile every part of ``model`` in place (``options`` go to ``torch.compile``); returns the
    same model object, whose ``state_dict`` keys are unchanged."""
    if not hasattr(nn.Module, "compile"):
        import torch
        raise ConfigError(f"train.compile=true needs torch >= 2.2 (nn.Module.compile); this is torch {torch.__version__}")
    import torch._functorch.config as functorch_config
    if hasattr(functorch_config, "donated_buffer"):
        # a method may backpropagate twice through one forward (mmpareto: retain_graph=True);
        # a compiled backward that donates its saved buffers refuses that
        functorch_config.donated_buffer = False
    for part in compiled_parts(model):
        part.compile(**options)
    return model


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place (``nn.Module.compile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None
