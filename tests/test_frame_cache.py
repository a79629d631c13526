"""The frame cache of the paper-dataset loaders: frames decoded once at a fixed short side (uint8,
memory-mapped .npy), augmented on tensors; cached and uncached paths give the same tensors."""
import numpy as np
import pytest
import torch
from PIL import Image

from equimodal.data import load_dataset
from equimodal.data.avclips import augment_frame, resize_short_side
from equimodal.data.base import iterate_batches
from equimodal.errors import DataError

from test_avclips import fake_layout


@pytest.fixture
def ks(tmp_path):
    root = tmp_path / "ks"
    fake_layout(root, [f"c{i}" for i in range(5)], n_frames=4, size=(48, 36))
    (root / "train.csv").write_text("c0,a\nc1,b\nc2,a\nc3,b\n")
    (root / "test.csv").write_text("c4,b\n")
    return root


def _load(root, cache, **opts):
    opts = {"image_size": 24, "frame_side": 30, "val_fraction": 0.0, **opts}
    return load_dataset("kinetics-sounds", root=str(root), cache_dir=str(cache), **opts)


def test_cached_and_uncached_frames_are_identical_for_the_same_seed(ks, tmp_path):
    cached, plain = _load(ks, tmp_path / "c"), _load(ks, "off")
    for epoch in range(3):
        for split in ("train", "test"):
            a, b = getattr(cached, split), getattr(plain, split)
            a.set_epoch(epoch), b.set_epoch(epoch)
            for i in range(len(a)):
                xa, ya = a[i]
                xb, yb = b[i]
                assert torch.equal(xa["visual"], xb["visual"]), (split, epoch, i)
                assert xa["visual"].shape == (3, 3, 24, 24) and int(ya) == int(yb)
    files = sorted((tmp_path / "c").glob("kinetics-sounds-frames-*/*.npy"))
    assert [f.stem for f in files] == [f"c{i}" for i in range(5)], "one file per clip, written on first use"
    arr = np.load(files[0], mmap_mode="r")
    assert arr.dtype == np.uint8 and arr.shape == (4, 30, 40, 3), "every frame at short side 30"
    # a warm cache (a new dataset object reading the files) gives the same tensors again
    again = _load(ks, tmp_path / "c").train
    again.set_epoch(2)
    plain.train.set_epoch(2)
    assert torch.equal(again[1][0]["visual"], plain.train[1][0]["visual"])
    # random crops and frame choices still vary across epochs
    views = []
    for epoch in range(4):
        again.set_epoch(epoch)
        views.append(again[0][0]["visual"])
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_the_frame_cache_is_keyed_by_its_parameters_and_rebuilt_when_damaged(ks, tmp_path):
    cache = tmp_path / "c"
    _load(ks, cache).test[0]
    _load(ks, cache, frame_side=26).test[0]
    assert len(list(cache.glob("kinetics-sounds-frames-*"))) == 2, "another frame_side, another folder"
    fresh = _load(ks, "off").test[0][0]["visual"]
    path = next(f for f in cache.glob("kinetics-sounds-frames-*/c4.npy") if np.load(f).shape[1] == 30)
    for bad in (b"", b"garbage", path.read_bytes()[:60]):
        path.write_bytes(bad)
        assert torch.equal(_load(ks, cache).test[0][0]["visual"], fresh)
        assert np.load(path).shape == (4, 30, 40, 3), "rewritten"
    np.save(path, np.zeros((4, 30, 40, 3), dtype=np.float32))  # loads, but is not this cache's format
    assert torch.equal(_load(ks, cache).test[0][0]["visual"], fresh)
    assert np.load(path).dtype == np.uint8
    with pytest.raises(DataError, match="frame_side"):
        _load(ks, cache, frame_side=0)


def test_tensor_augmentation_matches_the_pil_pipeline_closely():
    """The tensor path (uint8 antialiased bilinear) stays close to PIL's resize of the same crop."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)).resize((120, 90), Image.BILINEAR)
    frame = resize_short_side(img, 60)
    assert frame.shape == (60, 80, 3)
    out = augment_frame(torch.from_numpy(frame.copy()), 32, None)
    ref = np.asarray(Image.fromarray(frame).resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    ref = torch.from_numpy(((ref - mean) / std).transpose(2, 0, 1)).float()
    assert (out - ref).abs().mean() < 0.05 and out.shape == (3, 32, 32)


def test_persistent_workers_are_kept_and_see_each_epoch(ks, tmp_path):
    """num_workers=2 with persistent workers: one loader (and its workers) for every pass, and each
    pass's batches equal the in-process ones of the same epoch (the epoch travels with the batch)."""
    train = _load(ks, tmp_path / "c").train
    for epoch in (0, 1, 2):
        train.set_epoch(epoch)
        gen = lambda: torch.Generator().manual_seed(epoch)  # noqa: E731
        here = list(iterate_batches(train, 2, gen()))
        there = list(iterate_batches(train, 2, gen(), num_workers=2, persistent_workers=True))
        assert len(here) == len(there) == 2
        for (xa, ya), (xb, yb) in zip(here, there):
            assert torch.equal(ya, yb) and torch.equal(xa["visual"], xb["visual"]) and torch.equal(xa["audio"], xb["audio"])
        assert len(train._equimodal_loaders) == 1, "the same loader serves every pass"
    loader = next(iter(train._equimodal_loaders.values()))[0]
    assert loader.persistent_workers and loader._iterator is not None


def test_trainer_with_persistent_workers_trains_as_in_process(ks, tmp_path):
    """train.num_workers=2 (persistent workers, epoch per batch) gives the run of num_workers=0."""
    from equimodal.config import load_config
    from equimodal.train import Trainer
    losses = {}
    for workers in (0, 2):
        cfg = load_config(overrides=["data.name=kinetics-sounds", f"data.root={ks}", f"data.cache_dir={tmp_path / 'c'}",
                                     "data.image_size=24", "data.frame_side=30", "data.val_fraction=0.5",
                                     "train.epochs=2", "train.batch_size=1", f"train.num_workers={workers}",
                                     "train.progress=false", "train.probe=false", "train.device=cpu"])
        trainer = Trainer(cfg, out_dir=tmp_path / f"w{workers}", echo=lambda s: None)
        trainer.fit()
        losses[workers] = [rec["train_loss"] for rec in trainer.history]
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)
