"""Diagnosing & Re-learning (Wei, Li, Feng, Hu, ECCV 2024). peers.md B11."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._dist import all_reduce_sum, world_size
from ._budget import check_epoch_option, share_of_budget
from ._base import Method, unwrap
from ._registry import register_method

#: samples per batch of the feature passes (no gradients, so larger than a training batch)
FEATURE_BATCH = 256


def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """Each column mapped linearly to [-1, 1] by its own min and max over the rows (scikit-learn's
    ``MinMaxScaler(feature_range=(-1, 1))``: a constant column has its range taken as 1, so it maps to -1)."""
    x = x.float()
    lo, hi = x.aminmax(dim=0)
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    return (x - lo) / span * 2 - 1


#: below this many N * K * D elements, distances are taken as explicit differences (exact, no BLAS call)
_DIRECT = 1 << 20


def _sq_distances(x: torch.Tensor, x2: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """N x K squared Euclidean distances: explicit differences for small problems, else the matrix
    form ||x||^2 - 2 x.c + ||c||^2 (both deterministic on CPU and GPU)."""
    if x.shape[0] * centers.shape[0] * x.shape[1] <= _DIRECT:
        return (x[:, None, :] - centers[None, :, :]).pow(2).sum(-1)
    return (x2[:, None] - 2 * x @ centers.T + centers.pow(2).sum(1)[None, :]).clamp_min(0)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, restarts: int = 10, iters: int = 300) -> torch.Tensor:
    """Cluster index of every row of ``x`` (N x D): k-means++ seeding, then Lloyd iterations until
    no assignment changes (or ``iters``); of ``restarts`` runs the one with the lowest inertia
    (the first on a tie). Deterministic: the only random draws are ``restarts * k`` uniforms from a
    CPU generator seeded by ``seed``, turned into seeds by inverse-CDF lookup on ``x``'s device;
    centre updates are one-hot matrix products (no atomic scatter). ``k`` is capped at N; an empty
    cluster keeps its previous centre."""
    n = x.shape[0]
    k = max(1, min(int(k), n))
    x = x.float()
    x2 = x.pow(2).sum(1)
    u = torch.rand(restarts, k, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    u = u.to(x.device)
    best, best_inertia = None, math.inf
    for r in range(restarts):
        idx = (u[r, 0] * n).long().clamp_max(n - 1)
        centers = x[idx].unsqueeze(0)
        d2 = _sq_distances(x, x2, centers).squeeze(1)
        for j in range(1, k):  # k-means++: next seed with probability proportional to D(x)^2
            cum = d2.double().cumsum(0)
            if cum[-1] > 0:
                idx = torch.searchsorted(cum, (u[r, j] * cum[-1]).reshape(1), right=True).clamp_max(n - 1)[0]
            else:  # every point sits on a centre already: take the next one in order
                idx = torch.tensor(j % n, device=x.device)
            centers = torch.cat([centers, x[idx].unsqueeze(0)])
            d2 = torch.minimum(d2, _sq_distances(x, x2, x[idx].unsqueeze(0)).squeeze(1))
        assign = None
        for _ in range(iters):
            new = _sq_distances(x, x2, centers).argmin(1)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype)  # N x K
            counts = onehot.sum(0)
            sums = ((onehot[:, :, None] * x[:, None, :]).sum(0) if n * k * x.shape[1] <= _DIRECT
                    else onehot.T @ x)
            centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        inertia = float(_sq_distances(x, x2, centers).gather(1, assign[:, None]).sum())
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def purity(clusters: torch.Tensor, labels: torch.Tensor) -> float:
    """Cluster purity: each cluster votes its majority label; the fraction of samples whose label is
    their cluster's vote, i.e. (1/N) sum_k max_c n_kc (the official code's ``purity_score``)."""
    n_classes = int(labels.max()) + 1
    n_clusters = int(clusters.max()) + 1
    counts = torch.bincount(clusters.long() * n_classes + labels.long(), minlength=n_clusters * n_classes)
    return float(counts.view(n_clusters, n_classes).max(1).values.sum()) / labels.numel()


def relearn_strength(purity_train: torch.Tensor, purity_val: torch.Tensor, move_lambda: float) -> torch.Tensor:
    """a_m = tanh(lambda * |purity_train_m - purity_val_m|) (per modality)."""
    return torch.tanh(move_lambda * (purity_train - purity_val).abs())


@torch.no_grad()
def interpolate_(params: list[nn.Parameter], theta0: list[torch.Tensor], a: float) -> None:
    """theta <- a * theta0 + (1 - a) * theta, in place, for every tensor of ``params``."""
    torch._foreach_mul_(params, 1.0 - a)
    torch._foreach_add_(params, [t.to(p.device, p.dtype) for t, p in zip(theta0, params)], alpha=a)


#: the official re-initialisation interval as a share of its budget: every 20 of 90 epochs (CREMA-D)
_REINIT_SHARE = (2, 9)

@register_method("relearn")
class Relearn(Method):
    """Diagnosing & Re-learning (Wei et al., ECCV 2024): soft re-init of each encoder by its train/val purity gap.

    Rule (our notation): training is plain CE on the fused logits. theta0_m, the encoder
    parameters at the start of training, is kept. After epoch e (counted from 0) with e > 0 and
    e % ``reinit_epoch`` == 0, for the first ``reinit_num`` such epochs: each encoder's features
    h_m (``ModelOutput.features``, model in eval mode, no gradients) are computed on the training
    split and on the validation split (``MethodData.val``, carved from training data; never the
    test split); each feature matrix is min-max scaled per dimension to [-1, 1] (train and
    validation each by their own range, as the official code fits a scaler per set), clustered
    by k-means with k = number of classes, and scored by purity (each cluster votes its majority
    label; the fraction of samples that carry their cluster's vote). The learning state is
    gap_m = |purity_train_m - purity_val_m| (a large gap: the encoder memorises the training set),
    the re-initialisation strength a_m = tanh(``move_lambda`` * gap_m), and every parameter of
    encoder m becomes a_m * theta0_m + (1 - a_m) * theta_m.

    Paper: Yake Wei, Siwei Li, Ruoxuan Feng, Di Hu, "Diagnosing and Re-learning for Balanced
    Multimodal Learning", ECCV 2024. Code: GeWu-Lab/Diagnosing_Relearning_ECCV2024 (``code/ours.py``).
    Defaults (the official script, CREMA-D, 90 epochs): move_lambda 3, reinit_epoch 20,
    reinit_num 3, so re-initialisations follow epochs 21, 41 and 61 (1-based). Our default
    ``reinit_epoch`` is null: the official interval as a share of the run's epochs (20 of 90,
    rounded, at least 1; 20 when the loop does not tell the budget), so a 12-epoch run uses 3 and
    re-initialises after epochs 4, 7 and 10 instead of never (a fixed 20 leaves a run of 20 epochs
    or fewer identical to ``joint``; the loop says so at the start).

    As in the official code: the schedule (e > 0 and e % reinit_epoch == 0, 0-based), features
    taken after the global pooling (the model's ``features``), train features in eval mode,
    separate scaling per set, majority-vote purity, every encoder *parameter* interpolated
    (BatchNorm running statistics and the optimizer's momentum are left as they are; the fusion
    head is never touched). Departures: k-means is ours (torch, vectorised, seeded by the run
    seed; k-means++ seeding and Lloyd iterations until assignments stop changing, best of
    ``kmeans_restarts`` runs by inertia, like scikit-learn's ``KMeans(random_state=0)`` before 1.4
    but not bit-identical to it); the validation split is our validation split (the official
    CREMA-D run has a separate ``val.csv``; BalanceBenchmark's port uses the *test* split as
    "val", which we never do). With BalanceBenchmark's schedule use reinit_epoch 15, reinit_num 2.
    Works with any number of modalities (each encoder is diagnosed alone). Distributed: every
    rank extracts features on the full training and validation sets (the same data on every
    rank), and the a_m are averaged over ranks (one all-reduce of M numbers) so all ranks apply
    the same interpolation. A re-initialisation after the run's last epoch would leave the final
    model perturbed and untrained: none happens then (``metrics["final"]``).

    Extra cost: none per step; at each re-initialisation one forward pass over the training and
    validation sets without gradients, and 2M k-means runs (``kmeans_restarts`` each). Memory:
    one copy of the encoders' parameters (theta0, also in the checkpoint). Hooks: setup,
    on_epoch_end, log.
    """

    min_modalities = 1

    #: what ``bench --tune`` tries (the default first)
    search_space = {"reinit_epoch": (None, 2, 4, 6)}

    def __init__(self, move_lambda: float = 3.0, reinit_epoch: int | None = None, reinit_num: int = 3,
                 kmeans_restarts: int = 10, kmeans_iters: int = 300) -> None:
        super().__init__()
        if (not isinstance(move_lambda, (int, float)) or isinstance(move_lambda, bool)
                or not math.isfinite(move_lambda) or move_lambda < 0):
            raise ValueError(f"move_lambda must be a finite number >= 0, got {move_lambda!r}")
        check_epoch_option("reinit_epoch", reinit_epoch, 1)
        for key, value, low in (("reinit_num", reinit_num, 0),
                                ("kmeans_restarts", kmeans_restarts, 1), ("kmeans_iters", kmeans_iters, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        self.move_lambda = float(move_lambda)
        self.reinit_option = reinit_epoch  # as given: None follows the run's budget
        self.reinit_epoch = share_of_budget(reinit_epoch, 0, _REINIT_SHARE, paper=20)
        self.reinit_num = reinit_num
        self.kmeans_restarts, self.kmeans_iters = kmeans_restarts, kmeans_iters
        self.done = 0  # re-initialisation epochs passed so far (the official ``flag_reinit``)
        self.theta0: dict[str, list[torch.Tensor]] | None = None
        self.pending: dict[str, float] = {}  # figures of the last re-initialisation, for log()
        self._model: nn.Module | None = None

    def plan_epochs(self, epochs: int) -> list[str]:
        self.reinit_epoch = share_of_budget(self.reinit_option, epochs, _REINIT_SHARE, paper=20)
        if not any(self.due(e) for e in range(epochs - 1)) and self.reinit_num > 0:
            return [f"relearn: reinit_epoch={self.reinit_epoch} falls on no epoch before the last of {epochs}: "
                    "it never re-learns (it trains as joint); lower method.reinit_epoch"]
        return []

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> None:
        super().setup(model, optimizer, seed)
        self._model = unwrap(model)
        if self.theta0 is None:  # first setup only: a later setup (resume) keeps or loads theta0
            self.theta0 = {m: [p.detach().clone() for p in self._model.encoder_parameters(m)]
                           for m in self._model.modalities}

    def due(self, epoch: int) -> bool:
        """Whether a re-initialisation epoch (the official ``epoch % reinit_epoch == 0 and epoch > 0``)."""
        return epoch > 0 and epoch % self.reinit_epoch == 0

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        # never after the run's last validation: the test split would be scored with encoders
        # re-initialised towards theta0 and never trained or validated since
        if metrics.get("final") or not self.due(epoch):
            return
        self.done += 1
        if self.done > self.reinit_num:
            return
        if self._model is None or self.theta0 is None:
            raise RuntimeError("relearn: call method.setup(model, optimizer) before training")
        data = self.require_data()
        if data.val is None:
            raise RuntimeError("relearn diagnoses each encoder on the validation split: attach "
                               "MethodData(train=..., val=...) (validation carved from training data)")
        self.relearn(data.train, data.val)

    def relearn(self, train: Any, val: Any) -> torch.Tensor:
        """Diagnose every encoder on ``train`` vs ``val`` and interpolate it towards theta0; returns a (M)."""
        model = self._model
        names = tuple(model.modalities)
        k = int(getattr(model, "num_classes", 0) or 0)
        feats_t, y_t = self._features(train)
        feats_v, y_v = self._features(val)
        k = k or int(max(y_t.max(), y_v.max())) + 1
        pt, pv = [], []
        for m in names:
            for feats, y, out in ((feats_t, y_t, pt), (feats_v, y_v, pv)):
                clusters = kmeans(minmax_scale(feats[m]), k, seed=self.seed, restarts=self.kmeans_restarts,
                                  iters=self.kmeans_iters)
                out.append(purity(clusters, y.to(clusters.device)))
        p_train, p_val = torch.tensor(pt, dtype=torch.float64), torch.tensor(pv, dtype=torch.float64)
        a = relearn_strength(p_train, p_val, self.move_lambda)
        if world_size() > 1:  # the same on every rank already; averaging makes it exact
            device = next(model.parameters()).device
            a = (all_reduce_sum(a.to(device)) / world_size()).cpu()
        for i, m in enumerate(names):
            interpolate_(model.encoder_parameters(m), self.theta0[m], float(a[i]))
        self.pending = {}
        for i, m in enumerate(names):
            self.pending.update({f"relearn/purity_train/{m}": float(p_train[i]),
                                 f"relearn/purity_val/{m}": float(p_val[i]),
                                 f"relearn/gap/{m}": float((p_train[i] - p_val[i]).abs()),
                                 f"relearn/a/{m}": float(a[i])})
        return a

    @torch.no_grad()
    def _features(self, dataset: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every sample's encoder features (model in eval mode; its mode is restored) and labels."""
        model, data = self._model, self.require_data()
        was_training = model.training
        model.eval()
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
        labels = []
        try:
            for inputs, y in data.batches(dataset, FEATURE_BATCH):
                out = model(inputs)
                for m in feats:
                    feats[m].append(out.features[m].float())
                labels.append(y)
        finally:
            model.train(was_training)
        return {m: torch.cat(v) for m, v in feats.items()}, torch.cat(labels)

    def log(self) -> dict[str, float]:
        """The last re-initialisation's purities, gaps and strengths (once; the trainer logs them
        with the epoch after the re-initialisation)."""
        out, self.pending = self.pending, {}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "done": self.done, "theta0": self.theta0, "pending": dict(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.done = int(state.get("done", 0))
        self.pending = dict(state.get("pending") or {})
        theta0 = state.get("theta0")
        if theta0 is not None:
            device = next(self._model.parameters()).device if self._model is not None else "cpu"
            self.theta0 = {m: [t.to(device).clone() for t in ts] for m, ts in theta0.items()}
