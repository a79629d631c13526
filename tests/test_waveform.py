"""AV-Digits with raw-waveform audio (data.audio=waveform): the 1-D path on real recordings."""
import pytest
import torch

from equimodal.config import load_config
from equimodal.data import load_dataset
from equimodal.data.audio import fix_length, read_wav
from equimodal.data.avdigits import default_source, prepare_avdigits
from equimodal.errors import DataError
from equimodal.models.encoders import CNN1d
from equimodal.train import Trainer

SOURCE = default_source()
pytestmark = pytest.mark.skipif(not (SOURCE / "fsdd" / "recordings").is_dir(),
                                reason=f"shared data not found at {SOURCE} (set EQUIMODAL_DATA)")


def test_waveform_audio_is_the_raw_signal_and_trains_with_the_1d_cnn(tmp_path):
    prepared = prepare_avdigits(SOURCE, tmp_path / "avd", progress=False)
    opts = {"prepared": str(prepared), "cache_dir": str(tmp_path / "cache"), "progress": False}
    waves = load_dataset("avdigits", audio="waveform", **opts)
    spec = load_dataset("avdigits", **opts)
    assert waves.train.inputs["audio"].shape[1:] == (1, 8000) and spec.train.inputs["audio"].shape[1:] == (1, 40, 63)
    assert torch.equal(waves.test.labels, spec.test.labels) and torch.equal(waves.test.inputs["visual"],
                                                                            spec.test.inputs["visual"])
    # the first test recording (sorted names: 0_george_0.wav), standardised with training statistics
    raw = fix_length(read_wav(SOURCE / "fsdd/recordings/0_george_0.wav")[0], 8000)
    x = waves.test.inputs["audio"][0, 0]
    assert torch.corrcoef(torch.stack([x, raw.float()]))[0, 1] > 0.9999
    with pytest.raises(DataError, match="waveform"):
        load_dataset("avdigits", audio="wave", **opts)
    overrides = ["data.name=avdigits", "data.audio=waveform", f"data.prepared={prepared}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.progress=false", "data.modalities=[audio]", "train.epochs=1", "train.batch_size=256",
                 "train.progress=false", "train.device=cpu", "model.width=8", "model.feature_dim=16", "train.probe=false"]
    trainer = Trainer(load_config(overrides=overrides), out_dir=tmp_path / "run", echo=lambda s: None)
    assert type(trainer.model.encoder("audio")) is CNN1d
    summary = trainer.fit()
    assert set(summary["test_acc_by_modality"]) == {"audio"} and 0 <= summary["test_acc"] <= 1
    out = trainer.model(trainer.splits.test[list(range(4))][0])
    assert out.logits.shape == (4, 10) and out.features["audio"].shape == (4, 16)
