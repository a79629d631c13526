"""OGM-boost: strengthen the weak modality's gradient instead of weakening the strong one's; docs/methods.md, "ogm-boost"."""
from __future__ import annotations

import torch

from ._registry import register_method
from ._scores import ogm_coefficients
from .ogm_ge import OGMGE

_MODES = ("boost", "suppress", "both", "fixed")
_NOISES = ("none", "ge", "sgn")


def boost_coefficients(ratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """k_w = 1 + tanh(alpha * (1/rho_w - 1)) where rho_w < 1, else 1 (bounded in [1, 2))."""
    inv = 1.0 / ratios.clamp_min(torch.finfo(ratios.dtype).tiny)
    return torch.where(ratios < 1, 1 + torch.tanh(alpha * (inv - 1)), torch.ones_like(ratios))


@register_method("ogm-boost")
class OGMBoost(OGMGE):
    """OGM-boost (ours, docs/methods.md): raise the weak modality's encoder gradients instead of damping the strong.

    Same scores and ratios as OGM-GE. ``mode``: ``boost`` (k_w = 1 + tanh(alpha (1/rho_w - 1)) for
    rho_w < 1, others 1), ``suppress`` (OGM's k, for comparison), ``both`` (the dominant damped by
    OGM's k, the weak boosted), ``fixed`` (weak modalities' gradients times ``fixed_factor``, as the
    authors' TPAMI code's ``--use_OGM_plus`` with 4). ``noise``: ``none``; ``ge`` (N(0, std(g)^2)
    on every encoder, as OGM-GE); ``sgn`` (stochastic-gradient noise where the boost acts only:
    (k_u - 1) * N(0, (beta std(g))^2), so zero where k_u <= 1). Other options as ``ogm-ge``
    (params, window, level). With N > 2 modalities every modality with rho < 1 is boosted by its
    own rho. Hooks: those of ``ogm-ge``.
    """

    #: what ``bench --tune`` tries (the default first)
    search_space = {"alpha": (0.8, 0.1, 0.3, 0.5)}

    def __init__(self, alpha: float = 0.8, mode: str = "boost", noise: str = "none", beta: float = 1.0,
                 fixed_factor: float = 4.0, params: str = "conv", modulation_starts: int = 0,
                 modulation_ends: int = 50, level: str = "gradient") -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
        if noise not in _NOISES:
            raise ValueError(f"noise must be one of {list(_NOISES)}, got {noise!r}")
        if beta < 0 or fixed_factor < 1:
            raise ValueError(f"beta must be >= 0 and fixed_factor >= 1; got beta={beta}, fixed_factor={fixed_factor}")
        # options that would be accepted but change nothing are refused, so a grid never runs a no-op
        if noise == "sgn" and mode == "suppress":
            raise ValueError("noise='sgn' adds noise only where a gradient is boosted (k > 1), and mode='suppress' "
                             "boosts nothing: use noise='ge' or another mode")
        if beta != 1.0 and noise != "sgn":
            raise ValueError(f"beta={beta} scales only noise='sgn'; with noise={noise!r} it has no effect")
        if fixed_factor != 4.0 and mode != "fixed":
            raise ValueError(f"fixed_factor={fixed_factor} applies only to mode='fixed'; with mode={mode!r} it has no effect")
        super().__init__(alpha=alpha, params=params, modulation_starts=modulation_starts,
                         modulation_ends=modulation_ends, level=level, ge=noise != "none")
        self.mode, self.noise, self.beta, self.fixed_factor = mode, noise, float(beta), float(fixed_factor)

    def coefficients(self, ratios: torch.Tensor) -> torch.Tensor:
        if self.mode == "suppress":
            return ogm_coefficients(ratios, self.alpha)
        if self.mode == "fixed":
            return torch.where(ratios < 1, torch.full_like(ratios, self.fixed_factor), torch.ones_like(ratios))
        boost = boost_coefficients(ratios, self.alpha)
        return boost * ogm_coefficients(ratios, self.alpha) if self.mode == "both" else boost

    def noise_scales(self, k: torch.Tensor) -> torch.Tensor | None:
        if self.noise == "none":
            return None
        if self.noise == "ge":
            return torch.ones_like(k)
        return self.beta * (k - 1).clamp_min(0)  # sgn: only where the boost acts
