"""Checkpoints with the right keys but inconsistent contents: one error line from `eval` and
`--resume`, never a traceback; the stored config goes through the same check as a fresh one."""
import json

import pytest
import torch

from conftest import TINY
from equimodal.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    args = ["train", "--out", str(out), "--no-progress"]
    for o in TINY + ["train.epochs=1", "train.probe=false", "data.n_train=200"]:
        args += ["--set", o]
    assert main(args) == 0
    return out


def _tampered(run, tmp_path, change):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    change(state)
    folder = tmp_path / "tampered"
    folder.mkdir()
    torch.save(state, folder / "checkpoint.pt")
    return folder


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


CASES = {
    "unknown method": (lambda s: s["config"]["method"].update(name="no-such-method"), ["no-such-method"]),
    "config not a dict": (lambda s: s.update(config=[1, 2]), ["stored config"]),
    "config without train": (lambda s: s["config"].pop("train"), ["'train'"]),
    "invalid method option": (lambda s: s["config"]["method"].update(bogus=1), ["bogus"]),
    "non-integer epoch": (lambda s: s.update(epoch=1.5), ["'epoch'"]),
    "config that disagrees with the weights": (lambda s: s["config"]["model"].update(width=32), ["do not fit"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_an_inconsistent_checkpoint_is_one_error_line(run, tmp_path, capsys, case, command):
    change, needles = CASES[case]
    folder = _tampered(run, tmp_path, change)
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(folder)] if command == "eval" else ["train", "--resume", str(folder)]
    assert main(argv) == 2
    _one_error_line(capsys, str(folder / "checkpoint.pt"), *needles)


def test_a_yaml_file_given_as_a_checkpoint_is_called_what_it_is(run, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "config.yaml")]) == 2
    line = _one_error_line(capsys, "not a torch checkpoint", "text")
    assert "weights_only" not in line and "objects" not in line


def test_eval_with_a_device_that_does_not_exist_is_one_error_line(run, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--device", "foo"]) == 2
    _one_error_line(capsys, "'foo'")


def test_resume_takes_the_checkpoint_file_as_well_as_its_folder(run, capsys):
    summary = json.loads((run / "summary.json").read_text())
    assert main(["train", "--resume", str(run / "checkpoint.pt")]) == 0  # finished: re-reports
    assert json.loads((run / "summary.json").read_text())["test_acc"] == summary["test_acc"]
