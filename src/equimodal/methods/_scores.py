"""Pure, vectorised building blocks of the OGM family (docs/methods.md, "ogm, ogm-ge": scores, ratios, coefficients)."""
from __future__ import annotations

import torch


def true_class_scores(unimodal_logits: dict[str, torch.Tensor], targets: torch.Tensor,
                      modalities: tuple[str, ...] | None = None) -> torch.Tensor:
    """s_u = sum over the batch of softmax(z_u)[i, y_i], for every modality at once (N-vector).

    Computed in float32 from detached logits with one softmax over an N x B x C stack and a gather.
    """
    names = modalities if modalities is not None else tuple(unimodal_logits)
    z = torch.stack([unimodal_logits[m].detach().float() for m in names])  # N x B x C
    p = z.softmax(dim=-1)
    idx = targets.view(1, -1, 1).expand(len(names), -1, 1)
    return p.gather(-1, idx).squeeze(-1).sum(dim=1)


#: N-modality ratio rules (peers.md B0); all equal the paper's s_a / s_v for two modalities
RATIO_RULES = ("mean", "min", "pairwise")


def discrepancy_ratios(scores: torch.Tensor, rule: str = "mean") -> torch.Tensor:
    """rho_u = s_u / mean_{v != u} s_v (``mean``, ours; for two modalities: s_a / s_v and s_v / s_a,
    the paper's); ``min``: s_u / min_v s_v (BalanceMM's first variant: the weakest gets 1);
    ``pairwise``: mean over v != u of s_u / s_v (BalanceMM's second variant, without its bug of
    averaging only the last modality)."""
    n = scores.numel()
    if n < 2:
        raise ValueError("a discrepancy ratio needs at least two modalities")
    tiny = torch.finfo(scores.dtype).tiny
    if rule == "mean":
        others_mean = (scores.sum() - scores) / (n - 1)
        return scores / others_mean.clamp_min(tiny)
    if rule == "min":
        return scores / scores.min().clamp_min(tiny)
    if rule == "pairwise":
        inverse_others = (1 / scores.clamp_min(tiny)).sum() - 1 / scores.clamp_min(tiny)
        return scores * inverse_others / (n - 1)
    raise ValueError(f"unknown ratio rule {rule!r}; choose one of {list(RATIO_RULES)}")


def ogm_coefficients(ratios: torch.Tensor, alpha: float, form: str = "paper") -> torch.Tensor:
    """k_u = 1 - tanh(alpha * rho_u) where rho_u > 1, else 1 (paper Eq. 10, official code).

    ``form="continuous"``: k_u = 1 - tanh(alpha * relu(rho_u - 1)) (briefly in the official code,
    2022), which has no jump at rho = 1. At an exact tie (rho = 1) neither form damps anything;
    the official code damps audio there.
    """
    if form == "paper":
        return torch.where(ratios > 1, 1 - torch.tanh(alpha * ratios), torch.ones_like(ratios))
    if form == "continuous":
        return 1 - torch.tanh(alpha * torch.relu(ratios - 1))
    raise ValueError(f"unknown coefficient form {form!r}; choose 'paper' or 'continuous'")


def trace_means(trace: torch.Tensor | None, modalities: tuple[str, ...], prefixes: tuple[str, ...]) -> dict[str, float]:
    """Per-epoch means of per-modality figures accumulated as rows [f1_1..f1_N, f2_1..f2_N, ..., count]
    (one row per step); ``prefixes`` name the blocks: ("rho", "k") -> {"rho/audio": ..., "k/audio": ...}."""
    if trace is None:
        return {}
    n = len(modalities)
    t = (trace[:-1] / trace[-1]).tolist()
    return {f"{prefix}/{m}": t[b * n + i] for b, prefix in enumerate(prefixes) for i, m in enumerate(modalities)}
