"""Sample-level modality valuation (peers.md B14) against hand-computed Shapley values and copies."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import fake_batch, make_model
from equimodal.config import load_config
from equimodal.data import TensorMultimodalDataset
from equimodal.methods import MethodData, build_method
from equimodal.methods import valuation as val
from equimodal.methods.valuation import KEEP_KEY, ResampledDataset, copy_counts, shapley_contributions
from equimodal.models.multimodal import ModelOutput
from equimodal.train import Trainer

# correctness of the prediction from {audio} (mask 1), {visual} (mask 2) and both (mask 3), per sample
HAND = {1: [True, True, True, False], 2: [True, False, True, True], 3: [True, True, False, False]}


class TableModel(nn.Module):
    """Contract stub: each modality's feature is the sample id (1..n, 1-dim); ``fuse`` looks up from
    ``table`` whether the prediction from the present (non-zero) modalities is right (label 0)."""

    modalities = ("audio", "visual")
    num_classes = 2

    def __init__(self, table):
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Identity() for m in self.modalities})
        self.table = {k: torch.tensor(v) for k, v in table.items()}

    def encoder(self, m):
        return self.encoders[m]

    def encoder_parameters(self, m):
        return []

    def fuse(self, features):
        a, v = features["audio"][:, 0], features["visual"][:, 0]
        ids = torch.maximum(a, v).long() - 1
        present = (a != 0).long() + 2 * (v != 0).long()
        right = torch.stack([self.table[int(k)][int(i)] for k, i in zip(present, ids)])
        return F.one_hot(torch.where(right, 0, 1), 2).float()

    def forward(self, inputs):
        feats = {m: inputs[m] for m in self.modalities}
        return ModelOutput(logits=self.fuse(feats), unimodal_logits={}, features=feats)


def table_data(n=4):
    ids = torch.arange(1, n + 1, dtype=torch.float32).unsqueeze(1)
    return TensorMultimodalDataset({"audio": ids.clone(), "visual": ids.clone()}, torch.zeros(n, dtype=torch.long), 2)


def ready(table, n=4, **options):
    method = build_method("valuation", warmup_epochs=2, **options)
    data = table_data(n)
    method.attach_data(MethodData(train=data))
    method.setup(TableModel(table), seed=3)
    return method, data


def test_two_modality_shapley_values_and_copy_counts_by_hand():
    method, data = ready(HAND)
    v_a, v_v = torch.tensor(HAND[1]).double(), torch.tensor(HAND[2]).double()
    v_av = 2 * torch.tensor(HAND[3]).double()
    expected = torch.stack([(v_a + v_av - v_v) / 2, (v_v + v_av - v_a) / 2], 1)
    assert expected.tolist() == [[1, 1], [1.5, 0.5], [0, 0], [-0.5, 0.5]]  # worked by hand
    phi = method.contributions(data)
    assert torch.equal(phi, expected)
    # 0.4 < phi < 1: 1 copy; -0.1 < phi < 0.4: 2; phi < -0.1: 3; phi >= 1: none
    assert copy_counts(phi).tolist() == [[0, 0], [0, 1], [2, 2], [3, 1]]
    edges = torch.tensor([[0.4, -0.1], [1.0, 0.41], [0.39, -0.11], [0.99, -0.09]])
    assert copy_counts(edges).tolist() == [[0, 0], [0, 1], [2, 3], [1, 2]]


def test_three_modality_shapley_by_hand_and_efficiency():
    # columns: subsets by bitmask over (a, v, t); only {a} alone is right
    only_a = torch.zeros(1, 8, dtype=torch.bool)
    only_a[0, 1] = True
    # phi_a = 0!2!/3! * v({a}) = 1/3; phi_v = phi_t = 1!1!/3! * (v({a,v}) - v({a})) = -1/6
    assert torch.allclose(shapley_contributions(only_a), torch.tensor([[1 / 3, -1 / 6, -1 / 6]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(50, 8, generator=g) > 0.5
    phi = shapley_contributions(correct)
    assert torch.allclose(phi.sum(1), 3 * correct[:, 7].double())  # efficiency: sum = v(full) = 3 [right]
    all_right = torch.ones(1, 8, dtype=torch.bool)
    assert torch.allclose(shapley_contributions(all_right), torch.ones(1, 3, dtype=torch.float64))


def test_sample_level_dataset_holds_the_right_copies_with_the_other_modality_dropped():
    method, data = ready(HAND)
    assert method.training_set(1, data) is data  # warm-up: unchanged
    out = method.training_set(2, data)
    assert isinstance(out, TensorMultimodalDataset)
    # originals, then per sample its audio-only copies, then its visual-only copies
    ids = [1, 2, 3, 4, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    keep_audio = [1, 1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    keep = out.inputs[KEEP_KEY]
    assert out.inputs["audio"][:, 0].tolist() == ids and out.inputs["visual"][:, 0].tolist() == ids
    assert keep[:, 0].long().tolist() == keep_audio and keep[:, 1].long().tolist() == [
        1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1]
    assert keep[:4].all() and (keep[4:].sum(1) == 1).all()  # copies keep exactly one modality
    assert out.labels.tolist() == [0] * 13
    assert method.log() == {"phi/audio": 0.5, "phi/visual": 0.5, "copies/audio": 5, "copies/visual": 4,
                            "train_size": 13}
    assert method.log() == {}
    again = method.training_set(2, data)  # a pure function of the weights and the epoch: resume rebuilds it
    assert all(torch.equal(again.inputs[k], out.inputs[k]) for k in out.inputs)

    inputs_method, _ = ready(HAND, drop="inputs")
    zeroed = inputs_method.training_set(2, data)
    assert KEEP_KEY not in zeroed.inputs
    expected_audio = torch.tensor(ids, dtype=torch.float32) * torch.tensor(keep_audio)
    assert zeroed.inputs["audio"][:, 0].tolist() == expected_audio.tolist()
    keep_visual = [1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1]
    assert zeroed.inputs["visual"][:, 0].tolist() == (torch.tensor(ids) * torch.tensor(keep_visual)).float().tolist()


def test_disk_style_dataset_gets_an_index_map_view():
    class Disk(torch.utils.data.Dataset):  # not in memory: no fast path
        def __init__(self, base):
            self.base, self.labels, self.num_classes, self.epoch = base, base.labels, base.num_classes, None

        def __len__(self):
            return len(self.base)

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __getitem__(self, i):
            return self.base[torch.as_tensor(i)]

    method, data = ready(HAND, drop="inputs")
    disk = Disk(data)
    view = method.training_set(2, disk)
    assert isinstance(view, ResampledDataset) and len(view) == 13
    memory = method.training_set(2, data)
    x, y = view[list(range(13))]
    assert torch.equal(x["audio"], memory.inputs["audio"]) and torch.equal(x["visual"], memory.inputs["visual"])
    one, _ = view[5]  # a single item: audio-only copy of sample 3, visual input zeroed
    assert one["audio"].tolist() == [3.0] and one["visual"].tolist() == [0.0]
    view.set_epoch(7)
    assert disk.epoch == 7


def test_modality_level_count_and_worse_modality():
    table = {1: [True] * 4, 2: [False] * 4, 3: [True] * 4}  # phi_a = 1.5, phi_v = 0.5 on every sample
    method, data = ready(table, level="modality", part_ratio=1.0)
    out = method.training_set(2, data)
    # gap_a = -0.5, gap_v = 0.5, d = |gap_a - gap_v| * 2/3 = 2/3, floor(2/3 * 4) = 2 copies, keeping visual
    assert len(out) == 6
    keep = out.inputs[KEEP_KEY]
    assert keep[:4].all() and keep[4:].tolist() == [[False, True]] * 2
    small, _ = ready(table, level="modality", part_ratio=1.0, alpha=0.25)
    assert len(small.training_set(2, data)) == 4  # floor(1/6 * 4) = 0

    valued = []
    method, data = ready({k: v * 3 for k, v in table.items()}, n=10, level="modality", part_ratio=0.5)
    original = method.contributions
    method.contributions = lambda ds: valued.append(len(ds)) or original(ds)
    out = method.training_set(2, data)
    assert valued == [5] and len(out) == 10 + 6  # Z holds 0.5 * 10 samples; floor(2/3 * 10) copies


def test_modality_level_decides_on_sums_reduced_across_ranks(monkeypatch):
    table = {1: [True] * 4, 2: [False] * 4, 3: [True] * 4}
    # local [sum phi_a, sum phi_v, n] = [6, 2, 4]; the other rank adds [0, 8, 4]: means 0.75 and 1.25
    monkeypatch.setattr(val, "all_reduce_sum", lambda t: t.add_(torch.tensor([0.0, 8.0, 4.0], dtype=t.dtype)))
    method, data = ready(table, level="modality", part_ratio=1.0)
    out = method.training_set(2, data)
    # gaps 0.25 and -0.25: audio is now the worse modality, d = 1/3, floor(4/3) = 1 copy keeping audio
    assert out.inputs[KEEP_KEY][4:].tolist() == [[True, False]]
    assert method.log()["phi/visual"] == pytest.approx(1.25)


def test_features_drop_zeroes_the_copys_features_before_fusion():
    model = make_model()
    method = build_method("valuation")
    method.setup(model)
    x, y = fake_batch(n=4)
    keep = torch.tensor([[True, True], [True, False], [False, True], [True, False]])
    out = method.forward(model, {**x, KEEP_KEY: keep})
    terms = method.loss(out, y)
    h = model(x).features
    masked = {"audio": h["audio"] * keep[:, :1], "visual": h["visual"] * keep[:, 1:]}
    assert torch.allclose(terms["ce"], F.cross_entropy(model.fuse(masked), y), atol=1e-6)
    assert not torch.allclose(terms["ce"], F.cross_entropy(model(x).logits, y))
    plain = method.loss(method.forward(model, x), y)  # no mask: the plain fused loss
    assert torch.allclose(plain["ce"], F.cross_entropy(model(x).logits, y), atol=1e-6)


def test_trainer_runs_resampled_epochs(tmp_path, tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["method.name=valuation", "method.warmup_epochs=1",
                                                  "data.n_train=100", "data.n_test=40", "train.probe=false"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    trainer.fit()
    first, second = trainer.history
    assert "train_size" not in first
    assert second["train_size"] >= len(trainer.splits.train)
    assert second["train_size"] == len(trainer.splits.train) + second["copies/audio"] + second["copies/visual"]


@pytest.mark.parametrize("bad", [dict(level="batch"), dict(warmup_epochs=-1), dict(warmup_epochs=1.5),
                                 dict(part_ratio=0), dict(part_ratio=1.5), dict(alpha=-1), dict(func="cubic"),
                                 dict(drop="labels"), dict(eval_batch_size=0)])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_method("valuation", **bad)


def test_needs_two_modalities_and_setup_before_valuing():
    with pytest.raises(ValueError, match="at least 2"):
        build_method("valuation").setup(make_model(("audio",)))
    method = build_method("valuation", warmup_epochs=0)
    with pytest.raises(RuntimeError, match="setup"):
        method.training_set(0, table_data())
