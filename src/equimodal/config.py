"""Run configuration: defaults, YAML files, ``key.sub=value`` overrides, and validation.

Everything is checked before any training: an unknown key or a bad value raises ``ConfigError``
naming the key (``train.epochs``), the value and what is allowed. ``data`` and ``method`` sections
take the options of the chosen dataset loader / method constructor, filled with their defaults, so
``config.yaml`` of a run is the full resolved configuration.

The schema, declared once here and checked by ``resolve``: every section is a mapping of string
keys (``data`` and ``method`` with a ``name`` string); each key's type is that of its default in
``DEFAULTS`` (or of the dataset's / method's signature), ``NULLABLE`` for keys whose default is
null; ``CHOICES`` for names, ``POSITIVE`` / ``NON_NEGATIVE`` / ``MAXIMUM`` for ranges (``train.seed``
at most ``MAX_SEED``, so every seed derived from it fits 64 bits); every number anywhere is finite
and fits 64 bits. Options a method or dataset defaults to null are checked by its constructor,
called here too.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from .data import DATASET_MODALITIES, dataset_options
from .errors import ConfigError
from .methods import build_method, method_options
from .models import ESTIMATORS, FUSIONS
from .models.auto import check_encoder_spec
from .models.encoders import NORMS
from .models.factory import register_model, resolve_factory

__all__ = ["ConfigError", "DEFAULTS", "dump_config", "load_config", "resolve", "with_user_parts"]


DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"name": "synthetic"},
    "model": {"encoder": "auto", "width": 32, "feature_dim": 64, "fusion": "concat", "estimator": "auto",
              "norm": "batch", "factory": None},
    "method": {"name": "joint"},
    "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "step",
              "step_size": 10, "gamma": 0.1, "clip_grad_norm": None},
    "train": {"epochs": 12, "batch_size": 64, "accumulate": 1, "num_workers": 0, "seed": 0, "device": "auto", "precision": "auto",
              "select": "last", "stage_budget": "each", "compile": False, "probe": True, "out": None, "progress": True,
              "on_nan": "stop", "loggers": ["jsonl"]},
}
#: names allowed in ``train.loggers`` (``equimodal.train.loggers``)
LOGGERS = ("jsonl", "csv", "tensorboard", "wandb")

CHOICES: dict[str, tuple] = {
    "model.fusion": tuple(FUSIONS),
    "model.estimator": ESTIMATORS,
    "model.norm": NORMS,
    "optim.name": ("sgd", "adam", "adamw"),
    "optim.schedule": ("step", "cosine", "none"),
    "train.select": ("last", "best_val"),
    "train.stage_budget": ("each", "shared"),
    "train.on_nan": ("stop", "skip"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
}
#: keys checked by their own function (a value of more than one type)
CHECKERS = {"model.encoder": check_encoder_spec}  # a name, or a mapping modality -> name (models/auto.py)
POSITIVE = ("model.width", "model.feature_dim", "optim.lr", "optim.step_size", "optim.gamma", "train.epochs",
            "train.batch_size", "train.accumulate")
NON_NEGATIVE = ("optim.momentum", "optim.weight_decay", "train.num_workers", "train.seed")
#: the largest ``train.seed``: per-epoch and per-step seeds are derived from it (``seed * 100_003 +
#: epoch`` for the batch order, up to ``((seed * 1_000_003 + step) * 1_009 + k) * 257`` in the
#: methods), and each must stay a 64-bit integer for ``torch.Generator.manual_seed``
MAX_SEED = 2 ** 24 - 1
#: inclusive upper bounds
MAXIMUM = {"optim.momentum": 1.0, "train.seed": MAX_SEED}
#: keys whose default is null, and the type each takes otherwise (their own checks follow)
NULLABLE = {"model.factory": str, "optim.clip_grad_norm": float, "train.out": str}
#: the largest integer any key takes (what torch and the seeds take: 64 bits, signed)
MAX_INT = 2 ** 63 - 1


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1e-3"`` -> (["a", "b"], 0.001). Values are read as YAML (numbers, lists, null, true)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} as YAML: {yaml_problem(exc)}") from None
    return key.strip().split("."), value


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A PyYAML error in one line: what is wrong and where (PyYAML's own text spans several lines
    with the offending text and a caret under it)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return f"{problem} (column {mark.column + 1})" if mark is not None and mark.line == 0 else (
        f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem)


def _set(cfg: dict, path: list[str], value: Any) -> None:
    if not all(path):
        raise ConfigError(f"override {'.'.join(path)!r}: a key has an empty part; write section.key=value")
    node = cfg
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def _check_finite(key: str, value: Any) -> None:
    """Numbers anywhere in a value (lists and mappings included) are finite and fit 64 bits."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ConfigError(f"{key}: {value} is too large (at most {MAX_INT})")
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_finite(key, item)
    elif isinstance(value, dict):
        for item in value.values():
            _check_finite(key, item)


def _check_type(key: str, value: Any, default: Any) -> Any:
    """Coerce/check ``value`` against the type of its default (None defaults accept anything: the
    method or dataset that takes the option checks it), and that every number in it is finite."""
    if not isinstance(default, float):  # a float key converts first (1e23 written as an integer is a number)
        _check_finite(key, value)
    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {value} is too large for a number") from None
        _check_finite(key, value)
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(default, (list, tuple)):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    return value


def _check_section(section: str, value: Any) -> None:
    """A section is a mapping of string keys; ``data`` and ``method`` name their dataset / method."""
    if not isinstance(value, dict):
        raise ConfigError(f"{section}: expected a mapping of keys (e.g. {section}.KEY=VALUE), got {value!r}")
    odd = [k for k in value if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{section}: keys must be names, got {odd!r}")
    if section in ("data", "method"):
        name = value.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{section}.name: expected a {'dataset' if section == 'data' else 'method'} name, "
                              f"got {name!r}")


def _resolve_options(section: str, cfg: dict, defaults: dict) -> dict:
    out = {"name": cfg["name"]}
    unknown = sorted(set(cfg) - set(defaults) - {"name"})
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {[f'{section}.{k}' for k in unknown]} for "
                          f"{section} {cfg['name']!r}; valid: {sorted(defaults)}")
    for k, d in defaults.items():
        d = list(d) if isinstance(d, tuple) else d
        out[k] = _check_type(f"{section}.{k}", cfg.get(k, d), d)
    return out


def resolve(raw: dict) -> dict:
    """Validate a (partial) config and fill every default. Raises ``ConfigError``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping, got {type(raw).__name__}")
    odd = [k for k in raw if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"section names must be names, got {odd!r}; valid sections: {sorted(DEFAULTS)}")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; valid sections: {sorted(DEFAULTS)}")
    cfg = _deep_merge(DEFAULTS, raw)
    for section in DEFAULTS:
        _check_section(section, cfg[section])
    for section in ("model", "optim", "train"):
        extra = sorted(set(cfg[section]) - set(DEFAULTS[section]))
        if extra:
            raise ConfigError(f"unknown key(s) {[f'{section}.{k}' for k in extra]}; "
                              f"valid: {sorted(DEFAULTS[section])}")
        for k, d in DEFAULTS[section].items():
            if f"{section}.{k}" in CHECKERS:
                cfg[section][k] = CHECKERS[f"{section}.{k}"](cfg[section][k])
                continue
            cfg[section][k] = _check_type(f"{section}.{k}", cfg[section][k], d)
    for key, kind in NULLABLE.items():
        s, k = key.split(".")
        value = cfg[s][k]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind)):
            raise ConfigError(f"{key}: expected null or a {'number' if kind is float else 'string'}, got {value!r}")
    for key, allowed in CHOICES.items():
        s, k = key.split(".")
        if cfg[s][k] not in allowed:
            raise ConfigError(f"{key}: {cfg[s][k]!r} is not one of {list(allowed)}")
    for key in POSITIVE:
        s, k = key.split(".")
        if not cfg[s][k] > 0:
            raise ConfigError(f"{key}: must be > 0, got {cfg[s][k]!r}")
    for key in NON_NEGATIVE:
        s, k = key.split(".")
        if not cfg[s][k] >= 0:
            raise ConfigError(f"{key}: must be >= 0, got {cfg[s][k]!r}")
    for key, most in MAXIMUM.items():
        s, k = key.split(".")
        if not cfg[s][k] <= most:
            raise ConfigError(f"{key}: must be <= {most}, got {cfg[s][k]!r}"
                              + (" (per-epoch and per-step seeds are derived from it)" if key == "train.seed" else ""))
    out = cfg["train"]["out"]
    if out is not None and not out.strip():
        raise ConfigError("train.out: empty; give a folder or null (runs/<timestamp>)")
    if cfg["model"]["estimator"] == "exact" and not FUSIONS[cfg["model"]["fusion"]].decomposes:
        exact = sorted(n for n, f in FUSIONS.items() if f.decomposes)
        raise ConfigError(f"model.estimator: 'exact' needs a fusion whose logits decompose ({', '.join(exact)}); "
                          f"model.fusion is {cfg['model']['fusion']!r}: use estimator auto, probe or mask")
    clip = cfg["optim"]["clip_grad_norm"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise ConfigError(f"optim.clip_grad_norm: expected null or a number > 0, got {clip!r}")
    loggers = cfg["train"]["loggers"]
    unknown = [x for x in loggers if x not in LOGGERS]
    if unknown or len(set(map(str, loggers))) != len(loggers):
        raise ConfigError(f"train.loggers: {loggers!r} must name each of {list(LOGGERS)} at most once"
                          + (f"; unknown: {unknown}" if unknown else ""))
    device = cfg["train"]["device"]
    if not (device in ("auto", "cpu") or device == "cuda" or device.startswith("cuda:")):
        raise ConfigError(f"train.device: {device!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N']")
    try:
        data_defaults = dataset_options(cfg["data"]["name"])
        method_defaults = method_options(cfg["method"]["name"])
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    cfg["data"] = _resolve_options("data", cfg["data"], data_defaults)
    modalities = _check_data(cfg["data"])
    factory = cfg["model"]["factory"]
    if factory is not None:
        if not isinstance(factory, str) or not factory:
            raise ConfigError(f"model.factory: expected null, a registered model name or module:function, got {factory!r}")
        resolve_factory(factory)  # an unknown name or a failing import stops the run here
    cfg["method"] = _resolve_options("method", cfg["method"], method_defaults)
    try:  # constructors check their values (choices, ranges): fail here, before any training
        method = build_method(**cfg["method"])
        if modalities is not None:  # None: a user dataset whose modalities are read when it loads
            method.check_modalities(modalities)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"method {cfg['method']['name']!r}: {exc}") from None
    except KeyError as exc:  # e.g. an unknown method named inside another method's options
        raise ConfigError(f"method {cfg['method']['name']!r}: {exc.args[0]}") from None
    return cfg


def _check_data(data: dict) -> list[str] | None:
    """Checks every dataset shares (counts, fractions, modalities); returns the modalities used
    (None for a user dataset whose modalities are not known before it is loaded)."""
    from .data import BUILTIN_DATASETS

    name = data["name"]
    for key, value in data.items():
        if key.startswith("n_") and isinstance(value, int) and value <= 0:
            raise ConfigError(f"data.{key}: must be > 0, got {value}")
        if key == "num_classes" and isinstance(value, int) and value < 2:
            raise ConfigError(f"data.num_classes: must be >= 2 (one class has nothing to learn), got {value}")
        if key.endswith("_fraction") and isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{key}: must be in [0, 1), got {value}")
        if key.endswith("_seed") and isinstance(value, int) and not 0 <= value <= MAX_SEED:
            raise ConfigError(f"data.{key}: must be in [0, {MAX_SEED}], got {value}")
    if name in BUILTIN_DATASETS and data.get("val_fraction") == 0:  # a user's own val split makes it unused
        raise ConfigError(f"data.val_fraction: must be > 0 for {name} (validation is carved from its training "
                          "split; selection and the per-epoch figures need it), got 0")
    known = list(DATASET_MODALITIES.get(name, ()))
    if data.get("modalities") is None:
        return known or None
    mods = data["modalities"]
    if not isinstance(mods, (list, tuple)) or not all(isinstance(m, str) for m in mods):
        raise ConfigError(f"data.modalities: expected a list of modality names, got {mods!r}")
    if not mods:
        raise ConfigError("data.modalities: empty; name at least one modality")
    unknown = [m for m in mods if known and m not in known]
    if unknown:
        raise ConfigError(f"data.modalities: {name} has no modality {unknown}; available: {known}")
    if len(set(mods)) != len(mods):
        raise ConfigError(f"data.modalities: {mods} names a modality twice")
    return list(mods)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> dict:
    """Defaults <- ``base`` <- YAML file <- overrides, then ``resolve``.

    Changing ``method.name`` or ``data.name`` drops options that belong to the previous one only
    when they came from defaults (explicit unknown options are still an error).
    """
    raw: dict = copy.deepcopy(base) if base else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as fh:  # a stream, so YAML's error marks name the file
                loaded = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        raw = _deep_merge(raw, loaded)
    for text in overrides or []:
        keys, value = parse_override(text)
        section = raw.get(keys[0], {})
        if keys[0] in ("method", "data") and keys[1:] == ["name"] and (
                not isinstance(section, dict) or section.get("name") != value):
            raw[keys[0]] = {}  # a new method/dataset starts from its own defaults
        _set(raw, keys, value)
    return resolve(raw)


def with_user_parts(cfg: dict, data: Any = None, model_factory: Any = None, data_name: str | None = None) -> dict:
    """``cfg`` with a user's data and/or model factory put in: ``data`` (a dict of splits, a
    ``DataSplits`` or a builder, see ``equimodal.data.register_dataset``) is registered under
    ``data_name`` (default: ``cfg``'s ``data.name`` if that is not a built-in dataset, else
    ``"custom"``) and becomes ``data.name`` (with that dataset's default options unless it was
    already the configured one); ``model_factory`` (a callable or a name) becomes ``model.factory``.
    The returned config is resolved again, so the run's ``config.yaml`` records what ran."""
    from .data import BUILTIN_DATASETS, register_dataset

    raw = copy.deepcopy(cfg)
    if data is not None:
        current = (raw.get("data") or {}).get("name")
        name = data_name or (current if current and current not in BUILTIN_DATASETS and ":" not in current
                             else "custom")
        register_dataset(name, data)
        if current != name:
            raw["data"] = {"name": name}
    if model_factory is not None:
        raw.setdefault("model", {})["factory"] = (model_factory if isinstance(model_factory, str)
                                                  else register_model(model_factory))
    return resolve(raw)


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
