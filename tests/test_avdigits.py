"""AV-Digits from the real FSDD and MNIST files in ../shared/data (or $EQUIMODAL_DATA)."""
import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from equimodal.cli import main
from equimodal.data import load_dataset
from equimodal.data.audio import fix_length, log_mel_spectrogram, mel_filterbank, read_wav
from equimodal.data.avdigits import default_source, download_avdigits, prepare_avdigits, sha256

SOURCE = default_source()
pytestmark = pytest.mark.skipif(not (SOURCE / "fsdd" / "recordings").is_dir(),
                                reason=f"shared data not found at {SOURCE} (set EQUIMODAL_DATA)")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_avdigits(SOURCE, tmp_path_factory.mktemp("avd") / "official", progress=False)


def test_manifest_counts_checksums_and_disjoint_splits(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 2700, "test": 300}
    assert manifest["audio_shape"] == [40, 63]
    assert len(manifest["sources"]) == 3000 + 3
    rel = "fsdd/recordings/3_theo_7.wav"
    assert manifest["sources"][rel] == sha256(SOURCE / rel)
    pairs = manifest["pairs"]
    train_audio = {p["audio"] for p in pairs if p["split"] == "train"}
    test_audio = {p["audio"] for p in pairs if p["split"] == "test"}
    assert not train_audio & test_audio, "no recording in both splits"
    assert all(int(a.split("_")[2].split(".")[0]) <= 4 for a in test_audio), "official split: takes 0-4 are test"
    train_images = {(p["image_source"], p["image_index"]) for p in pairs if p["split"] == "train"}
    test_images = {(p["image_source"], p["image_index"]) for p in pairs if p["split"] == "test"}
    assert len(train_images) == 2700 and len(test_images) == 300, "images drawn without replacement"
    assert {s for s, _ in train_images} == {"mnist-train5k/mnist_5k.csv.gz"}
    assert {s for s, _ in test_images} == {"mnist/t10k-images-idx3-ubyte.gz"}
    assert all(p["label"] == int(p["audio"][0]) for p in pairs), "audio and image show the same digit"


def test_arrays_match_labels_and_images(prepared):
    arrays = torch.load(prepared / "avdigits.pt", weights_only=True)
    assert arrays["train"]["audio"].shape == (2700, 40, 63) and arrays["train"]["visual"].shape == (2700, 28, 28)
    assert torch.bincount(arrays["test"]["label"]).tolist() == [30] * 10
    manifest = json.loads((prepared / "manifest.json").read_text())
    first_test = next(p for p in manifest["pairs"] if p["split"] == "test")
    from equimodal.data.avdigits import read_idx
    images = read_idx(SOURCE / "mnist/t10k-images-idx3-ubyte.gz")
    assert torch.equal(arrays["test"]["visual"][0], torch.from_numpy(images[first_test["image_index"]].copy()))


def test_speaker_split_holds_out_speakers(tmp_path):
    out = prepare_avdigits(SOURCE, tmp_path / "spk", split="speaker", test_speakers=["theo", "lucas"], progress=False)
    pairs = json.loads((out / "manifest.json").read_text())["pairs"]
    test_speakers = {p["audio"].split("_")[1] for p in pairs if p["split"] == "test"}
    train_speakers = {p["audio"].split("_")[1] for p in pairs if p["split"] == "train"}
    assert test_speakers == {"theo", "lucas"} and not train_speakers & test_speakers
    with pytest.raises(ValueError, match="bob"):
        prepare_avdigits(SOURCE, tmp_path / "bad", split="speaker", test_speakers=["bob"], progress=False)


def test_loader_standardises_and_adds_noise(prepared):
    clean = load_dataset("avdigits", prepared=str(prepared), progress=False)
    assert clean.modalities == ("audio", "visual") and clean.num_classes == 10
    assert len(clean.train) + len(clean.val) == 2700 and len(clean.test) == 300
    x = torch.cat([clean.train.inputs["audio"], clean.val.inputs["audio"]])
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    noisy = load_dataset("avdigits", prepared=str(prepared), visual_noise=1.0, progress=False)
    diff = noisy.test.inputs["visual"] - clean.test.inputs["visual"]
    assert abs(float(diff.std()) - 1.0) < 0.02
    assert torch.equal(noisy.test.inputs["audio"], clean.test.inputs["audio"])
    with pytest.raises(ValueError, match="prepared with other parameters"):
        load_dataset("avdigits", prepared=str(prepared), split="speaker", progress=False)


def test_errors_name_the_missing_or_broken_file(tmp_path):
    src = tmp_path / "src"
    (src / "fsdd" / "recordings").mkdir(parents=True)
    for rel in ("mnist", "mnist-train5k"):
        shutil.copytree(SOURCE / rel, src / rel)
    with pytest.raises(FileNotFoundError, match="no WAV recordings"):
        prepare_avdigits(src, tmp_path / "o", progress=False)
    (src / "fsdd" / "recordings" / "0_george_0.wav").write_bytes(b"RIFF-not-really")
    with pytest.raises(ValueError, match="0_george_0.wav"):
        prepare_avdigits(src, tmp_path / "o", progress=False)
    (src / "fsdd" / "recordings" / "0_george_0.wav").unlink()
    (src / "fsdd" / "recordings" / "zero.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="zero.wav"):
        prepare_avdigits(src, tmp_path / "o", progress=False)
    (src / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        prepare_avdigits(src, tmp_path / "o", progress=False)


def test_audio_helpers():
    wav, rate = read_wav(SOURCE / "fsdd/recordings/0_george_0.wav")
    assert rate == 8000 and wav.abs().max() <= 1 and wav.dim() == 1
    assert fix_length(wav, 8000).shape == (8000,) and fix_length(torch.ones(10), 4).tolist() == [1] * 4
    fb = mel_filterbank(256, 40, 8000)
    assert fb.shape == (40, 129) and torch.all(fb >= 0) and torch.all(fb.sum(1) > 0)
    tone = torch.sin(2 * torch.pi * 1000 * torch.arange(8000) / 8000).unsqueeze(0)
    spec = log_mel_spectrogram(tone, 8000)
    peak_band = int(spec[0].mean(1).argmax())
    centres = fb.argmax(1) * 8000 / 256
    assert abs(float(centres[peak_band]) - 1000) < 150, "a 1 kHz tone peaks in the mel band around 1 kHz"


def test_download_from_local_http_server_and_cli_prepare(tmp_path, capsys):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SOURCE))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        raw = download_avdigits(tmp_path / "raw", mirror=url, progress=False)
        assert sha256(raw / "mnist/t10k-images-idx3-ubyte.gz") == sha256(SOURCE / "mnist/t10k-images-idx3-ubyte.gz")
        assert len(list((raw / "fsdd/recordings").glob("*.wav"))) == 3000
        rc = main(["data", "prepare", "avdigits", "--mirror", url, "--out", str(tmp_path / "cli"), "--no-progress"])
        assert rc == 0
        printed = capsys.readouterr().out
        assert "'train': 2700" in printed and "data.prepared=" in printed
    finally:
        server.shutdown()
