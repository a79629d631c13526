"""MBSD: weighted self-distillation from the strong modality to the weak (Liu et al., WSDM 2023). peers.md B16."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.multimodal import ModelOutput
from ._base import Method
from ._registry import register_method

_FORMS = ("standard", "balancemm")


def distillation_terms(logits: torch.Tensor, targets: torch.Tensor, form: str = "standard"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair, per-sample MBSD quantities from an M x B x C stack of unimodal logits.

    For every unordered pair (j, k) of modalities (P = M(M-1)/2 pairs, in ``torch.triu_indices``
    order) and sample i with true-class probabilities p_j = softmax(z_j)[y], p_k: the strong one of
    the pair is the modality with the larger p, the weak one the other, and the weight is
    w = |p_j - p_k| if z_j or z_k ranks y first, else 0.

    ``standard``: w is a constant (detached); the strong logits are a detached teacher;
    kl = KL(softmax(z_strong) || softmax(z_weak)) over the classes and rs = mean_c (z_weak - z_strong)^2.
    ``balancemm``: BalanceBenchmark's ``MBSD_trainer.py`` exactly: nothing is detached (w included);
    kl = F.kl_div(p_s, p_w) on the two true-class probabilities, i.e. p_w (log p_w - p_s)
    (p_s = max, p_w = min, p_s used as if it were a log-probability); rs = mean_c (z_j - z_k)^2 on
    logits for two modalities and mean_c (softmax z_j - softmax z_k)^2 on probabilities for three.

    Returns (w, kl, rs), each P x B.
    """
    if form not in _FORMS:
        raise ValueError(f"form must be one of {list(_FORMS)}, got {form!r}")
    z = logits.float()
    n = z.shape[0]
    if n < 2:
        raise ValueError("MBSD needs at least two modalities")
    logp = z.log_softmax(-1)
    p_true = logp.gather(-1, targets.view(1, -1, 1).expand(n, -1, 1)).squeeze(-1).exp()  # M x B
    right = z.argmax(-1) == targets.view(1, -1)  # M x B
    j, k = torch.triu_indices(n, n, 1, device=z.device)
    pj, pk = p_true[j], p_true[k]
    any_right = (right[j] | right[k]).to(z.dtype)
    if form == "balancemm":
        strong, weak = torch.maximum(pj, pk), torch.minimum(pj, pk)
        w = (strong - weak) * any_right
        kl = F.kl_div(strong, weak, reduction="none")
        if n == 2:
            rs = (z[j] - z[k]).pow(2).mean(-1)
        else:
            rs = (logp[j].exp() - logp[k].exp()).pow(2).mean(-1)
        return w, kl, rs
    w = ((pj - pk).abs() * any_right).detach()
    j_strong = (pj >= pk).unsqueeze(-1)
    teacher = torch.where(j_strong, z[j], z[k]).detach()
    student = torch.where(j_strong, z[k], z[j])
    t_logp = teacher.log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - student.log_softmax(-1))).sum(-1)
    rs = (student - teacher).pow(2).mean(-1)
    return w, kl, rs


@register_method("mbsd")
class MBSD(Method):
    """MBSD (Liu et al., WSDM 2023): unimodal losses plus weighted distillation from the stronger modality to the weak.

    Rule (our notation), per micro-batch of B samples with unimodal logits z_m and p_m = softmax(z_m):
    L = CE(z, y) + sum_m CE(z_m, y) + mean over modality pairs of (1/B) sum_i w_i (KL_i + RS_i),
    where, for a pair and sample i, the strong modality s has the larger p_m[y_i], the weak one w
    the other, w_i = p_s[y_i] - p_w[y_i] when at least one of the two ranks y_i first (else 0),
    KL_i = KL(p_s || p_w) with the strong modality's prediction a detached teacher, and
    RS_i = (1/C) ||z_w - z_s||^2 (squared logit distance, also towards the detached teacher).
    The weight is a constant (detached). For two modalities there is one pair; with M > 2 every
    pair counts once and the pair terms are averaged, which is what the BalanceBenchmark port
    does for three modalities (so this generalises the rule without a new choice).

    Paper: Shilei Liu, Lin Li, Jun Song, Yonghua Yang, Xiaoyi Zeng, "Multimodal Pre-Training with
    Self-Distillation for Product Understanding in E-Commerce", WSDM 2023 (MBSD; its
    self-distillation transfers the dominant modality's knowledge to the weaker one). No official
    code found; port: GeWu-Lab/BalanceBenchmark ``balancemm/trainer/MBSD_trainer.py``, which is where
    the computation above comes from (the paper text was not available to us).

    ``form="standard"`` (default) is our reading of the port as knowledge distillation.
    ``form="balancemm"`` reproduces the port's numbers: nothing detached (the weight and both
    modalities get gradients), its "KL" is ``F.kl_div(p_s, p_w)`` on the two true-class
    probabilities alone, p_w (log p_w - p_s), treating p_s as a log-probability (not a KL
    divergence between distributions), and its squared distance uses logits for two modalities
    but probabilities for three (and, our extension, for more). The port's modulation window (by
    default every epoch) is left out. Unimodal logits come from the model's estimator and must depend on the
    encoders ("exact" or "mask"); the "probe" estimator reads detached features, so the method
    would train nothing but the probes: a named error.

    Extra cost per step: no extra forward or backward pass; a few M x B x C tensor operations.
    Hooks: loss.
    """

    needs_unimodal_logits = True
    min_modalities = 2

    def __init__(self, form: str = "standard") -> None:
        super().__init__()
        if form not in _FORMS:
            raise ValueError(f"form must be one of {list(_FORMS)}, got {form!r}")
        self.form = form

    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if output.estimator == "probe":
            raise ValueError("mbsd trains the encoders through their unimodal logits, but the model's "
                             "estimator is 'probe' (linear heads on detached features); use "
                             "model.estimator 'exact' (concat/sum/late fusion) or 'mask'")
        names = list(output.unimodal_logits)
        terms = super().loss(output, targets)
        for m in names:
            terms[f"ce/{m}"] = F.cross_entropy(output.unimodal_logits[m].float(), targets)
        z = torch.stack([output.unimodal_logits[m] for m in names])
        w, kl, rs = distillation_terms(z, targets, self.form)
        terms["kl"] = (w * kl).mean(-1).mean()
        terms["rs"] = (w * rs).mean(-1).mean()
        return terms
