"""ResNet-18 encoders: parameter counts (torchvision's resnet18 without its fc) and shapes."""
import torch

from equimodal.methods.ogm_ge import modulated_parameters
from equimodal.models import AudioResNet18, MultimodalModel, VisualResNet18


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_resnet18():
    # torchvision resnet18: 11,689,512 parameters, of which fc (512*1000 + 1000) = 513,000
    assert count(VisualResNet18()) == 11_689_512 - 513_000
    # one input channel: conv1 has 64*1*7*7 instead of 64*3*7*7 weights
    assert count(AudioResNet18()) == 11_689_512 - 513_000 - 64 * 2 * 49


def test_output_shapes_and_time_pooling():
    torch.manual_seed(0)
    audio, visual = AudioResNet18().eval(), VisualResNet18().eval()
    assert audio(torch.randn(2, 1, 257, 188)).shape == (2, 512)
    frames = torch.randn(2, 3, 3, 64, 64)
    out = visual(frames)
    assert out.shape == (2, 512)
    with torch.no_grad():  # pooled over time: the mean of per-frame pooled features
        per_frame = torch.stack([visual(frames[:, :, t]) for t in range(3)]).mean(0)
    assert torch.allclose(out, per_frame, atol=1e-5)


def test_ogm_conv_selection_on_resnet_is_the_4d_weights():
    enc = AudioResNet18()
    chosen = modulated_parameters(enc, "conv")
    assert chosen and all(p.dim() == 4 for p in chosen)
    assert len(chosen) == sum(1 for p in enc.parameters() if p.dim() == 4) == 20
    model = MultimodalModel({"audio": AudioResNet18(), "visual": VisualResNet18()}, 6)
    assert model.fusion.fc.in_features == 1024
