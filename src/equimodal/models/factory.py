"""A user's own model in the trainer: ``model.factory`` names a function that builds it.

The factory is called with the keyword arguments it declares, among:

- ``modalities`` (tuple of names, in the data's order; one name for an ``alone:<m>`` run),
- ``num_classes`` (int), ``input_shapes`` (modality -> shape of one sample, no batch dimension),
- ``fusion``, ``estimator``, ``width``, ``feature_dim``, ``norm`` (the ``model`` section of the config),

(all of them if it takes ``**kwargs``) and returns a model that follows the model contract:
``model(inputs: dict[str, Tensor]) -> ModelOutput``, ``modalities``, ``encoder(name)``,
``encoder_parameters(name)`` and ``num_classes``. The simplest is a ``MultimodalModel`` around your
encoders::

    def build(modalities, num_classes, fusion="concat"):
        encoders = {m: MY_ENCODERS[m]() for m in modalities}   # each with an ``out_dim`` attribute
        return MultimodalModel(encoders, num_classes, fusion=fusion)

``model.factory`` is a name given to ``register_model`` in this process, or an import path
``my_pkg.models:build`` (which a resumed run or ``equimodal eval`` in another process can import again).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from .._imports import import_object, is_import_path
from ..errors import ConfigError

#: registered name -> factory
MODEL_FACTORIES: dict[str, Callable[..., nn.Module]] = {}

#: what a model must offer the trainer and the methods
CONTRACT = ("modalities", "encoder", "encoder_parameters", "num_classes")


def register_model(factory: Callable[..., nn.Module], name: str | None = None) -> str:
    """Register a model factory for ``model.factory``; returns its name (default
    ``module:qualified_name``, which another process can import when the function is module-level).
    Registering a name again replaces it."""
    if not callable(factory):
        raise TypeError(f"register_model: expected a callable that returns a model, got {type(factory).__name__}")
    name = name or f"{getattr(factory, '__module__', None) or 'factory'}:{getattr(factory, '__qualname__', type(factory).__name__)}"
    MODEL_FACTORIES[name] = factory
    return name


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """The factory ``model.factory`` names: a registered name first, then an import path."""
    if name in MODEL_FACTORIES:
        return MODEL_FACTORIES[name]
    if is_import_path(name) and "<locals>" not in name and "<lambda>" not in name:
        factory = import_object(name, "model.factory")
        if not callable(factory):
            raise ConfigError(f"model.factory={name!r} is a {type(factory).__name__}, not a function that builds a model")
        return factory
    raise ConfigError(f"model.factory={name!r}: no such registered model factory (registered: {sorted(MODEL_FACTORIES)}); "
                      "pass register_model(fn) in this process or an import path my_module:build")


def build_user_model(name: str, model_cfg: dict, modalities: tuple[str, ...], num_classes: int,
                     input_shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """Call the factory with the arguments it declares and check what it returns."""
    factory = resolve_factory(name)
    offered: dict[str, Any] = {"modalities": tuple(modalities), "num_classes": int(num_classes),
                               "input_shapes": dict(input_shapes),
                               **{k: v for k, v in model_cfg.items() if k not in ("factory", "encoder")}}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs = offered
    else:
        kwargs = {k: v for k, v in offered.items() if k in params}
        missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in offered]
        if missing:
            raise ConfigError(f"model.factory={name!r} needs argument(s) {missing}; a factory is called with any of "
                              f"{sorted(offered)} that it declares (give others a default)")
    model = factory(**kwargs)
    check_model(model, name, modalities)
    return model


def check_model(model: Any, name: str, modalities: tuple[str, ...]) -> None:
    """Refuse, with a named error, a factory result that lacks the model contract or whose
    modalities differ from the data's."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory={name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    lacking = [a for a in CONTRACT if not hasattr(model, a)]
    if lacking:
        raise ConfigError(f"model.factory={name!r} returned a {type(model).__name__} without {lacking}; the model "
                          "contract is model(inputs) -> ModelOutput, modalities, encoder(name), encoder_parameters(name), "
                          "num_classes (wrap your encoders in equimodal.MultimodalModel to get all of it)")
    if set(model.modalities) != set(modalities):
        raise ConfigError(f"model.factory={name!r} built a model for modalities {list(model.modalities)}, but the data "
                          f"has {list(modalities)} (build one encoder per name in the `modalities` argument)")
