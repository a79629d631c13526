"""Distillation and self-supervised pre-training against methods.md sections 4 and 5."""
import pytest
import torch
import torch.nn.functional as F

from conftest import fake_batch, make_model
from equimodal.config import ConfigError, load_config
from equimodal.methods import build_method
from equimodal.methods.distill import kd_loss
from equimodal.methods.ssl import info_nce
from equimodal.train import Trainer


def test_kd_loss_against_direct_computation_with_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    for temp in (1.0, 4.0):
        p_t = torch.softmax(t / temp, 1)
        p_s = torch.softmax(s / temp, 1)
        direct = temp ** 2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
        assert kd_loss(s, t, temp).item() == pytest.approx(direct.item(), rel=1e-5)
    assert kd_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_info_nce_against_direct_computation_and_symmetry():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    tau = 0.2
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    sim = an @ bn.t() / tau
    a2b = -sum(sim[i, i] - torch.logsumexp(sim[i], 0) for i in range(6)) / 6
    b2a = -sum(sim[i, i] - torch.logsumexp(sim[:, i], 0) for i in range(6)) / 6
    assert info_nce(a, b, tau).item() == pytest.approx(0.5 * (a2b + b2a).item(), rel=1e-5)
    assert info_nce(a, b, tau).item() == pytest.approx(info_nce(b, a, tau).item(), rel=1e-6)
    assert info_nce(a, a, 0.05) < info_nce(a, b, 0.05)  # aligned pairs score lower


def test_ssl_sums_over_pairs_and_ignores_labels():
    model = make_model(("a", "b", "c"))
    method = build_method("ssl")
    method.setup(model)
    x, y = fake_batch(("a", "b", "c"))
    out = model(x)
    terms = method.loss(out, y)
    assert set(terms) == {"infonce/a-b", "infonce/a-c", "infonce/b-c"}
    assert torch.allclose(sum(terms.values()), sum(method.loss(out, torch.zeros_like(y)).values()))


def test_ssl_then_options_are_checked():
    with pytest.raises(ValueError, match="beta"):
        build_method("ssl", then="ogm-ge", then_options={"beta": 1})
    with pytest.raises(ConfigError, match="ssl"):
        load_config(overrides=["method.name=ssl", "method.then=distill"])
    m = build_method("ssl", then="ogm-ge", then_options={"alpha": 0.3})
    assert m.stages()[1].method.alpha == 0.3


def test_distill_student_loss_terms_and_frozen_teacher():
    model = make_model()
    method = build_method("distill", teacher="visual", weight=0.3, temperature=2.0, align=0.5)
    method.setup(model)
    method.on_stage_start("student")
    x, y = fake_batch()
    out = model(x)
    terms = method.loss(out, y)
    zs = method.heads["audio"](out.features["audio"])
    zt = method.heads["visual"](out.features["visual"])
    assert terms["ce/audio"].item() == pytest.approx(0.7 * F.cross_entropy(zs, y).item(), rel=1e-5)
    assert terms["kd/audio"].item() == pytest.approx(0.3 * kd_loss(zs, zt, 2.0).item(), rel=1e-5)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in model.encoder_parameters("visual")), "teacher frozen"
    assert all(p.grad is None for p in method.heads["visual"].parameters())
    assert any(p.grad is not None for p in model.encoder_parameters("audio"))
    assert method.projections["audio_to_visual"].weight.grad is not None


def test_distill_chooses_teacher_on_validation_and_reports_every_stage(tmp_path, tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["method.name=distill", "train.epochs=2"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    summary = trainer.fit()
    stages = summary["stages"]
    assert [s["stage"] for s in stages] == ["teacher", "student", "fuse"]
    teacher = stages[0]["teacher"]
    val = trainer.history[1]["val_acc_by_modality"]  # last teacher epoch, validation split
    assert teacher == max(val, key=lambda m: (val[m], m))
    assert stages[1]["students"] == [m for m in ("visual", "audio") if m != teacher]
    assert all(set(s["test_acc_by_modality"]) == {"audio", "visual"} and s["probe_acc_by_modality"] for s in stages)
    assert stages[-1]["test_acc"] == summary["test_acc"]  # the last stage's report is the final model's
    assert [r["stage"] for r in trainer.history] == ["teacher"] * 2 + ["student"] * 2 + ["fuse"] * 2


def test_ssl_then_ogm_ge_reports_probes_after_pretraining(tmp_path, tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["method.name=ssl", "method.then=ogm-ge", "method.pretrain_epochs=1"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    summary = trainer.fit()
    assert [s["stage"] for s in summary["stages"]] == ["pretrain", "supervised"]
    assert set(summary["stages"][0]["probe_acc_by_modality"]) == {"visual", "audio"}
    assert "k/visual" in trainer.history[-1] and "infonce/visual-audio" in str(trainer.history[0])
    assert summary["epochs"] == 3
