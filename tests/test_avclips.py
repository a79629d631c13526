"""The paper's dataset loaders on tiny fake layouts built here (WAV via the wave module, JPEG via PIL,
a short video via PyAV)."""

import numpy as np
import pytest
import torch
from PIL import Image

from equimodal.cli import main
from equimodal.config import load_config
from equimodal.data import load_dataset
from equimodal.data.video import write_wav
from equimodal.train import Trainer
from conftest import recomputed_test_acc


EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


def fake_layout(root, clips, rate=16000, seconds=1.2, fps=1, n_frames=2, size=(40, 30)):
    rng = np.random.default_rng(0)
    for clip in clips:
        t = np.arange(int(rate * seconds)) / rate
        write_wav(root / "audio" / f"{clip}.wav", (8000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16), rate)
        folder = root / "visual" / f"Image-{fps:02d}-FPS" / clip
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(n_frames):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"frame_{k + 1:05d}.jpg")


@pytest.fixture
def cremad(tmp_path):
    root = tmp_path / "cremad"
    train = [(f"10{i:02d}_X_{EMOTIONS[i % 6]}_XX", EMOTIONS[i % 6]) for i in range(24)]
    test = [(f"20{i:02d}_X_{EMOTIONS[i % 6]}_XX", EMOTIONS[i % 6]) for i in range(6)]
    fake_layout(root, [c for c, _ in train + test])
    (root / "train.csv").write_text("".join(f"{c},{e}\n" for c, e in train))
    (root / "test.csv").write_text("".join(f"{c},{e}\n" for c, e in test))
    return root


def test_cremad_shapes_labels_split_and_cache(cremad, tmp_path):
    cache = tmp_path / "cache"
    splits = load_dataset("cremad", root=str(cremad), cache_dir=str(cache), val_fraction=0.25)
    assert len(splits.train) + len(splits.val) == 24 and len(splits.test) == 6
    assert splits.num_classes == 6
    inputs, label = splits.test[0]
    assert inputs["audio"].shape == (1, 257, 188), "22,050 Hz, 3 s tiled, n_fft 512, hop 353"
    assert inputs["visual"].shape == (3, 1, 224, 224)
    assert int(label) == EMOTIONS.index("NEU"), "official class order"
    assert set(splits.train.clips).isdisjoint(splits.val.clips)
    cached = list(cache.glob("cremad-spec-*/*.npy"))
    assert len(cached) == 1, "the spectrogram is cached on first use"
    again, _ = splits.test[0]
    assert torch.allclose(again["audio"], inputs["audio"], atol=1e-2)  # float16 cache
    batch, labels = splits.train[[0, 1, 2]]
    assert batch["visual"].shape == (3, 3, 1, 224, 224) and labels.shape == (3,)


def test_training_frames_are_random_and_used_test_frames_fixed(tmp_path):
    root = tmp_path / "ks"
    clips = [f"c{i}" for i in range(4)]
    fake_layout(root, clips, n_frames=6)
    (root / "train.csv").write_text("c0,a\nc1,b\nc2,a\n")
    (root / "test.csv").write_text("c3,b\n")
    splits = load_dataset("kinetics-sounds", root=str(root), cache_dir=str(tmp_path / "c"), image_size=32,
                          val_fraction=0.0)
    x, _ = splits.train[0]
    assert x["visual"].shape == (3, 3, 32, 32) and x["audio"].shape == (1, 129, 626)
    views = []
    for epoch in range(4):
        splits.train.set_epoch(epoch)
        views.append(splits.train[0][0]["visual"])
    assert any(not torch.equal(views[0], v) for v in views[1:]), "random crops/frames differ across epochs"
    assert torch.equal(splits.test[0][0]["visual"], splits.test[0][0]["visual"])


def test_missing_files_are_named_or_skipped_and_counted(cremad, tmp_path, capsys):
    victim = sorted((cremad / "audio").iterdir())[3]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_dataset("cremad", root=str(cremad), cache_dir=str(tmp_path / "c"))
    splits = load_dataset("cremad", root=str(cremad), cache_dir=str(tmp_path / "c"), skip_missing=True)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 29
    assert "skipped" in capsys.readouterr().out
    (cremad / "test.csv").write_text("2000_X_NEU_XX,BORED\n")
    with pytest.raises(ValueError, match="BORED"):
        load_dataset("cremad", root=str(cremad), cache_dir=str(tmp_path / "c"), skip_missing=True)
    with pytest.raises(ValueError, match="data.root"):
        load_dataset("cremad")


def test_cremad_falls_back_to_the_official_split_lists(tmp_path):
    from equimodal.data.avdigits import default_source
    if not (default_source() / "crema-d" / "train.csv").is_file():
        pytest.skip("shared/data/crema-d not available")
    root = tmp_path / "empty"
    (root / "audio").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="6698|missing"):
        load_dataset("cremad", root=str(root), cache_dir=str(tmp_path / "c"))


def test_short_training_run_with_resnet18_on_fake_cremad(cremad, tmp_path):
    cfg = load_config(overrides=["data.name=cremad", f"data.root={cremad}", f"data.cache_dir={tmp_path / 'c'}",
                                 "data.image_size=32", "data.val_fraction=0.25", "method.name=ogm-ge",
                                 "train.epochs=1", "train.batch_size=8", "train.progress=false", "train.probe=false",
                                 "train.device=cpu"])
    trainer = Trainer(cfg, out_dir=tmp_path / "run", echo=lambda s: None)
    assert type(trainer.model.encoder("audio")).__name__ == "AudioResNet18"
    summary = trainer.fit()
    assert summary["test_acc"] == pytest.approx(recomputed_test_acc(trainer), abs=1e-12)
    assert "k/audio" in trainer.history[-1]


def _write_video(path, seconds=2.2, rate=16000, audio=True):
    av = pytest.importorskip("av")
    out = av.open(str(path), "w")
    vs = out.add_stream("mpeg4", rate=10)
    vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
    astream = out.add_stream("aac", rate=rate) if audio else None
    for i in range(int(seconds * 10)):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 9, dtype=np.uint8), format="rgb24")
        for pkt in vs.encode(frame):
            out.mux(pkt)
    for pkt in vs.encode():
        out.mux(pkt)
    if audio:
        t = np.arange(int(rate * seconds)) / rate
        sig = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
        for k in range(0, sig.size, 1024):
            af = av.AudioFrame.from_ndarray(sig[k:k + 1024].reshape(1, -1), format="s16", layout="mono")
            af.sample_rate = rate
            for pkt in astream.encode(af):
                out.mux(pkt)
        for pkt in astream.encode():
            out.mux(pkt)
    out.close()


def test_prepare_from_videos_with_pyav_then_load(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for clip in ("1001_A_HAP_XX", "1002_A_SAD_XX"):
        _write_video(videos / f"{clip}.mp4")
    root = tmp_path / "root"
    assert main(["data", "prepare", "cremad", "--videos", str(videos), "--out", str(root), "--no-progress"]) == 0
    assert "extracted 2 clip(s)" in capsys.readouterr().out
    frames = sorted((root / "visual" / "Image-01-FPS" / "1001_A_HAP_XX").iterdir())
    assert len(frames) == 3, "2.2 s at 1 fps: frames at 0, 1 and 2 s"
    from equimodal.data.audio import read_wav
    wave_, rate = read_wav(root / "audio" / "1001_A_HAP_XX.wav")
    assert rate == 22050 and abs(wave_.numel() / rate - 2.2) < 0.2
    (root / "train.csv").write_text("1001_A_HAP_XX,HAP\n")
    (root / "test.csv").write_text("1002_A_SAD_XX,SAD\n")
    splits = load_dataset("cremad", root=str(root), cache_dir=str(tmp_path / "c"), val_fraction=0.0)
    assert splits.test[0][0]["audio"].shape == (1, 257, 188)
    _write_video(videos / "silent.mp4", audio=False)
    assert main(["data", "prepare", "cremad", "--videos", str(videos), "--out", str(root), "--no-progress"]) == 2
    assert "silent.mp4" in capsys.readouterr().err
    assert main(["data", "prepare", "cremad", "--videos", str(videos), "--out", str(root), "--no-progress",
                 "--skip-bad"]) == 0
    assert "skipped 1" in capsys.readouterr().out


def test_gpu_cremad_script_runs_on_the_fake_layout_with_a_tiny_budget(cremad, tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_cremad.sh"
    env = {**os.environ, "EPOCHS": "1", "SEEDS": "0", "DEVICE": "cpu", "WORKERS": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if shutil.which("equimodal", path=env["PATH"]) is None:
        pytest.skip("the equimodal command is not installed in this environment")
    done = subprocess.run(["bash", str(script), str(cremad), str(tmp_path / "out"), "--set", "data.image_size=32",
                           "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", "data.val_fraction=0.25",
                           "--set", "train.probe=false"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "acc audio (%)" in done.stdout and "ogm-ge:alpha=0.8" in done.stdout
