"""modality-dropout and opm against peers.md B2 (plain and adaptive forms), on hand-checkable cases."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import equimodal._dist as dist
from conftest import fake_batch, make_model
from equimodal.methods import build_method
from equimodal.methods._feature_masks import keep_masks_at_least_one, mask_generator
from equimodal.models import MultimodalModel
from equimodal.models.multimodal import ModelOutput


# --- the "never all modalities" sampler -----------------------------------------------------------
def test_first_kept_sampler_on_hand_chosen_uniforms():
    drop = torch.tensor([0.5, 0.5], dtype=torch.float64)
    # first-kept CDF: P(k=0) = 0.5 / 0.75, P(k=1) = 0.25 / 0.75 -> cdf [0.5, 0.75] scaled by 0.75
    u_first = torch.tensor([0.6, 0.6, 0.7, 0.99], dtype=torch.float64)  # 0.45, 0.45 -> k=0; 0.525, 0.74 -> k=1
    u = torch.tensor([[0.0, 0.4], [0.0, 0.6], [0.9, 0.9], [0.9, 0.0]], dtype=torch.float64)
    keep = keep_masks_at_least_one(drop, u_first, u)
    assert keep.tolist() == [[True, False], [True, True], [False, True], [False, True]]


@pytest.mark.parametrize("p,n", [(0.5, 2), (0.9, 3), (0.999, 2)])
def test_sampler_never_drops_all_and_matches_rejection_distribution(p, n):
    g = torch.Generator().manual_seed(0)
    b = 200_000
    drop = torch.full((n,), p, dtype=torch.float64)
    keep = keep_masks_at_least_one(drop, torch.rand(b, generator=g, dtype=torch.float64),
                                   torch.rand(b, n, generator=g, dtype=torch.float64))
    assert keep.any(1).all(), "some sample lost every modality"
    # re-drawing until one is kept: each modality is dropped with probability (p - p^n) / (1 - p^n)
    expected = (p - p ** n) / (1 - p ** n)
    assert keep.logical_not().double().mean(0).tolist() == pytest.approx([expected] * n, abs=0.005)
    if n == 2:  # P(both kept) = (1 - p)^2 / (1 - p^2) = (1 - p) / (1 + p)
        assert keep.all(1).double().mean().item() == pytest.approx((1 - p) / (1 + p), abs=0.005)


# --- modality-dropout -----------------------------------------------------------------------------
def _concat_logits(model, feats):
    """z = W [h_a; h_v] + b, written out with the concat head's weights (test only)."""
    fc = model.fusion.fc
    return torch.cat([feats[m] for m in model.modalities], 1) @ fc.weight.t() + fc.bias


@pytest.mark.parametrize("rescale", [False, True])
def test_modality_dropout_loss_is_ce_of_masked_fusion(rescale):
    model = make_model()
    method = build_method("modality-dropout", p=0.5, rescale=rescale)
    method.setup(model, seed=3)
    x, y = fake_batch(n=32)
    out = model(x)
    terms = method.loss(out, y)
    keep = method.last_keep
    assert keep.shape == (32, 2) and keep.any(1).all()
    assert (~keep).any() and keep.all(1).any(), "the case should drop some and keep some"
    scale = 2.0 if rescale else 1.0
    assert method.last_scale == scale
    feats = {m: out.features[m].detach() * keep[:, j:j + 1].float() * scale for j, m in enumerate(model.modalities)}
    expected = F.cross_entropy(_concat_logits(model, feats), y)
    assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.allclose(terms["ce"], F.cross_entropy(out.logits, y)), "loss must not be the unmasked one"
    # a dropped modality gets no gradient from that sample: zero its features' grad rows
    grads = torch.autograd.grad(terms["ce"], [out.features[m] for m in model.modalities])
    for j, g in enumerate(grads):
        assert torch.all(g[~keep[:, j]] == 0) and g[keep[:, j]].abs().sum() > 0


def test_modality_dropout_masks_are_seeded_by_seed_step_and_rank(monkeypatch):
    def masks(method, steps, model=None):
        model = model or make_model()
        got = []
        for s in range(steps):
            x, y = fake_batch(n=16, seed=s)
            method.loss(model(x), y)
            got.append(method.last_keep.clone())
            method.before_step(model)
        return got

    a = build_method("modality-dropout", p=0.5)
    a.setup(make_model(), seed=1)
    run = masks(a, 4)
    assert not torch.equal(run[0], run[1]), "a new mask each step"
    # the mask is the sampler applied to uniforms of mask_generator(seed, step, micro, rank)
    g = mask_generator(1, 2, 0, 0)
    ref = keep_masks_at_least_one(torch.full((2,), 0.5, dtype=torch.float64),
                                  torch.rand(16, generator=g, dtype=torch.float64),
                                  torch.rand(16, 2, generator=g, dtype=torch.float64))
    assert torch.equal(run[2], ref)
    # resume after two steps: state_dict -> fresh method -> the same masks for steps 2 and 3
    b = build_method("modality-dropout", p=0.5)
    b.setup(make_model(), seed=1)
    masks(b, 2)
    c = build_method("modality-dropout", p=0.5)
    c.setup(make_model(), seed=1)
    c.load_state_dict(b.state_dict())
    resumed = []
    for s in (2, 3):
        x, y = fake_batch(n=16, seed=s)
        c.loss(make_model()(x), y)
        resumed.append(c.last_keep.clone())
        c.before_step(None)
    assert all(torch.equal(r, e) for r, e in zip(resumed, run[2:]))
    # another seed or another rank (other samples) draws other masks
    d = build_method("modality-dropout", p=0.5)
    d.setup(make_model(), seed=2)
    assert not torch.equal(masks(d, 1)[0], run[0])
    monkeypatch.setattr(dist, "rank", lambda: 1)
    e = build_method("modality-dropout", p=0.5)
    e.setup(make_model(), seed=1)
    assert not torch.equal(masks(e, 1)[0], run[0])


def test_micro_batches_of_one_step_draw_different_masks():
    method = build_method("modality-dropout", p=0.5)
    model = make_model()
    method.setup(model, seed=0)
    x, y = fake_batch(n=32)
    method.loss(model(x), y)
    first = method.last_keep.clone()
    method.loss(model(x), y)  # gradient accumulation: second micro-batch, same step
    assert not torch.equal(first, method.last_keep)


def test_evaluation_uses_all_modalities_and_draws_nothing():
    model = make_model()
    method = build_method("modality-dropout", p=0.5)
    method.setup(model, seed=0)
    x, y = fake_batch()
    with torch.no_grad():
        out = model(x)
        terms = method.loss(out, y)
    assert torch.equal(method.predict(out), out.logits)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(out.logits, y).item())
    assert method.last_keep is None and method._micro == 0 and method.log() == {}


def test_modality_dropout_log_reports_realised_drop_rates():
    model = make_model(("audio", "visual", "text"))
    method = build_method("modality-dropout", p=0.4)
    method.setup(model, seed=0)
    dropped, total = torch.zeros(3), 0
    for s in range(3):
        x, y = fake_batch(("audio", "visual", "text"), n=20, seed=s)
        method.loss(model(x), y)
        dropped += (~method.last_keep).sum(0)
        total += 20
        method.before_step(model)
    log = method.log()
    assert [log[f"drop_rate/{m}"] for m in model.modalities] == pytest.approx((dropped / total).tolist())
    assert log["discarded"] == 0.0
    assert method.log() == {}, "reset after each call"


def test_low_precision_features_are_fused_under_autocast():
    model = make_model()
    method = build_method("modality-dropout", p=0.5)
    method.setup(model, seed=0)
    x, y = fake_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.features["audio"].dtype == torch.bfloat16
    terms = method.loss(out, y)  # outside autocast, as in the trainer
    assert torch.isfinite(terms["ce"])
    terms["ce"].backward()


@pytest.mark.parametrize("options,word", [({"p": 1.0}, "p"), ({"p": -0.1}, "p"), ({"p": "half"}, "p"),
                                          ({"rescale": "yes"}, "rescale")])
def test_modality_dropout_option_errors(options, word):
    with pytest.raises(ValueError, match=word):
        build_method("modality-dropout", **options)


def test_one_modality_is_a_named_error():
    with pytest.raises(ValueError, match="at least 2 modalities"):
        build_method("modality-dropout").setup(make_model(("audio",)))


# --- opm ------------------------------------------------------------------------------------------
class _Flat(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.out_dim = dim
        self.fc = nn.Linear(4, dim)

    def forward(self, x):
        return self.fc(x)


def _opm_case(method, seed=0, b=8):
    """Concat model with feature sizes 3 and 5; unimodal logits built so that the scores are known:
    audio softmax[y] = 3/4 per sample (s_a = 0.75 b), visual = 1/2 (s_v = 0.5 b)."""
    torch.manual_seed(0)
    model = MultimodalModel({"audio": _Flat(3), "visual": _Flat(5)}, num_classes=2)
    method.setup(model, seed=seed)
    g = torch.Generator().manual_seed(5)
    feats = {"audio": torch.randn(b, 3, generator=g, requires_grad=True),
             "visual": torch.randn(b, 5, generator=g, requires_grad=True)}
    y = torch.zeros(b, dtype=torch.long)
    uni = {"audio": torch.tensor([[math.log(3.0), 0.0]]).expand(b, 2), "visual": torch.zeros(b, 2)}
    out = ModelOutput(logits=model.fuse(feats), unimodal_logits=uni, features=feats)
    return model, out, y


def test_opm_drop_probability_and_theta_by_hand():
    method = build_method("opm", p_exe=1.0)  # alpha 0.5, q_base 0.4
    model, out, y = _opm_case(method)
    terms = method.loss(out, y)
    # rho_a = 0.75 / 0.5 = 1.5, rho_v = 2/3; d_a = tanh(0.5); q_a = 0.4 (1 + 0.5 tanh 0.5); q_v = 0
    q_a = 0.4 * (1 + 0.5 * math.tanh(0.5))
    assert method.last_ratios.tolist() == pytest.approx([1.5, 2 / 3])
    assert method.last_drop_probabilities.tolist() == pytest.approx([q_a, 0.0])
    theta = 3 * q_a / (3 + 5)
    assert method.last_scale.item() == pytest.approx(1 / (1 - theta), rel=1e-6)
    # keep iff u >= q with u from the (seed, step 0, micro 0, rank 0) generator
    u = torch.rand(8, 2, generator=mask_generator(0, 0, 0, 0))
    expected_keep = torch.stack([u[:, 0] >= q_a, torch.ones(8, dtype=torch.bool)], 1)
    assert torch.equal(method.last_keep, expected_keep)
    assert (~expected_keep[:, 0]).any() and expected_keep[:, 0].any()
    # loss: CE of the concat head on the masked, rescaled features
    masked = {"audio": out.features["audio"] * expected_keep[:, :1] / (1 - theta),
              "visual": out.features["visual"] / (1 - theta)}
    ref = F.cross_entropy(_concat_logits(model, masked), y)
    assert terms["ce"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_opm_q_is_clipped_and_ties_drop_nothing():
    method = build_method("opm", alpha=10.0, q_base=0.4)
    q = method.drop_probabilities(torch.tensor([9.0, 1.0]))
    assert q.tolist() == pytest.approx([1.0, 0.0])  # 0.4 (1 + 10 tanh 8) > 1 -> 1
    assert method.drop_probabilities(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]


def test_opm_ratio_forms_with_three_modalities():
    s = torch.tensor([3.0, 1.0, 1.0])
    mean = build_method("opm").ratios(s)
    port = build_method("opm", ratio="balancemm").ratios(s)
    assert mean.tolist() == pytest.approx([3.0, 0.5, 0.5])
    assert port.tolist() == pytest.approx([3 / (2 + 1e-5), 1 / (4 + 1e-5), 1 / (4 + 1e-5)])


def test_opm_balancemm_rescale_has_the_ports_epsilon():
    method = build_method("opm", p_exe=1.0, ratio="balancemm")
    _, out, y = _opm_case(method)
    method.loss(out, y)
    q_a = 0.4 * (1 + 0.5 * math.tanh(0.75 / (0.5 + 1e-5 / 8) - 1))
    theta = 3 * q_a / 8
    assert method.last_scale.item() == pytest.approx(1 / (1 - theta + 1e-5), rel=1e-6)


def test_opm_p_exe_gates_per_micro_batch():
    never = build_method("opm", p_exe=0.0)
    model, out, y = _opm_case(never)
    terms = never.loss(out, y)
    assert never.last_keep is None
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(out.logits, y).item())
    assert never.log()["executed"] == 0.0

    half = build_method("opm", p_exe=0.5)
    model, out, y = _opm_case(half, seed=4)
    executed = []
    for step in range(40):
        half.loss(out, y)
        executed.append(half.last_keep is not None)
        half.before_step(model)
    # the gate is one uniform per micro-batch from the rank-free generator: execute iff u < p_exe
    expected = [torch.rand((), generator=mask_generator(4, s, 0, -1), dtype=torch.float64).item() < 0.5
                for s in range(40)]
    assert executed == expected and 5 < sum(expected) < 35
    log = half.log()
    assert log["executed"] == pytest.approx(sum(expected) / 40)
    assert log["drop_prob/audio"] == pytest.approx(0.4 * (1 + 0.5 * math.tanh(0.5)))
    assert log["drop_prob/visual"] == 0.0 and log["drop_rate/visual"] == 0.0


def test_opm_gate_agrees_across_ranks_masks_do_not(monkeypatch):
    got = {}
    for r in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        method = build_method("opm", p_exe=0.5)
        model, out, y = _opm_case(method, b=64)
        gates, keeps = [], []
        for _ in range(6):
            method.loss(out, y)
            gates.append(method.last_keep is not None)
            keeps.append(method.last_keep)
            method.before_step(model)
        got[r] = gates, keeps
    assert got[0][0] == got[1][0] and any(got[0][0])
    i = got[0][0].index(True)
    assert not torch.equal(got[0][1][i], got[1][1][i])


def test_opm_decides_on_scores_summed_across_ranks(monkeypatch):
    # locally audio dominates (3/4 vs 1/2 per sample); the other rank's visual scores tip it over
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t.add_(torch.tensor([0.0, 10.0])))
    method = build_method("opm", p_exe=1.0)
    _, out, y = _opm_case(method)
    method.loss(out, y)
    q = method.last_drop_probabilities
    assert q[0] == 0 and q[1] > 0.4
    assert method.last_keep[:, 0].all()


def test_opm_drops_samples_left_with_no_modality():
    method = build_method("opm", p_exe=1.0, q_base=1.0)
    model, out, y = _opm_case(method)
    method.loss(out, y)
    assert not method.last_keep[:, 0].any()  # q_a = 1: every sample loses audio, keeps visual
    # force both modalities to be dropped for some samples: a hand-made keep mask through the base
    keep = torch.tensor([[True, False], [False, False]] * 4)
    method.keep_plan = lambda output, targets: (keep, torch.tensor(2.0))
    terms = method.loss(out, y)
    masked = {"audio": out.features["audio"] * keep[:, :1] * 2, "visual": out.features["visual"] * keep[:, 1:] * 2}
    per_sample = F.cross_entropy(_concat_logits(model, masked), y, reduction="none")
    assert terms["ce"].item() == pytest.approx(per_sample[0::2].mean().item(), rel=1e-5)
    assert method.log()["discarded"] == pytest.approx(4 / 16)
    method.keep_plan = lambda output, targets: (torch.zeros(8, 2, dtype=torch.bool), 1.0)
    empty = method.loss(out, y)["ce"]
    assert empty.item() == 0.0 and empty.requires_grad


def test_opm_window():
    method = build_method("opm", p_exe=1.0, modulation_starts=2, modulation_ends=3)
    model, out, y = _opm_case(method)
    for epoch, masked in ((1, False), (2, True), (3, True), (4, False)):
        method.on_epoch_start(epoch)
        method.loss(out, y)
        assert (method.last_keep is not None) == masked, epoch


def test_opm_state_round_trip_resumes_masks():
    a = build_method("opm", p_exe=1.0)
    model, out, y = _opm_case(a, b=32)
    keeps = []
    for _ in range(3):
        a.loss(out, y)
        keeps.append(a.last_keep.clone())
        a.before_step(model)
    b = build_method("opm", p_exe=1.0)
    _opm_case(b, b=32)
    b.loss(out, y)
    b.before_step(model)
    c = build_method("opm", p_exe=1.0)
    _opm_case(c, b=32)
    c.load_state_dict(b.state_dict())
    c.loss(out, y)
    assert torch.equal(c.last_keep, keeps[1])


@pytest.mark.parametrize("options,word", [
    ({"alpha": -1}, "alpha"), ({"p_exe": 1.5}, "p_exe"), ({"q_base": -0.1}, "q_base"),
    ({"q_base": 2}, "q_base"), ({"modulation_starts": -1}, "modulation_starts"),
    ({"modulation_starts": 3, "modulation_ends": 2}, "modulation_ends"), ({"ratio": "min"}, "ratio")])
def test_opm_option_errors(options, word):
    with pytest.raises(ValueError, match=word):
        build_method("opm", **options)


def test_opm_trains_with_the_plain_model_output():
    model = make_model(("audio", "visual", "text"))
    opt = torch.optim.SGD(model.param_groups(), lr=0.05)
    method = build_method("opm", p_exe=1.0)
    method.setup(model, opt, seed=0)
    x, y = fake_batch(("audio", "visual", "text"), n=12)
    out = model(x)
    terms = method.loss(out, y)
    sum(terms.values()).backward()
    method.before_step(model)
    opt.step()
    q = method.last_drop_probabilities
    assert (q == 0).sum() >= 1, "the weakest modality is never dropped"
