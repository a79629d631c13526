"""Every registered method, 2 processes (torchrun, gloo) vs 1 process with the same global batch:
the same parameters to float tolerance (``model.norm=group``, so the split of the batch over ranks
is the only difference). One launch per process count trains the whole registry, which keeps the
test to two process-group start-ups."""
import json
import subprocess

import pytest
import torch

from equimodal.methods import available_methods
from test_ddp import ENV, launcher

METHODS = sorted(available_methods())
RUN = ["data.n_train=240", "data.n_test=60", "model.width=8", "model.feature_dim=16", "optim.lr=0.05",
       "train.batch_size=40", "train.progress=false", "train.device=cpu", "train.probe=false",
       "train.epochs=3", "train.stage_budget=shared", "model.norm=group", "train.loggers=[]"]
#: more stages than the epochs hold otherwise
EXTRA = {"reconboost": ["method.rounds=1"]}
#: methods whose rule draws per rank or reads the local batch by design (each docstring says so), so
#: 2 processes and 1 cannot agree draw for draw; for them the test checks that the ranks agree
PER_RANK_DRAWS: dict[str, str] = {
    "amco": "its logit mask is drawn from a generator seeded by (seed, step, rank)",
    "cml": "its removal orders are drawn per sample seeded by rank, and the penalty is summed over the local batch",
    "modality-dropout": "its feature masks are seeded by (seed, step, micro-batch, rank)",
    "opm": "its feature masks are seeded by (seed, step, micro-batch, rank)",
    "midas": "its misaligned partners are drawn within the local batch",
    "ssl": "its InfoNCE contrasts each rank's own batch (negatives are local)",
}
#: equivalence not reached yet, cause not found (strict: the test says when it starts to hold)
NOT_YET: dict[str, str] = {
    "inforeg": "1.4e-3 apart after 3 epochs (17 of 20 tensors); its per-step pull decision is the first suspect",
    "reconboost": "1.4e-3 apart after 3 epochs (17 of 25 tensors)",
}

WORKER = """
import json, sys, torch
from equimodal.config import load_config
from equimodal.train import Trainer
out, names, extra, run = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3]), json.loads(sys.argv[4])
for name in names:
    trainer = Trainer(load_config(overrides=[*run, f"method.name={name}", *extra.get(name, [])]),
                      out_dir=f"{out}/{name}", echo=lambda s: None, overwrite=True)
    trainer.fit()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    params.update({f"method.{i}": p.detach().clone() for i, p in enumerate(trainer.active.parameters())})
    torch.save(params, f"{out}/{name}/rank{trainer.rank}.pt")
from equimodal import _dist
_dist.exit_worker(0)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_registry")
    script = root / "worker.py"
    script.write_text(WORKER)
    outs = {}
    for nproc in (1, 2):
        out = root / f"p{nproc}"
        out.mkdir()
        proc = subprocess.run([*launcher(nproc), str(script), str(out), ",".join(METHODS), json.dumps(EXTRA),
                               json.dumps(RUN)], env=ENV, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[nproc] = out
    return outs


@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.xfail(reason=NOT_YET[m], strict=True))
                                  if m in NOT_YET else m for m in METHODS])
def test_two_processes_match_one_process(runs, name):
    one = torch.load(runs[1] / name / "rank0.pt", weights_only=True)
    two = [torch.load(runs[2] / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert one.keys() == two[0].keys() == two[1].keys()
    for k in one:
        assert torch.equal(two[0][k], two[1][k]), f"{name}: ranks disagree on {k}"
    if name in PER_RANK_DRAWS:
        pytest.skip(f"{name}: {PER_RANK_DRAWS[name]}; ranks checked to agree")
    worst = max(float(((one[k] - two[0][k]).abs() / (one[k].abs() + 1e-3)).max()) for k in one)
    for k in one:  # float tolerance over 3 epochs of SGD with momentum (0.1%)
        assert torch.allclose(one[k], two[0][k], rtol=1e-3, atol=1e-4), f"{name}: {k} (worst relative {worst:.2e})"
