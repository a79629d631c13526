"""The decision-layer shares on a hand-built linear concat head, where they have closed forms."""
import pytest
import torch
from torch import nn

from equimodal.analysis.decision import decision_layer_shares
from equimodal.data import TensorMultimodalDataset


class Identity(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.out_dim = dim

    def forward(self, x):
        return x


class Concat(nn.Module):
    """Features pass through unchanged; logits = [h_a, h_v] W^T with hand-placed blocks."""

    modalities = ("audio", "visual")

    def __init__(self, w_a, w_v):
        super().__init__()
        self.w_a, self.w_v = w_a, w_v

    def encode(self, inputs):
        return dict(inputs)

    def fuse(self, feats):
        return feats["audio"] @ self.w_a.t() + feats["visual"] @ self.w_v.t()


def test_shares_are_the_block_norms_of_a_linear_head():
    w_a = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # Frobenius norm 5
    w_v = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # Frobenius norm 1
    model = Concat(w_a, w_v)
    x = {"audio": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "visual": torch.tensor([[2.0, 0.0], [2.0, 0.0]])}
    data = TensorMultimodalDataset(x, torch.tensor([0, 1]), 2)
    shares = decision_layer_shares(model, data)
    assert shares["audio"]["weight_share"] == pytest.approx(5 / 6)
    assert shares["visual"]["weight_share"] == pytest.approx(1 / 6)
    # logit scale: |W_a x_a| = 3 and 4 (mean 3.5); |W_v x_v| = 2 and 2
    assert shares["audio"]["logit_share"] == pytest.approx(3.5 / 5.5)
    assert shares["visual"]["logit_share"] == pytest.approx(2 / 5.5)


def test_a_model_without_fuse_is_a_named_error():
    with pytest.raises(TypeError, match="'encode' and 'fuse'"):
        decision_layer_shares(nn.Linear(2, 2), None)
