"""MMPareto: Pareto integration of multimodal and unimodal gradients (peers.md B6)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dist
from ..models.multimodal import ModelOutput
from ._base import Method, unwrap
from ._heads import linear_heads
from ._registry import register_method


def min_norm_weight(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """c in [0, 1] minimising ||c g1 + (1 - c) g2||^2 (flat vectors), as the official two-task solver:
    c = (g2 - g1).g2 / ||g1 - g2||^2, with its edge cases g1.g2 >= g1.g1 -> 0.999 and
    g1.g2 >= g2.g2 -> 0.001 (only reached when cos <= 0 if a gradient is zero). No other clipping."""
    v11, v12, v22 = g1 @ g1, g1 @ g2, g2 @ g2
    c = (v22 - v12) / (v11 + v22 - 2 * v12).clamp_min(torch.finfo(g1.dtype).tiny)
    return torch.where(v12 >= v11, c.new_tensor(0.999), torch.where(v12 >= v22, c.new_tensor(0.001), c))


def pareto_gradients(g_mm: list[torch.Tensor], g_uni: list[torch.Tensor], gamma: float = 1.5,
                     rescale: bool = True) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The MMPareto update of one encoder from its per-tensor gradients of L_mm and L_m.

    cos over the flattened encoder gradient; c = 1/2 if cos > 0, else ``min_norm_weight``;
    d = 2c g_mm + 2(1 - c) g_uni; per tensor, d is scaled up to ||g_mm + g_uni|| when its norm is
    smaller (``rescale``; a zero d stays zero); then times ``gamma``. Returns (new grads, cos, c).
    """
    a = torch.cat([g.flatten() for g in g_mm]).float()
    b = torch.cat([g.flatten() for g in g_uni]).float()
    cos = F.cosine_similarity(a, b, dim=0)
    c = torch.where(cos > 0, cos.new_tensor(0.5), min_norm_weight(a, b))
    out = []
    for gm, gu in zip(g_mm, g_uni):
        d = 2 * c.to(gm.dtype) * gm + 2 * (1 - c.to(gm.dtype)) * gu
        if rescale:
            plain, norm = torch.linalg.vector_norm(gm + gu), torch.linalg.vector_norm(d)
            d = d * torch.where(norm > 0, (plain / norm.clamp_min(torch.finfo(d.dtype).tiny)).clamp_min(1.0),
                                torch.ones_like(norm))
        out.append(d * gamma)
    return out, cos, c


@register_method("mmpareto")
class MMPareto(Method):
    """MMPareto (Wei & Hu, ICML 2024): add unimodal-head losses, merge their encoder gradients by a Pareto rule.

    Losses: L_mm = CE(fused logits), L_m = CE(head_m(h_m)) with a linear head per modality owned by
    the method. Per encoder m, g_mm and g_m are its gradients of L_mm and of L_m, from separate
    backward passes: ``loss`` takes g_m = autograd.grad(L_m, encoder-m parameters) and the loop's
    backward of the summed loss gives g_mm + g_m, so ``before_step`` forms g_mm = total - g_m. If
    cos(g_mm, g_m) > 0 (flattened encoder gradient) the weights are (1/2, 1/2), else the two-task
    min-norm solution c = (g_m - g_mm).g_m / ||g_mm - g_m||^2 on g_mm (not clipped; the solver's
    edge cases 0.999 / 0.001 only when a gradient is zero); d = 2c g_mm + 2(1 - c) g_m, per
    parameter tensor scaled up to ||g_mm + g_m|| when smaller, then times gamma. The fusion head and
    the method's heads keep the plain summed gradient.

    Paper: Wei & Hu, ICML 2024, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
    Assistance". Official code: GeWu-Lab/MMPareto_ICML2024 (``code/MMPareto.py``); its training
    defaults are SGD lr 2e-3, momentum 0.9, weight decay 1e-4, batch 64, 50 epochs, StepLR(30, 0.1)
    (trainer settings, not options here).

    Options: gamma (1.5, the official code's), rescale (True: scale d up to the plain gradient's norm).

    Departures: any number of modalities (the rule is per encoder; the code has two); parameters
    are chosen through the model contract (encoder_parameters / everything else), not by name
    substrings; the per-tensor rescale leaves a zero d at zero (the code divides by zero). Unlike
    the BalanceMM port, g_m and g_mm really come from separate backward passes (the port captures
    both after one backward, so its cosine is always 1), and unimodal logits come from separate
    heads, not slices of the fusion head. g_m is captured with the scale the loop's backward gives
    the L_m term (1/accumulate in our trainer), so a loop that scales the loss and unscales the
    gradients afterwards (an fp16 GradScaler) is not supported; bf16 autocast is. Under
    torch.distributed the captured g_m are averaged across ranks (one all-reduce) and the heads'
    gradients are averaged. Per-modality accuracy is reported from the model's estimator, as for
    every method, not from the method's heads.

    Cost per micro-batch: M extra partial backward passes (L_m through encoder m only), one copy
    of the encoder gradients in memory. Hooks: setup, loss, before_step, log.
    """

    modifies_gradients = True
    min_modalities = 2

    #: what ``bench --tune`` tries (the default first)
    search_space = {"gamma": (1.5, 1.0, 2.0, 3.0)}

    def __init__(self, gamma: float = 1.5, rescale: bool = True) -> None:
        super().__init__()
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma <= 0:
            raise ValueError(f"gamma must be a number > 0, got {gamma!r}")
        if not isinstance(rescale, bool):
            raise ValueError(f"rescale must be true or false, got {rescale!r}")
        self.gamma, self.rescale = float(gamma), rescale
        self.heads: nn.ModuleDict | None = None
        self._modalities: tuple[str, ...] = ()
        self._params: dict[str, list[nn.Parameter]] = {}
        self._uni: dict[str, list[torch.Tensor]] | None = None  # scaled g_m since the last step
        self._trace: torch.Tensor | None = None  # [sum cos, sum c, conflicts (cos <= 0), steps]
        self.last_cosines: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        inner = unwrap(model)
        self._modalities = tuple(inner.modalities)
        self._params = {m: [p for p in inner.encoder_parameters(m) if p.requires_grad] for m in self._modalities}
        if self.heads is None:
            self.heads = linear_heads(inner, self.name, self.seed + 17)
        self.attach_parameters(model, optimizer)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.heads is None else list(self.heads.parameters())

    # --- per micro-batch -----------------------------------------------------------------
    def loss(self, output: ModelOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = super().loss(output, targets)
        training = output.logits.requires_grad and torch.is_grad_enabled()
        for m in self._modalities:
            term = F.cross_entropy(self.heads[m](output.features[m]).float(), targets)
            terms[f"ce/{m}"] = term
            params = self._params[m]
            if training and params and term.requires_grad:
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
                term.register_hook(self._capture(m, grads))
        return terms

    def _capture(self, m: str, grads: list[torch.Tensor]):
        """A hook on the L_m term: when the loop's backward reaches it with d(objective)/dL_m = s
        (1/accumulate in our trainer), add s * grad(L_m) to g_m, in the same scale as ``.grad``."""
        def hook(s: torch.Tensor) -> None:
            if self._uni is None:
                self._uni = {}
            scaled = [g * s.to(g.dtype) for g in grads]
            if m in self._uni:
                torch._foreach_add_(self._uni[m], scaled)
            else:
                self._uni[m] = scaled
        return hook

    # --- per optimizer step --------------------------------------------------------------
    def before_step(self, model: nn.Module) -> None:
        _dist.average_gradients(self.parameters())  # the method's own heads live outside the DDP wrapper
        uni, self._uni = self._uni, None
        if not uni:
            return
        if _dist.world_size() > 1:  # the local g_m, averaged like DDP averages .grad (one all-reduce)
            names = [m for m in self._modalities if m in uni]
            flat = _dist.all_reduce_sum(torch.cat([g.flatten() for m in names for g in uni[m]])) / _dist.world_size()
            offset = 0
            for m in names:
                views = []
                for g in uni[m]:
                    views.append(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
                uni[m] = views
        cos = torch.ones(len(self._modalities))
        c = torch.full((len(self._modalities),), 0.5)
        for i, m in enumerate(self._modalities):
            if m not in uni:
                continue
            params = self._params[m]
            totals = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            new, cos_m, c_m = pareto_gradients(torch._foreach_sub(totals, uni[m]), uni[m], self.gamma, self.rescale)
            for p, g in zip(params, new):
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.copy_(g)
            cos, c = cos.to(cos_m), c.to(c_m)
            cos[i], c[i] = cos_m, c_m
        self.last_cosines, self.last_weights = cos, c
        row = torch.cat([cos, c, (cos <= 0).to(cos.dtype), cos.new_ones(1)])
        self._trace = row if self._trace is None else self._trace + row

    # --- logging and state ---------------------------------------------------------------
    def log(self) -> dict[str, float]:
        """Per modality, means since the last call: cos(g_mm, g_m), the weight c on g_mm and the
        fraction of steps in conflict (cos <= 0)."""
        trace, self._trace = self._trace, None
        if trace is None:
            return {}
        rows = (trace[:-1] / trace[-1]).view(3, -1).tolist()
        return {f"{key}/{m}": value for key, row in zip(("cos", "c_mm", "conflict"), rows)
                for m, value in zip(self._modalities, row)}

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "trace": self._trace}
        if self.heads is not None:
            state["heads"] = self.heads.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self._trace = state.get("trace")
        if "heads" in state and self.heads is not None:
            self.heads.load_state_dict(state["heads"])
