"""mfeat (UCI Multiple Features) from the real files in ../shared/data/mfeat (or $EQUIMODAL_DATA)."""
import shutil

import numpy as np
import pytest
import torch

from equimodal.config import load_config
from equimodal.data import load_dataset
from equimodal.data.avdigits import default_source
from equimodal.data.mfeat import FEATURES, VIEWS, split_indices
from equimodal.errors import DataError, DataNotFoundError
from equimodal.train import Trainer

SOURCE = default_source()
pytestmark = pytest.mark.skipif(not (SOURCE / "mfeat" / "mfeat-fac.csv").is_file(),
                                reason=f"shared data not found at {SOURCE} (set EQUIMODAL_DATA)")


def test_six_aligned_views_a_stratified_split_and_training_statistics_only():
    splits = load_dataset("mfeat")
    assert splits.modalities == VIEWS and splits.num_classes == 10
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1350, 150, 500)
    for part, per_class in ((splits.train, 135), (splits.val, 15), (splits.test, 50)):
        assert torch.bincount(part.labels, minlength=10).tolist() == [per_class] * 10
    for view in VIEWS:
        assert splits.train.inputs[view].shape[1] == FEATURES[view]
    # standardised with the training part only: mean 0 / std 1 there, not on validation or test
    x = splits.train.inputs["pix"]
    assert x.mean(0).abs().max() < 1e-4 and (x.std(0) - 1).abs().max() < 1e-3
    assert splits.test.inputs["pix"].mean(0).abs().max() > 1e-3
    # the same rows of the raw files: a test sample's raw pixel view matches its label's block
    raw = np.loadtxt(SOURCE / "mfeat" / "mfeat-mor.csv", delimiter=",", skiprows=1)
    assert sorted(raw[:, -1].astype(int).tolist()) == sorted([d for d in range(10) for _ in range(200)])


def test_splits_are_disjoint_and_seeded():
    a, b = load_dataset("mfeat", modalities=["mor"]), load_dataset("mfeat", modalities=["mor"])
    assert torch.equal(a.test.inputs["mor"], b.test.inputs["mor"])
    c = load_dataset("mfeat", modalities=["mor", "zer"], split_seed=1)
    assert not torch.equal(a.test.labels, c.test.labels) or not torch.equal(a.test.inputs["mor"], c.test.inputs["mor"])
    labels = torch.arange(10).repeat_interleave(200)  # the files' layout: blocks of 200 per digit
    for seed in (0, 1):
        train, val, test = split_indices(labels, 50, 0.1, seed)
        assert sorted(torch.cat([train, val, test]).tolist()) == list(range(2000))  # disjoint, complete
        assert torch.bincount(labels[test]).tolist() == [50] * 10


def test_a_view_subset_trains_through_the_trainer_with_mlp_encoders(tmp_path):
    cfg = load_config(overrides=["data.name=mfeat", "data.modalities=[fou,kar,zer]", "train.epochs=1",
                                 "train.progress=false", "method.name=ogm-ge", "method.params=all"])
    summary = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None).fit()
    assert summary["modalities"] == ["fou", "kar", "zer"] and 0.3 < summary["test_acc"] <= 1
    assert set(summary["probe_val_acc_by_modality"]) == {"fou", "kar", "zer"}


def test_bad_files_and_options_are_named(tmp_path):
    with pytest.raises(DataError, match="no view"):
        load_dataset("mfeat", modalities=["fac", "bogus"])
    with pytest.raises(DataError, match="test_per_class"):
        load_dataset("mfeat", test_per_class=200)
    with pytest.raises(DataNotFoundError, match="mfeat-fac.csv"):
        load_dataset("mfeat", source=str(tmp_path), modalities=["fac"])
    folder = tmp_path / "mfeat"
    folder.mkdir()
    shutil.copy(SOURCE / "mfeat" / "mfeat-mor.csv", folder)
    lines = (folder / "mfeat-mor.csv").read_text().splitlines()
    (folder / "mfeat-mor.csv").write_text("\n".join(lines[:-5]) + "\n")  # truncated
    with pytest.raises(DataError, match=r"mfeat-mor.csv: expected 2000 rows x 7 columns .* found 1995"):
        load_dataset("mfeat", source=str(tmp_path), modalities=["mor"])
    (folder / "mfeat-mor.csv").write_text("\n".join(lines[:3] + ["1,0,0,oops,1,1,0"] + lines[4:]) + "\n")
    with pytest.raises(DataError, match="not a numeric CSV"):
        load_dataset("mfeat", source=str(tmp_path), modalities=["mor"])
