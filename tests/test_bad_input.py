"""Bad input everywhere ends in one ``error:`` line (exit 2) before any work, and valid input that
used to crash runs (issue 21: one schema for the config, a checked dataset, writable outputs)."""
import json

import pytest
import torch

from conftest import TINY
from equimodal.cli import main
from equimodal.data import load_dataset
from equimodal.data.base import TensorMultimodalDataset, batch_bounds, iterate_batches, merged_samples, num_batches

SETS = [a for kv in TINY for a in ("--set", kv)]


def run_cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


# --- batches that BatchNorm can take ------------------------------------------------------------
@pytest.mark.parametrize("n, size, world, expected, merged", [
    (108, 107, 1, [(0, 108)], 1),                 # 107 + 1: the one merged
    (109, 107, 1, [(0, 107), (107, 109)], 0),     # 107 + 2: kept apart
    (215, 107, 1, [(0, 107), (107, 215)], 1),
    (1, 4, 1, [(0, 1)], 0),                       # nothing to merge into (the trainer refuses this split)
    (43, 40, 2, [(0, 43)], 3),                    # 40 + 3 over 2 processes: one would get 1 sample
    (44, 40, 2, [(0, 40), (40, 44)], 0),
    (1, 4, 2, [], 0),                             # fewer samples than processes, nothing before: dropped
])
def test_a_final_batch_too_small_for_batchnorm_is_merged(n, size, world, expected, merged):
    assert batch_bounds(n, size, world) == expected
    assert num_batches(n, size, world) == len(expected)
    assert merged_samples(n, size, world) == merged


def test_a_batch_of_one_with_batchnorm1d_is_refused_before_training(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "run", *SETS, "--set", "model.encoder=mlp",
                         "--set", "train.batch_size=1")
    assert rc == 2 and "train.batch_size=1" in one_error_line(err) and "BatchNorm1d" in err
    assert not (tmp_path / "run").exists()
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "run", *SETS, "--set", "model.encoder=mlp",
                         "--set", "train.batch_size=1", "--set", "model.norm=group", "--set", "data.n_train=40",
                         "--set", "train.epochs=1")
    assert rc == 0, err


def test_a_method_refusing_the_model_is_one_line(tmp_path, capsys):
    """ogm-ge modulates convolution parameters by default; vector (mlp) encoders have none."""
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "run", *SETS, "--method", "ogm-ge",
                         "--set", "model.encoder=mlp")
    assert rc == 2 and "method 'ogm-ge': ogm-ge: params='conv' selects no parameter" in one_error_line(err)


def test_merged_batches_keep_every_sample_once_in_every_shard():
    data = TensorMultimodalDataset({"x": torch.arange(43.).view(43, 1)}, torch.zeros(43, dtype=torch.long), 1)
    gen = torch.Generator().manual_seed(0)
    seen = [x["x"].flatten() for x, _ in iterate_batches(data.subset(torch.arange(41)), 40, gen)]
    assert [len(s) for s in seen] == [41] and sorted(torch.cat(seen).tolist()) == list(range(41))
    shards = [[x["x"].flatten() for x, _ in iterate_batches(data, 40, torch.Generator().manual_seed(0), shard=(r, 2))]
              for r in range(2)]
    assert [len(s) for r in shards for s in r] == [22, 21]
    assert sorted(torch.cat([s for r in shards for s in r]).tolist()) == list(range(43))


@pytest.mark.parametrize("encoder", ["auto", "cnn", "mlp"])  # the kinds that read the default data's images
def test_a_last_training_batch_of_one_sample_trains_with_every_encoder(tmp_path, capsys, encoder):
    """The issue's case: BatchNorm (model.norm=batch, the default) and a training split one more than
    the batch size; every encoder kind, 1-D (mlp) and 2-D (cnn) BatchNorm."""
    n_train = len(load_dataset("synthetic", n_train=120, n_test=40).train)
    rc, out, err = run_cli(capsys, "train", "--out", tmp_path / "run", *SETS, "--set", "data.n_train=120",
                           "--set", "data.n_test=40", "--set", "train.epochs=1", "--set", f"model.encoder={encoder}",
                           "--set", f"train.batch_size={n_train - 1}")
    assert rc == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["merged_final_batches"] == 1 and record["train_merged_final_batch_samples"] == 1
    assert summary["cost"]["optimizer_steps"] == 1


# --- one schema for the whole configuration ------------------------------------------------------
@pytest.mark.parametrize("sets, named", [
    (["data=5"], "data: expected a mapping"),
    (["method=5"], "method: expected a mapping"),
    (["data=[a,b]"], "data: expected a mapping"),
    (["train={1: 2}"], "train: keys must be names"),
    (["method.name=[ogm-ge]"], "method.name: expected a method name"),
    (["data.name=[synthetic]"], "data.name: expected a dataset name"),
    (["data.name.x=1"], "data.name"),
    (["method.name="], "method.name"),
    (["train.seed=1000000000000000"], "train.seed: must be <= 16777215"),
    (["train.seed=18446744073709551616"], "train.seed"),
    (["data.split_seed=-1"], "data.split_seed"),
    (["train.out=123"], "train.out: expected null or a string"),
    (["train.out=[a]"], "train.out"),
    (["data.num_classes=0"], "data.num_classes: must be >= 2"),
    (["data.num_classes=-2"], "data.num_classes"),
    (["data.num_classes=1"], "data.num_classes"),
    (["method.name=ogm-ge", "method.alpha=.nan"], "method.alpha: expected a finite number"),
    (["method.name=ogm-ge", "method.alpha=.inf"], "method.alpha"),
    (["optim.lr=.inf"], "optim.lr: expected a finite number"),
    (["optim.lr=nan"], "optim.lr"),
    (["optim.weight_decay=.inf"], "optim.weight_decay"),
    (["optim.clip_grad_norm=.nan"], "optim.clip_grad_norm"),
    (["optim.momentum=1.5"], "optim.momentum: must be <= 1.0"),
    (["data.visual_noise=.nan"], "data.visual_noise"),
    (["data.val_fraction=0"], "data.val_fraction: must be > 0 for synthetic"),
    (["data.modalities=5"], "data.modalities"),
    (["model.width=99999999999999999999999"], "model.width"),
    (["train.loggers=[jsonl"], "train.loggers: cannot parse value '[jsonl' as YAML"),
    (["train..epochs=2"], "empty part"),
])
@pytest.mark.parametrize("command", ["train", "bench", "diagnose"])
def test_bad_values_for_every_kind_of_key_are_one_line(tmp_path, capsys, command, sets, named):
    """Each used to be a traceback (TypeError, unhashable type, OverflowError at epoch 1, a
    RuntimeError in the data generator or the first validation), a silent acceptance (NaN, inf), or
    several lines of PyYAML marks."""
    if command != "train" and sets[0].startswith(("method", "data.name=[", "data.name.")):
        pytest.skip("bench names its methods with --methods, diagnose compares its own")
    extra = {"train": [], "bench": ["--methods", "joint", "--seeds", "0", "--no-progress"],
             "diagnose": ["--seeds", "0", "--no-progress"]}[command]
    rc, out, err = run_cli(capsys, command, "--out", tmp_path / "out", *extra, *[a for s in sets for a in ("--set", s)])
    assert rc == 2
    line = one_error_line(err)
    assert named in line and len(line) < 400
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, named", [
    ("data: 5\n", "data: expected a mapping"),
    ("method: [ogm-ge]\n", "method: expected a mapping"),
    ("train:\n  seed: 99999999999999999999\n", "train.seed"),
    ("optim:\n  lr: .nan\n", "optim.lr"),
    ("1: 2\nfoo: 3\n", "section names must be names"),
])
def test_bad_values_in_a_config_file_are_one_line(tmp_path, capsys, text, named):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    rc, _, err = run_cli(capsys, "train", "--config", path, "--out", tmp_path / "out")
    assert rc == 2 and named in one_error_line(err)


def test_the_largest_seed_trains_every_derived_seed(tmp_path, capsys):
    """MAX_SEED is accepted and the seeds derived from it (batch order, OGM-GE's noise) fit 64 bits."""
    from equimodal.config import MAX_SEED
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "run", *SETS, "--set", "train.epochs=1",
                         "--set", "data.n_train=200", "--method", "ogm-ge", "--seed", MAX_SEED)
    assert rc == 0, err


# --- outputs checked before work starts ---------------------------------------------------------
def _unwritable(tmp_path):
    """Folders this process cannot create files in: a read-only one (unless root, whom permission
    bits do not stop) and, on Linux, /proc."""
    import os
    import sys
    found = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        found.append(ro)
    if sys.platform.startswith("linux"):
        found.append("/proc")
    return found


@pytest.mark.parametrize("argv, path", [
    (["train", *SETS, "--out", "{f}/run"], "{f}/run"),
    (["bench", "--methods", "joint", "--seeds", "0", "--no-progress", "--out", "{f}/b"], "{f}/b"),
    (["diagnose", "--seeds", "0", "--no-progress", "--out", "{f}/d"], "{f}/d"),
    (["report", "{bench}", "--output", "{f}/r.html"], "{f}/r.html"),
    (["data", "prepare", "avdigits", "--source", "{f}", "--out", "{f}/cache"], "{f}/cache"),
    (["data", "prepare", "cremad", "--videos", "{f}", "--out", "{f}/clips"], "{f}/clips"),
])
def test_every_command_that_writes_checks_its_output_first(tmp_path, capsys, argv, path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "results.md").write_text("| method | acc |\n|---|---|\n| joint | 0.5 |\n")
    long_name = tmp_path / ("x" * 300)
    for folder in ["/dev/null", long_name, *_unwritable(tmp_path)]:
        filled = [a.format(f=folder, bench=bench) for a in argv]
        rc, out, err = run_cli(capsys, *filled)
        line = one_error_line(err)
        assert rc == 2 and line.startswith(f"error: cannot write {str(folder)[:60]}"), line
    if argv[0] == "report":  # a folder where a file goes (/dev/null is a file one may write to)
        rc, _, err = run_cli(capsys, "report", bench, "--output", "/")
    else:  # a file where a folder goes
        rc, _, err = run_cli(capsys, *[a.format(f="/tmp", bench=bench) for a in argv[:-1]], "/dev/null")
    assert rc == 2 and one_error_line(err).startswith("error: cannot write /")


# --- a checked user dataset ------------------------------------------------------------------
class Items(torch.utils.data.Dataset):
    """A user's dataset: ``item(i)`` makes item i; ``length`` (default n) is what ``__len__`` says;
    ``labels`` an optional attribute."""

    def __init__(self, n=40, item=None, length=None, labels=None, **attrs):
        self.n, self.length = n, n if length is None else length
        self.item = item or (lambda i: ({"a": torch.randn(6), "b": torch.randn(1, 4, 4)}, i % 4))
        if labels is not None:
            self.labels = labels
        self.__dict__.update(attrs)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range")
        return self.item(i)


def good(i):
    return {"a": torch.randn(6), "b": torch.randn(1, 4, 4)}, i % 4


def with_label(label):
    return lambda i: (good(i)[0], label if i == 7 else i % 4)


def with_input(key, value, at=7):
    return lambda i: ({**good(i)[0], key: value} if i == at else good(i)[0], i % 4)


BAD_DATA = [
    ({"train": Items(item=with_label("cat"))}, "custom:train[7]: the label must be an integer class index, got 'cat'"),
    ({"train": Items(item=with_label(None))}, "custom:train[7]: the label must be an integer class index, got None"),
    ({"train": Items(item=with_label(0.5))}, "custom:train[7]: the label must be an integer"),
    ({"train": Items(item=with_label(10 ** 9))}, "1000000001 classes"),
    ({"train": Items(item=with_label(10 ** 30))}, "custom:train[7]: the label"),
    ({"train": Items(labels=[i % 4 + 0.9 for i in range(40)])}, "custom:train.labels[0]: the label must be an integer"),
    ({"train": Items(labels=["x"] * 40)}, "custom:train.labels[0]"),
    ({"train": Items(labels=[None] * 40)}, "custom:train.labels[0]"),
    ({"train": Items(length=45)}, "custom:train[40]: reading the item failed (IndexError"),
    ({"train": Items(item=lambda i: ({"a.b": torch.randn(3)}, i % 4))}, "'a.b' cannot name a modality"),
    ({"train": Items(item=lambda i: ({"": torch.randn(3)}, i % 4))}, "'' cannot name a modality"),
    ({"train": Items(item=lambda i: ({"items": torch.randn(3)}, i % 4))}, "'items' cannot name a modality"),
    ({"train": Items(item=with_input("a", torch.randn(7)))}, "custom:train[7]: modality 'a' is torch.float32 of shape (7,)"),
    ({"train": Items(item=with_input("a", torch.randn(6).double()))}, "custom:train[7]: modality 'a' is torch.float64"),
    ({"train": Items(item=with_input("a", torch.tensor(1.0), at=0))}, "custom:train[0]: modality 'a' is a 0-dim tensor"),
    ({"train": Items(item=with_input("a", torch.zeros(0), at=0))}, "custom:train[0]: modality 'a' has no values"),
    ({"train": Items(item=lambda i: (good(i)[0], 0))}, "single class"),
    ({"train": Items(num_classes=1000)}, "1000 classes"),
    ({"train": Items(num_classes="4")}, "num_classes attribute must be an integer"),
    ({"train": Items(num_classes=2)}, "declares num_classes=2"),
    ({"test": Items(item=lambda i: ({"a": torch.randn(7), "b": torch.randn(1, 4, 4)}, i % 4))},
     "modality 'a' is torch.float32 of shape (7,) in split 'test' but torch.float32 of shape (6,) in 'train'"),
]


@pytest.mark.parametrize("splits, named", BAD_DATA)
def test_a_user_dataset_is_checked_before_training(tmp_path, splits, named):
    from equimodal.data import register_dataset
    from equimodal.errors import DataError
    from equimodal.train import Trainer
    from equimodal.config import load_config

    data = {"train": Items(), "test": Items(n=20), **splits}
    cfg = load_config(overrides=TINY + ["train.epochs=1"])
    with pytest.raises(DataError) as info:
        Trainer(cfg, out_dir=tmp_path / "run", data=data, echo=lambda s: None).fit()
    assert named in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_an_item_unlike_the_first_is_named_in_its_batch_when_labels_are_given(tmp_path):
    """With a ``labels`` attribute the label pass reads no item: a mismatch is caught when its batch is
    made, naming the split and index, before any optimizer step."""
    from equimodal.config import load_config
    from equimodal.errors import DataError
    from equimodal.train import Trainer

    train = Items(item=with_input("a", torch.randn(5), at=33), labels=[i % 4 for i in range(40)])
    cfg = load_config(overrides=TINY + ["train.epochs=1"])
    trainer = Trainer(cfg, out_dir=tmp_path / "run", data={"train": train, "test": Items(n=20)}, echo=lambda s: None)
    with pytest.raises(DataError, match=r"custom:train\[33\]: modality 'a' is torch.float32 of shape \(5,\)"):
        trainer.fit()


def test_integer_inputs_train_or_stop_in_one_line_never_a_traceback(tmp_path):
    """int64 inputs crashed at the first batch. Since issue 24 the automatic encoder reads 1-D
    integers as token ids and places or refuses other integer shapes itself: either way a run
    trains or ends in one error line, never a traceback."""
    from equimodal.config import load_config
    from equimodal.errors import EquimodalError
    from equimodal.train import Trainer

    for sample in (torch.arange(1, 7), torch.arange(1, 17).view(1, 4, 4)):
        ints = Items(item=lambda i, x=sample: ({"a": x, "b": torch.randn(8)}, i % 4))
        cfg = load_config(overrides=TINY + ["train.epochs=1", "train.probe=false"])
        try:
            Trainer(cfg, out_dir=tmp_path / f"run{sample.dim()}", data={"train": ints, "test": Items(n=20, item=ints.item)},
                    echo=lambda s: None).fit()
        except EquimodalError as exc:
            assert "\n" not in str(exc) and "'a'" in str(exc)


# --- bench, report, data prepare ----------------------------------------------------------------
@pytest.mark.parametrize("argv, named", [
    (["--methods", ",,"], "--methods: ',,' names no method"),
    (["--methods", "joint,joint"], "'joint' is given twice"),
    (["--seeds", ","], "--seeds: ',' names no seed"),
    (["--seeds", "0,0"], "--seeds: seed 0 is given twice"),
    (["--seeds", "a"], "--seeds: 'a' is not an integer"),
    (["--seeds", "-1"], "--seeds: seed -1 must be in"),
    (["--tune", "--tune-seeds", ",", "--seeds", "0"], "--tune-seeds: ',' names no seed"),
    (["--tune", "--methods", "nonexistent-method"], "unknown method 'nonexistent-method'"),
    (["--methods", "nonexistent-method"], "unknown method 'nonexistent-method'"),
    (["--methods", "ogm-ge:alpha"], "not key=value"),
    (["--methods", "ogm-ge:alpha=[1"], "cannot parse value '[1' as YAML"),
    (["--baseline", "nope"], "--baseline: 'nope' names no row"),
])
def test_bench_refuses_bad_options_before_any_run(tmp_path, capsys, argv, named):
    rc, out, err = run_cli(capsys, "bench", "--out", tmp_path / "b", "--no-progress", *SETS, *argv)
    assert rc == 2 and named in one_error_line(err), err
    assert not (tmp_path / "b" / "runs").exists()


def test_bench_argparse_mistakes_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--jobs", "x", "--out", "b"])
    assert info.value.code == 2 and "argument --jobs" in one_error_line(capsys.readouterr().err)


def test_diagnose_names_its_seeds_flag(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "diagnose", "--out", tmp_path / "d", "--seeds", "a")
    assert rc == 2 and "--seeds: 'a'" in one_error_line(err)


@pytest.mark.parametrize("csv_text, md_bytes, named", [
    ("label,seed\njoint,0\n", b"| a |\n", "no column(s) ['test_acc', 'test_macro_f1', 'seconds', 'selection']"),
    ("", b"| a |\n", "no column(s)"),
    (None, b"\xff\xfe| a |\n", "results.md: not UTF-8 text"),
])
def test_report_on_a_foreign_bench_folder_is_one_line(tmp_path, capsys, csv_text, md_bytes, named):
    (tmp_path / "results.md").write_bytes(md_bytes)
    if csv_text is not None:
        (tmp_path / "results.csv").write_text(csv_text)
    rc, _, err = run_cli(capsys, "report", tmp_path)
    assert rc == 2 and named in one_error_line(err)


def test_report_takes_a_results_csv_with_an_empty_value(tmp_path, capsys):
    (tmp_path / "results.md").write_text("| a |\n|---|\n| 1 |\n")
    (tmp_path / "results.csv").write_text("label,seed,test_acc,test_macro_f1,seconds,selection\njoint,0,0.5,,3,last\n")
    rc, out, err = run_cli(capsys, "report", tmp_path)
    assert rc == 0, err
    assert "<td>50.0</td>" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("argv, named", [
    (["cremad", "--videos", "{t}", "--fps", "-5"], "argument --fps: must be > 0, got -5"),
    (["cremad", "--videos", "{t}", "--fps", "0"], "argument --fps: must be > 0, got 0"),
    (["cremad", "--videos", "{t}", "--sample-rate", "-1"], "argument --sample-rate: must be > 0"),
    (["avdigits", "--mirror", "foo://bar"], "--mirror: 'foo://bar' is not an http"),
])
def test_data_prepare_refuses_bad_options(tmp_path, capsys, argv, named):
    argv = ["data", "prepare", *[a.format(t=tmp_path) for a in argv], "--out", str(tmp_path / "out")]
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own checks exit
        rc = exc.code
    assert rc == 2 and named in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_data_prepare_refuses_a_split_with_no_training_sample(tmp_path, capsys):
    from test_bad_data import fake_avdigits
    src = fake_avdigits(tmp_path / "src")
    rc, _, err = run_cli(capsys, "data", "prepare", "avdigits", "--source", src, "--out", tmp_path / "cache",
                         "--split", "speaker", "--test-speakers", "george", "--no-progress")
    assert rc == 2 and "falls in the train split" in one_error_line(err)
    assert not (tmp_path / "cache" / "manifest.json").exists()


@pytest.mark.parametrize("argv, named", [
    (["--compare", ",,"], "--compare: ',,' names no method"),
    (["--threshold", "nan"], "--threshold: must be a fraction"),
    (["--threshold", "-1"], "--threshold"),
    (["--seeds", "0,0"], "--seeds: seed 0 is given twice"),
])
def test_diagnose_refuses_bad_options(tmp_path, capsys, argv, named):
    rc, _, err = run_cli(capsys, "diagnose", "--out", tmp_path / "d", "--seeds", "0", *argv)
    assert rc == 2 and named in one_error_line(err)
    assert not (tmp_path / "d").exists()
