"""train.loggers: per-epoch figures, per-step coefficient traces and the summary, read back."""
import csv
import json
import sys

import pytest

from equimodal.config import load_config
from equimodal.errors import ConfigError
from equimodal.train import Trainer

SMALL = ["data.n_train=300", "data.n_test=100", "model.width=8", "model.feature_dim=16", "optim.lr=0.1",
         "train.batch_size=50", "train.progress=false", "train.device=cpu", "train.probe=false",
         "method.name=ogm-ge"]


def run(out, *overrides, fit=True):
    t = Trainer(load_config(overrides=[*SMALL, *overrides]), out_dir=out, echo=lambda s: None)
    seen = []
    original = t.method.before_step

    def record(model):
        original(model)
        seen.append(t.method.last_coefficients.clone())

    t.method.before_step = record
    summary = t.fit() if fit else None
    return t, seen, summary


def test_jsonl_csv_and_tensorboard_hold_epochs_steps_and_summary(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    t, seen, summary = run(out, "train.epochs=2", "train.loggers=[jsonl, csv, tensorboard]")
    n = t.optimizer_steps
    assert n == len(seen) == 2 * 6  # 270 training samples, batches of 50
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # jsonl: one row per optimizer step with this step's k per modality
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, n + 1)) and [s["epoch"] for s in steps] == [0] * 6 + [1] * 6
    for row, k in zip(steps, seen):
        assert [row["k/visual"], row["k/audio"]] == pytest.approx(k.tolist())
    assert sum(s["k/visual"] for s in steps[:6]) / 6 == pytest.approx(epochs[0]["k/visual"], rel=1e-5)
    # csv: every per-epoch figure (nested ones flattened), long-format steps, the summary
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert float(rows[1]["val_acc"]) == pytest.approx(epochs[1]["val_acc"])
    assert float(rows[1]["val_acc_by_modality/audio"]) == pytest.approx(epochs[1]["val_acc_by_modality"]["audio"])
    with open(out / "steps.csv", newline="") as fh:
        long = [r for r in csv.DictReader(fh) if r["name"] == "k/audio"]
    assert [float(r["value"]) for r in long] == pytest.approx([k[1].item() for k in seen])
    with open(out / "summary.csv", newline="") as fh:
        table = {r["name"]: r["value"] for r in csv.DictReader(fh)}
    assert float(table["test_acc"]) == pytest.approx(summary["test_acc"])
    # tensorboard: read the event file back
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"val_acc", "train_loss", "k/visual", "val_acc_by_modality/audio", "step/k/visual", "summary/test_acc"} <= set(tags)
    assert [e.step for e in events.Scalars("val_acc")] == [6, 12]  # x-axis: optimizer steps taken
    assert [e.value for e in events.Scalars("val_acc")] == pytest.approx([e["val_acc"] for e in epochs])
    assert [e.value for e in events.Scalars("step/k/visual")] == pytest.approx([k[0].item() for k in seen])
    assert events.Scalars("summary/test_acc")[0].value == pytest.approx(summary["test_acc"])


def test_a_resumed_run_drops_the_steps_written_after_its_checkpoint(tmp_path):
    full, _, _ = run(tmp_path / "full", "train.epochs=3", "train.loggers=[jsonl, csv]")
    cut = tmp_path / "cut"
    t, _, _ = run(cut, "train.epochs=3", "train.loggers=[jsonl, csv]", fit=False)
    original = t.method.on_epoch_end

    def stop_in_second_epoch(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt  # after epoch 1's checkpoint, before epoch 2's
        original(epoch, metrics)

    t.method.on_epoch_end = stop_in_second_epoch
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    with open(cut / "steps.jsonl", "a") as fh:  # as if a kill came after the log, before the checkpoint
        fh.write(json.dumps({"step": 9, "epoch": 1, "stage": "supervised", "k/visual": 0.5}) + "\n")
    Trainer.resume(cut, echo=lambda s: None).fit()
    for name in ("steps.jsonl", "steps.csv", "metrics.csv"):
        a, b = (tmp_path / "full" / name).read_text(), (cut / name).read_text()
        if name == "metrics.csv":  # seconds differ between runs
            a, b = ([{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(x.splitlines())] for x in (a, b))
        assert a == b, name


def wandb_records(path):
    """History rows and summary updates of an offline W&B run file (W&B's LevelDB-style log of
    protobuf records: 7-byte file header, 32 KiB blocks, chunks with a 7-byte header)."""
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, history, summary = 7, b"", {}, {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                     for i in (record.history.item if record.HasField("history") else
                               record.summary.update if record.HasField("summary") else [])}
            if record.HasField("history"):
                history.setdefault(items["_step"], {}).update(items)
            summary.update(items if record.HasField("summary") else {})
    return history, summary


def test_wandb_offline_run_holds_epochs_steps_and_summary(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # not in the `test` extra (a 20 MB wheel with a service binary)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    t, seen, summary = run(out, "train.epochs=1", "train.loggers=[wandb]")
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, logged = wandb_records(files[0])
    epoch = json.loads((out / "metrics.jsonl").read_text())
    assert sorted(history) == list(range(1, len(seen) + 1))  # x-axis: optimizer steps
    assert [history[s]["step/k/visual"] for s in sorted(history)] == pytest.approx([k[0].item() for k in seen])
    assert history[len(seen)]["val_acc"] == pytest.approx(epoch["val_acc"])  # the epoch's figures, at its last step
    assert history[len(seen)]["val_acc_by_modality/audio"] == pytest.approx(epoch["val_acc_by_modality"]["audio"])
    assert logged["test_acc"] == pytest.approx(summary["test_acc"])


@pytest.mark.parametrize("value, message", [("[jsonl, foo]", "unknown: \\['foo'\\]"), ("[csv, csv]", "at most once")])
def test_a_bad_logger_list_is_a_config_error_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=f"train.loggers.*{message}"):
        load_config(overrides=[f"train.loggers={value}"])


def test_a_missing_logger_package_is_a_config_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match="pip install 'equimodal\\[tensorboard\\]'"):
        run(tmp_path / "run", "train.epochs=1", "train.loggers=[tensorboard]", fit=False)
