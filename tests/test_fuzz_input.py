"""Property-based fuzzing of what a user types and the data a user brings (issue 21): whatever the
value, ``equimodal`` ends cleanly (exit 0) or with exit code 2 and exactly one ``error:`` line,
never a traceback.

Three properties, sized together to run in well under two minutes on a CI CPU (in-process
``equimodal.cli.main`` calls, tiny data, one epoch):

- every config key (each section's, the synthetic data's and every method's options) with values
  of every kind (wrong types, NaN/inf, huge and negative numbers, odd strings, broken YAML),
  resolved only (``train --print-config``): many examples, milliseconds each;
- the same keys with small, plausible values that the schema accepts, *trained* for one epoch on
  tiny data, so that values failing late (in the data generator, the first batch, the first
  validation, the seeds of epoch 1) are found too;
- user datasets with bad labels, modality names, shapes, dtypes and lengths, trained the same way.

``derandomize=True`` keeps CI reproducible; ``EQUIMODAL_FUZZ_SCALE=10`` runs ten times the examples.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile

import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from equimodal.cli import main  # noqa: E402
from equimodal.config import DEFAULTS  # noqa: E402
from equimodal.data import DATASET_MODALITIES, DATASETS, dataset_options, register_dataset  # noqa: E402
from equimodal.methods import available_methods, method_options  # noqa: E402

SCALE = int(os.environ.get("EQUIMODAL_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: the smallest run of the default (synthetic) data
TINY = ["data.n_train=60", "data.n_test=20", "model.width=4", "model.feature_dim=8", "train.epochs=1",
        "train.batch_size=16", "train.progress=false", "train.device=cpu", "train.probe=false"]
#: methods cheap enough to train inside the fuzz (one stage, no extra passes worth naming)
CHEAP_METHODS = ("joint", "ogm-ge", "ogm", "mmcosine", "modality-dropout", "uncertainty")


def _keys() -> dict[tuple[str | None, str], object]:
    """(method that owns the key or None, dotted key) -> default, for every key a user can set."""
    keys: dict[tuple[str | None, str], object] = {(None, f"{s}.{k}"): d for s, sec in DEFAULTS.items()
                                                  for k, d in sec.items()}
    keys.update({(None, f"data.{k}"): d for k, d in dataset_options("synthetic").items()})
    for m in available_methods():
        keys.update({(m, f"method.{k}"): d for k, d in method_options(m).items()})
    return keys


DEFAULT_OF = _keys()
KEYS = list(DEFAULT_OF)
TRAINABLE_KEYS = [(m, k) for m, k in KEYS if (m is None or m in CHEAP_METHODS) and k not in (
    "train.compile",   # compiling takes a minute: covered by tests/test_compile.py
    "train.out",       # the fuzz chooses the folder
    "train.device",    # cuda where there is none is one line (tests/test_faults.py); a GPU would train
    "train.loggers",   # wandb/tensorboard start services
)]

ODD_TEXT = ["", " ", "nan", ".nan", ".inf", "-.inf", "1e999", "[", "{a: 1", "a.b", "[[1]]", "{}", "[]", "null",
            "~", "yes", "0x10", "0o7", "1_000", "'", '"', "!!python/object:os.system", "&a [*a]", "- 1",
            ":", "a: b: c", "\t", "é", "x" * 300]


def _values(small: bool) -> st.SearchStrategy:
    """Values of every kind; ``small``: plausible sizes only (so a run that is accepted stays tiny)."""
    ints = st.integers(-3, 4) if small else st.one_of(st.integers(-3, 4), st.integers(-2 ** 70, 2 ** 70),
                                                      st.sampled_from([2 ** 24, 2 ** 63, 2 ** 64, -2 ** 63 - 1]))
    floats = st.one_of(st.floats(-1.5, 1.5), st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0]))
    if not small:
        floats = st.one_of(floats, st.floats(allow_nan=True, allow_infinity=True))
    scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=12),
                        st.sampled_from(["visual", "audio", "tactile", "joint", "ogm-ge", "concat", "batch",
                                         "group", "auto", "cpu", "last", "best_val", "mlp", "cnn", "sgd"]))
    return st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))


def _plausible(default, key: str) -> st.SearchStrategy:
    """Mostly values of the key's own type in a small range (so that many runs are accepted and
    train), now and then any small value."""
    from equimodal.config import CHOICES
    if key in CHOICES:
        typed = st.sampled_from(list(CHOICES[key]))
    elif isinstance(default, bool):
        typed = st.booleans()
    elif isinstance(default, int):
        typed = st.integers(-1, 3)
    elif isinstance(default, float):
        typed = st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0.0, 1.0, float("nan"), float("inf")]))
    elif isinstance(default, str):
        typed = st.sampled_from([default, "", "x"])
    elif isinstance(default, (list, tuple)):
        typed = st.lists(st.sampled_from(list(default) or ["x"]), max_size=3)
    else:
        typed = _values(small=True)
    return st.one_of(typed, typed, typed, _values(small=True))


def _as_yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).replace("\n...\n", "").strip()


@st.composite
def overrides(draw, keys, small: bool) -> list[str]:
    """One to three ``key=value`` overrides (a method's option comes with its method.name)."""
    out = []
    for _ in range(draw(st.integers(1, 3 if not small else 2))):
        method, key = draw(st.sampled_from(keys))
        if small:
            text = _as_yaml(draw(_plausible(DEFAULT_OF[(method, key)], key)))
        elif draw(st.booleans()) and draw(st.booleans()):
            text = draw(st.sampled_from(ODD_TEXT))
        else:
            text = _as_yaml(draw(_values(small)))
        out += ([f"method.name={method}"] if method else []) + [f"{key}={text}"]
    return out


def run(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in this process: its exit code and what it wrote to stderr. Any exception
    escaping it (a traceback for the user) fails the property."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own checks
            code = exc.code
    return code, err.getvalue()


def assert_clean(code: int, err: str, argv: list[str]) -> None:
    event("trained or resolved" if code == 0 else f"refused: {err.split(':')[1].strip()[:30] if ':' in err else err}")
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert "Traceback" not in err, (argv, err)


@fuzz(150)
@given(overrides(KEYS, small=False))
def test_any_value_for_any_key_resolves_or_is_one_line(sets):
    argv = ["train", "--print-config", *[a for s in sets for a in ("--set", s)]]
    assert_clean(*run(argv), argv)


@fuzz(20)
@given(overrides(TRAINABLE_KEYS, small=True))
def test_accepted_values_train_or_stop_in_one_line(sets):
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", "--out", os.path.join(tmp, "run"), *[a for s in TINY + sets for a in ("--set", s)]]
        code, err = run(argv)
        assert_clean(code, err, argv)
        if code == 0:
            assert os.path.isfile(os.path.join(tmp, "run", "summary.json"))


# --- user datasets ---------------------------------------------------------------------------
class Drawn(torch.utils.data.Dataset):
    """A user's dataset whose items come from the fuzz: ``items[i]`` is served for i < len(items);
    ``__len__`` says ``length``; optional ``labels`` / ``num_classes`` attributes."""

    def __init__(self, items, length, attrs):
        self.items, self.length = items, length
        self.__dict__.update(attrs)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.items[i]


FAULTS = ("modality name", "sample shape", "item shape", "item dtype", "label", "labels attribute",
          "num_classes attribute", "length", "test shape", "one class")


@st.composite
def datasets(draw):
    """A train and a test split, good but for a drawn set of faults (often none: then it trains)."""
    faults = draw(st.sets(st.sampled_from(FAULTS), max_size=2))
    event(f"faults: {sorted(faults)}")
    names = ["a", "b"]
    if "modality name" in faults:
        names[draw(st.integers(0, 1))] = draw(st.one_of(st.sampled_from(["a.b", "", "items", "training", "a"]),
                                                        st.text(max_size=4)))
    shapes = {names[0]: (5,), names[-1]: (1, 4, 4)}
    if "sample shape" in faults:
        shapes[names[0]] = draw(st.sampled_from([(0,), (), (3, 0)]))
    classes = draw(st.integers(2, 4))

    def split(n, part):
        rows = [{m: torch.randn(shape) for m, shape in shapes.items()} for _ in range(n)]
        labels = [i % classes for i in range(n)] if "one class" not in faults else [1] * n
        at = draw(st.integers(0, n - 1))
        if part == "test" and "test shape" in faults:
            rows = [{**r, names[0]: torch.randn(7)} for r in rows]
        if part == "train" and "item shape" in faults:
            rows[at] = {**rows[at], names[0]: torch.randn(draw(st.sampled_from([(6,), (1, 5), ()])))}
        if part == "train" and "item dtype" in faults:
            dtype = draw(st.sampled_from([torch.float64, torch.int64, torch.uint8, torch.bool, torch.float16]))
            rows[at] = {**rows[at], names[0]: rows[at][names[0]].to(dtype)}
            if draw(st.booleans()):  # every item of that dtype
                rows = [{**r, names[0]: r[names[0]].to(dtype)} for r in rows]
        if part == "train" and "label" in faults:
            labels[at] = draw(st.one_of(st.text(max_size=3), st.none(), st.floats(allow_nan=True),
                                        st.integers(-5, 10 ** 12), st.just(torch.tensor([1, 2])), st.just(2.0)))
        attrs = {}
        if part == "train" and "labels attribute" in faults:
            attrs["labels"] = draw(st.lists(st.one_of(st.integers(-1, 10 ** 10), st.floats(-1, 5), st.text(max_size=2),
                                                      st.none()), min_size=n, max_size=n))
        if part == "train" and "num_classes attribute" in faults:
            attrs["num_classes"] = draw(st.one_of(st.integers(-1, 10 ** 6), st.text(max_size=2), st.floats(0, 3)))
        length = n + (draw(st.integers(1, 3)) if part == "train" and "length" in faults else 0)
        return Drawn(list(zip(rows, labels)), length, attrs)

    return {"train": split(draw(st.integers(16, 40)), "train"), "test": split(draw(st.integers(4, 12)), "test")}


@fuzz(25)
@given(datasets(), st.sampled_from(["joint", "ogm-ge"]), st.sampled_from(["auto", "mlp"]))
def test_any_user_dataset_trains_or_stops_in_one_line(data, method, encoder):
    saved = dict(DATASETS), dict(DATASET_MODALITIES)
    try:
        code, err = None, ""
        try:
            register_dataset("fuzzed", data)
        except ValueError as exc:  # the library's own DataError (a ValueError): what the CLI prints as one line
            from equimodal.errors import EquimodalError
            assert isinstance(exc, EquimodalError) and "\n" not in str(exc), exc
            event(f"refused when registered: {str(exc).split(':')[-2][-30:] if ':' in str(exc) else exc}")
            return
        with tempfile.TemporaryDirectory() as tmp:
            argv = ["train", "--dataset", "fuzzed", "--method", method, "--out", os.path.join(tmp, "run"),
                    *[a for s in TINY[2:] + [f"model.encoder={encoder}", "train.batch_size=8"]
                      + (["method.params=all"] if method == "ogm-ge" else []) for a in ("--set", s)]]
            code, err = run(argv)
            assert_clean(code, err, argv)
    finally:
        for reg, old in zip((DATASETS, DATASET_MODALITIES), saved):
            reg.clear()
            reg.update(old)
