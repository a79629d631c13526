"""`equimodal eval` rebuilds every registered method's run (its own heads, the last stage's runner)
and scores the same test accuracy that training reported, for both selection rules."""
import json

import pytest

from equimodal.cli import main
from equimodal.methods import available_methods

METHODS = sorted(available_methods())
#: small enough that the whole registry runs in CI; 3 epochs (3 stages at most) so best_val can pick an earlier epoch
RUN = ["data.n_train=200", "data.n_test=100", "model.width=8", "model.feature_dim=16", "optim.lr=0.1",
       "train.epochs=3", "train.batch_size=50", "train.progress=false", "train.device=cpu", "train.probe=false",
       "train.stage_budget=shared"]
#: methods with more stages than the 3 epochs hold, shortened to 2 stages
FEWER_STAGES = {"reconboost": ["method.rounds=1"]}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", METHODS)
def test_eval_scores_what_training_reported(tmp_path, capsys, name):
    """One run with train.select=best_val serves both rules: `eval` scores the selected epoch
    (summary's test_acc), `eval --last` the last one (summary's last_epoch_test_acc, which is
    what train.select=last reports)."""
    out = tmp_path / "run"
    args = ["train", "--method", name, "--out", str(out), "--no-progress", "--set", "train.select=best_val"]
    for o in RUN + FEWER_STAGES.get(name, []):
        args += ["--set", o]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out)]) == 0
    selected = json.loads(capsys.readouterr().out)
    assert selected["acc"] == pytest.approx(summary["test_acc"], abs=1e-9), name
    assert selected["macro_f1"] == pytest.approx(summary["test_macro_f1"], abs=1e-9)
    assert selected["evaluated_epoch"] == summary["selected_epoch"] + 1
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--last"]) == 0
    last = json.loads(capsys.readouterr().out)
    assert last["acc"] == pytest.approx(summary["last_epoch_test_acc"], abs=1e-9), name
    assert last["evaluated_epoch"] == summary["epochs"]
