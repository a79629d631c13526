"""Mistakes a new user makes end in one line naming the key, file or value, and exit code 2;
nothing is overwritten or lost silently (issue: faults and bad input)."""
import json
import os
import pickle
import random
import warnings
from pathlib import Path

import pytest
import torch

from conftest import TINY, fake_batch, make_model
from equimodal.cli import main
from equimodal.config import load_config
from equimodal.errors import ConfigError, NonFiniteError
from equimodal.methods import MethodData, build_method, run_stages
from equimodal.train import Trainer, batches

SETS = [a for kv in TINY for a in ("--set", kv)]


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, named", [
    (["--set", "optim.momentum=-1"], "optim.momentum"),
    (["--set", "optim.weight_decay=-1"], "optim.weight_decay"),
    (["--set", "data.n_train=0"], "data.n_train"),
    (["--set", "data.val_fraction=1.5"], "data.val_fraction"),
    (["--fusion", "film", "--set", "model.estimator=exact"], "model.estimator"),
    (["--method", "ogm-ge", "--set", "data.modalities=[visual]"], "at least 2 modalities"),
    (["--set", "data.modalities=[visual,smell]"], "smell"),
    (["--method", "ssl", "--set", "method.then=ogmge"], "ogmge"),
    (["--method", "ssl", "--set", "method.then=ogmge", "--print-config"], "ogmge"),
    (["--method", "distill", "--set", "method.teacher=smell"], "teacher"),
    (["--method", "ssl", "--set", "method.projection_dim=0"], "projection_dim"),
    (["--method", "ogm-boost", "--set", "method.mode=suppress", "--set", "method.noise=sgn"], "sgn"),
    (["--method", "ogm-boost", "--set", "method.beta=2"], "beta"),
    (["--method", "ogm-boost", "--set", "method.fixed_factor=3"], "fixed_factor"),
])
def test_values_that_used_to_fail_late_stop_before_training(tmp_path, capsys, argv, named):
    rc, out, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), *argv)
    assert rc == 2
    assert named in one_error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    sets = [a for kv in TINY if "device" not in kv for a in ("--set", kv)]
    rc, _, err = run_cli(capsys, "train", "--device", "cuda", "--out", str(tmp_path / "r"), *sets)
    assert rc == 2 and "CUDA is not available" in one_error_line(err)


def test_data_errors_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli(capsys, "train", "--dataset", "avdigits", "--set", f"data.prepared={empty}",
                         "--out", str(tmp_path / "a"))
    assert rc == 2 and str(empty) in one_error_line(err)
    rc, _, err = run_cli(capsys, "train", "--dataset", "cremad", "--out", str(tmp_path / "b"))
    assert rc == 2 and "data.root" in one_error_line(err)
    rc, _, err = run_cli(capsys, "train", "--dataset", "cremad", "--set", f"data.root={empty}",
                         "--set", f"data.split_dir={empty}", "--out", str(tmp_path / "c"))
    assert rc == 2 and "train.csv" in one_error_line(err)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  seed: [1\n")
    rc, _, err = run_cli(capsys, "train", "--config", str(bad))
    line = one_error_line(err)
    assert rc == 2 and str(bad) in line and "line" in line and "unicode string" not in line


@pytest.fixture
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--out", str(out), *SETS, "--set", "train.select=best_val", "--set", "train.epochs=3"]) == 0
    return out


@pytest.mark.parametrize("kind", ["truncated", "random", "missing", "empty", "not-a-dict"])
def test_bad_checkpoints_are_named(tmp_path, capsys, finished_run, kind):
    path = tmp_path / "checkpoint.pt"
    data = (finished_run / "checkpoint.pt").read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-a-dict":
        torch.save(torch.zeros(3), path)
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", str(path))
    assert rc == 2 and str(path) in one_error_line(err)
    if kind in ("truncated", "random"):  # resume of a folder whose checkpoint is broken
        run = tmp_path / "run"
        run.mkdir()
        (run / "checkpoint.pt").write_bytes(path.read_bytes())
        rc, _, err = run_cli(capsys, "train", "--resume", str(run))
        assert rc == 2 and str(run / "checkpoint.pt") in one_error_line(err)


class _Boom:
    """Unpickling this would create a file: a checkpoint must never run it."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["EQUIMODAL_PWNED"]),))


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EQUIMODAL_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "epoch": 1, "model": _Boom(), "method": {}}, path, pickle_module=pickle)
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", str(path))
    assert rc == 2 and "refused" in one_error_line(err)
    assert not marker.exists()


def test_eval_uses_the_selected_epoch_and_matches_the_summary(capsys, finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", str(finished_run))
    result = json.loads(out)
    assert rc == 0 and result["evaluated_epoch"] == summary["selected_epoch"] + 1
    assert result["acc"] == summary["test_acc"]
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", str(finished_run), "--last")
    assert json.loads(out)["evaluated_epoch"] == summary["epochs"]


def test_a_finished_run_is_never_overwritten_silently(tmp_path, capsys, finished_run):
    before = (finished_run / "summary.json").read_text()
    rc, _, err = run_cli(capsys, "train", "--out", str(finished_run), *SETS, "--seed", "1")
    assert rc == 2 and "--resume" in one_error_line(err) and "--overwrite" in err
    assert (finished_run / "summary.json").read_text() == before
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in finished_run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    rc, _, _ = run_cli(capsys, "train", "--out", str(copy), *SETS, "--seed", "1", "--overwrite")
    assert rc == 0 and json.loads((copy / "summary.json").read_text())["seed"] == 1


def test_ctrl_c_prints_one_line_and_resume_with_no_progress_works(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    original = Trainer.train_epoch

    def interrupt_in_second_epoch(self, epoch, stage_epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch, stage_epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt_in_second_epoch)
    rc, _, err = run_cli(capsys, "train", "--out", str(out), *SETS)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 130 and len(lines) == 1 and "Traceback" not in err
    assert lines[0] == f"interrupted after epoch 1 of 2; continue with `equimodal train --resume {out}`"
    monkeypatch.setattr(Trainer, "train_epoch", original)
    rc, stdout, _ = run_cli(capsys, "train", "--resume", str(out), "--no-progress")
    assert rc == 0 and "after epoch 1 of 2" in stdout
    rc, _, err = run_cli(capsys, "train", "--resume", str(out), "--seed", "3")
    assert rc == 2 and "--resume" in one_error_line(err)


def test_resume_message_counts_every_stage(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    original = Trainer.train_epoch

    def interrupt(self, epoch, stage_epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return original(self, epoch, stage_epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt)
    rc, _, err = run_cli(capsys, "train", "--out", str(out), "--method", "distill", *SETS)
    assert rc == 130 and "after epoch 3 of 6" in err
    monkeypatch.setattr(Trainer, "train_epoch", original)
    rc, stdout, _ = run_cli(capsys, "train", "--resume", str(out))
    assert rc == 0 and "after epoch 3 of 6" in stdout


def test_learning_rate_logged_is_the_one_the_epoch_trained_at(tmp_path, tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["optim.lr=0.05", "optim.step_size=1", "train.probe=false"])
    Trainer(cfg, out_dir=tmp_path, echo=lambda s: None).fit()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.05, 0.005])


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_stops_with_a_message_or_is_skipped(tmp_path, tiny_overrides, policy, monkeypatch):
    cfg = load_config(overrides=tiny_overrides + ["method.name=ogm-ge", "train.probe=false", f"train.on_nan={policy}",
                                                  "train.epochs=2"])
    trainer = Trainer(cfg, out_dir=tmp_path, echo=lambda s: None)
    original = trainer.method.loss
    calls = {"n": 0}
    per_epoch = -(-len(trainer.splits.train) // 50)

    def poisoned(output, targets):
        calls["n"] += 1
        terms = original(output, targets)
        if calls["n"] == per_epoch + 3:  # third batch of the second epoch
            terms["ce"] = terms["ce"] * float("nan")
        return terms

    trainer.method.loss = poisoned
    if policy == "stop":
        good = None
        with pytest.raises(NonFiniteError) as info:
            trainer.fit()
        message = str(info.value)
        assert "epoch 2, batch 3" in message and "'ogm-ge'" in message and "k/" in message
        good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert good["epoch"] == 1 and all(torch.isfinite(v).all() for v in good["model"].values()
                                          if v.is_floating_point())
    else:
        summary = trainer.fit()
        assert trainer.history[1]["train_skipped_nonfinite_steps"] == 1
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
        assert summary["test_acc"] > 0.2


def test_update_level_lrs_are_restored_even_without_after_step():
    model = make_model()
    opt = torch.optim.SGD(model.param_groups(), lr=0.1)
    method = build_method("ogm-ge", level="update", alpha=1.0)
    method.setup(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(20):  # a loop that forgets after_step
            x, y = fake_batch(seed=step)
            sum(method.loss(model(x), y).values()).backward()
            method.before_step(model)
            opt.step()
            opt.zero_grad()
    assert sum("after_step" in str(w.message) for w in caught) == 1
    method.after_step(model)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1] * len(opt.param_groups))


def test_before_step_without_setup_says_so():
    with pytest.raises(RuntimeError, match=r"setup\(model, optimizer\)"):
        build_method("ogm-ge").before_step(make_model())


def test_progress_bars_never_reach_a_redirected_log(tmp_path, tiny_overrides, capfd):
    cfg = load_config(overrides=[o for o in tiny_overrides if "progress" not in o] + ["train.progress=true",
                                                                                      "train.probe=false"])
    Trainer(cfg, out_dir=tmp_path, echo=lambda s: None).fit()
    err = capfd.readouterr().err
    assert "\r" not in err and "it/s" not in err


def test_the_documented_loop_runs_ssl_through_its_supervised_stage():
    """_base.py's loop, as run_stages: ssl pre-trains, then its `then` method trains with labels."""
    from equimodal.data import load_dataset
    from equimodal.models import MultimodalModel, SmallCNN
    data = load_dataset("synthetic", n_train=600, n_test=200)
    torch.manual_seed(0)
    model = MultimodalModel({m: SmallCNN(width=16, out_dim=32) for m in ("visual", "audio")}, 10)
    method = build_method("ssl", pretrain_epochs=1)
    runner = run_stages(method, model, lambda m: torch.optim.SGD(m.param_groups(), lr=0.1, momentum=0.9),
                        lambda e: batches(data.train, 50, torch.Generator().manual_seed(e)), epochs=4,
                        data=MethodData(train=data.train, val=data.val),
                        val_batches=lambda: batches(data.val, 256))
    assert runner is method.stages()[-1].method and runner.name == "joint"
    model.eval()
    inputs, labels = data.test[torch.arange(len(data.test))]
    acc = float((runner.predict(model(inputs)).argmax(1) == labels).float().mean())
    assert acc > 0.4, acc  # chance is 0.1; a loop that kept training InfoNCE stays near chance


BENCH = ["bench", "--methods", "joint", "--seeds", "0,1", "--no-progress", *SETS, "--set", "train.epochs=1",
         "--set", "train.probe=false"]


def test_bench_refuses_to_reuse_runs_of_another_config(tmp_path, capsys):
    out = str(tmp_path / "bench")
    rc, first, _ = run_cli(capsys, *BENCH, "--out", out)
    assert rc == 0
    rc, again, _ = run_cli(capsys, *BENCH, "--out", out)
    assert rc == 0 and "done before, reused" in again
    rc, _, err = run_cli(capsys, *BENCH, "--out", out, "--set", "optim.lr=0.05")
    line = one_error_line(err)
    assert rc == 2 and "optim.lr: 0.1 -> 0.05" in line and "new --out" in line
    rc, _, _ = run_cli(capsys, *BENCH, "--out", out, "--no-progress")  # display-only keys do not count
    assert rc == 0


def test_bench_records_a_failing_run_and_goes_on(tmp_path, capsys, monkeypatch):
    original = Trainer.fit

    def fail_for_seed_1(self):
        if self.cfg["train"]["seed"] == 1:
            raise RuntimeError("simulated failure")
        return original(self)

    monkeypatch.setattr(Trainer, "fit", fail_for_seed_1)
    out = tmp_path / "bench"
    rc, stdout, err = run_cli(capsys, *BENCH, "--methods", "joint,ogm-ge", "--out", str(out))
    assert rc == 1 and "2 run(s) failed" in err and "simulated failure" in err
    failures = json.loads((out / "failures.json").read_text())
    assert {(f["label"], f["seed"]) for f in failures} == {("joint", 1), ("ogm-ge", 1)}
    assert (out / "results.md").is_file() and "| ogm-ge | 1 |" in (out / "results.md").read_text()
    monkeypatch.setattr(Trainer, "fit", original)  # the failed cells run on the next call; the others are reused
    rc, stdout, _ = run_cli(capsys, *BENCH, "--methods", "joint,ogm-ge", "--out", str(out))
    assert rc == 0 and stdout.count("done before, reused") == 2 and not (out / "failures.json").exists()


def test_checkpoint_fuzz_always_a_named_error(tmp_path, finished_run):
    """Random bytes, truncations and byte flips of a real checkpoint: a CheckpointError every time
    (or, for a flip that leaves a valid file, a clean load), never another exception."""
    from equimodal.errors import CheckpointError
    from equimodal.train.checkpoint import load_run_state
    good = (finished_run / "checkpoint.pt").read_bytes()
    rng = random.Random(7)
    for case in range(30):
        kind = case % 3
        if kind == 0:
            data = rng.randbytes(rng.randint(1, 5000))
        elif kind == 1:
            data = good[: rng.randint(1, len(good) - 1)]
        else:
            data = bytearray(good)
            for _ in range(8):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        path = tmp_path / f"c{case}.pt"
        path.write_bytes(data)
        try:
            load_run_state(path)
        except CheckpointError as exc:
            assert str(path) in str(exc)
