"""Methods by name: ``@register_method("name")``, ``build_method(name, **options)``.

Options are checked against the constructor's signature, so an unknown key names itself and the
valid ones (constructors take no ``**kwargs`` for that reason).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from ._base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a ``Method`` subclass available by ``name`` to ``build_method``, the
    config (``method.name``) and the CLI; its constructor's keyword parameters become its options."""
    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def method_options(name: str) -> dict[str, Any]:
    """The constructor options of a method and their defaults."""
    sig = inspect.signature(method_class(name).__init__)
    return {p.name: p.default for p in list(sig.parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method; unknown options raise a ``ValueError`` naming them."""
    valid = method_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; valid options: {sorted(valid)}")
    return method_class(name)(**options)


def available_methods() -> dict[str, str]:
    """name -> the first line of the class docstring (what ``equimodal methods`` prints)."""
    return {n: (inspect.getdoc(c) or "").splitlines()[0] for n, c in sorted(_REGISTRY.items())}
