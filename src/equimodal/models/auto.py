"""Which encoder reads each modality: ``model.encoder``, the dataset's declared kinds, or the rule.

``model.encoder`` is one name for every modality (``auto``, ``cnn``, ``cnn1d``, ``mlp``,
``transformer``, ``tabular``, ``resnet18-audio``, ``resnet18-visual``, ``timm:<model>``,
``hf:<folder>``) or a mapping from modality to such a name, e.g. ``{audio: cnn1d, text: transformer}``
(modalities it leaves out are ``auto``). A pretrained backbone takes its options as a mapping,
``{visual: {name: timm:resnet18, checkpoint: weights.safetensors, freeze: false, lr_factor: 0.1}}``
(``equimodal.models.pretrained``).

With ``auto`` a modality's kind comes, in this order, from

1. the dataset's ``preferred_encoders`` (modality -> encoder name; the paper datasets' ResNet-18s),
2. the dataset's ``modality_kinds`` (modality -> kind, or ``{"kind": ..., options}``): ``image``,
   ``sequence``, ``vector``, ``tokens`` (options ``vocab_size``, ``padding_id``), ``table``
   (options ``categories``: codes per categorical column, ``numeric``: number columns),
3. the rule, read off one training sample (shape without the batch axis, and dtype):

   ======================================= ============ =====================================
   sample                                  kind         encoder
   ======================================= ============ =====================================
   ``C x H x W`` (numbers)                 image        ``cnn`` (SmallCNN; H, W >= 4, else an error)
   ``A x B`` (numbers), A >= 4, B >= 4,    image        ``cnn`` (a spectrogram, a grey image)
   and not (A <= 16 and B >= 8 A)
   any other ``A x B`` (numbers)           sequence     ``cnn1d`` (A channels x B steps)
   ``D`` floats, bool, uint8 or int8       vector       ``mlp``
   ``T`` integers (int16/32/64)            tokens       ``transformer`` (padding id 0; vocabulary
                                                        size: the largest id in the training split + 1)
   anything else (0-d, 4-d and more,       --           one-line error naming the modality, its
   complex numbers)                                     shape and dtype, and the way out
   ======================================= ============ =====================================

So a sensor window ``3 x 100`` (or ``6 x 128``) is channels x time, a ``40 x 63`` spectrogram and a
``28 x 28`` image are images. ``describe_choice`` says which kind was chosen and why.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from .encoders import ENCODERS, SmallCNN

#: kind -> the encoder the automatic choice builds for it
KIND_ENCODERS = {"image": "cnn", "sequence": "cnn1d", "vector": "mlp", "tokens": "transformer", "table": "tabular"}
#: the prefixes of pretrained backbones (``equimodal.models.pretrained``)
BACKBONE_PREFIXES = ("timm:", "hf:")
#: options a backbone's mapping may hold
BACKBONE_OPTIONS = ("name", "checkpoint", "freeze", "lr_factor")
INTEGER_TOKENS = (torch.int16, torch.int32, torch.int64)
WAY_OUT = ("declare its kind (a dataset attribute modality_kinds = {name: 'image'|'sequence'|'vector'|'tokens'|"
           "'table'}), choose its encoder with model.encoder={name: cnn|cnn1d|mlp|transformer|tabular|timm:...|hf:...}, "
           "or build your own model with model.factory")


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: expected an encoder name, got {name!r}")
    if name.startswith(BACKBONE_PREFIXES):
        if not name.split(":", 1)[1]:
            raise ConfigError(f"{where}: {name!r} names no model after the prefix (timm:<model> or hf:<folder>)")
        return
    if name != "auto" and name not in ENCODERS:
        raise ConfigError(f"{where}: {name!r} is not one of {['auto', *ENCODERS]} nor timm:<model> / hf:<folder>")


def check_encoder_spec(value: Any, key: str = "model.encoder") -> Any:
    """``model.encoder`` checked (one name, or a mapping modality -> name or backbone options);
    returned as given. Raises ``ConfigError`` naming the key."""
    if isinstance(value, str):
        _check_name(value, key)
        return value
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{key}: expected an encoder name or a mapping modality -> encoder "
                          f"(e.g. {{audio: cnn1d, text: transformer}}), got {value!r}")
    for m, spec in value.items():
        where = f"{key}.{m}"
        if not isinstance(m, str):
            raise ConfigError(f"{key}: modality names must be strings, got {m!r}")
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(BACKBONE_OPTIONS))
            if unknown or "name" not in spec:
                raise ConfigError(f"{where}: a mapping takes {list(BACKBONE_OPTIONS)} (name required); "
                                  f"got {sorted(spec)}")
            _check_name(spec["name"], f"{where}.name")
            if not str(spec["name"]).startswith(BACKBONE_PREFIXES):
                raise ConfigError(f"{where}: checkpoint / freeze / lr_factor are options of a pretrained backbone "
                                  f"(timm:<model> or hf:<folder>), not of {spec['name']!r}")
            if "freeze" in spec and not isinstance(spec["freeze"], bool):
                raise ConfigError(f"{where}.freeze: expected true or false, got {spec['freeze']!r}")
            factor = spec.get("lr_factor", 1.0)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 0:
                raise ConfigError(f"{where}.lr_factor: expected a number >= 0, got {factor!r}")
            ckpt = spec.get("checkpoint")
            if ckpt is not None and (not isinstance(ckpt, str) or not ckpt):
                raise ConfigError(f"{where}.checkpoint: expected a path (or 'scratch'), got {ckpt!r}")
        else:
            _check_name(spec, where)
    return value


def encoder_for(model_cfg: dict, modality: str) -> Any:
    """The encoder spec ``model.encoder`` gives one modality (``auto`` where a mapping leaves it out)."""
    spec = model_cfg.get("encoder", "auto")
    if isinstance(spec, Mapping):
        return spec.get(modality, "auto")
    return spec


def declared_kinds(dataset: Any) -> dict[str, dict[str, Any]]:
    """The dataset's ``modality_kinds`` as modality -> {"kind": ..., options}; read from the dataset
    or, for a user's dataset wrapped by the trainer, from the dataset it wraps."""
    raw = getattr(dataset, "modality_kinds", None)
    if raw is None:
        raw = getattr(getattr(dataset, "base", None), "modality_kinds", None)
    out = {}
    for m, decl in (raw or {}).items():
        decl = {"kind": decl} if isinstance(decl, str) else dict(decl)
        if decl.get("kind") not in KIND_ENCODERS:
            raise ConfigError(f"modality_kinds[{m!r}] of the dataset: kind {decl.get('kind')!r} is not one of "
                              f"{list(KIND_ENCODERS)}")
        out[m] = decl
    return out


def preferred_encoders(dataset: Any) -> dict[str, str]:
    """The dataset's ``preferred_encoders`` (modality -> encoder name), if any."""
    found = getattr(dataset, "preferred_encoders", None)
    if found is None:
        found = getattr(getattr(dataset, "base", None), "preferred_encoders", None)
    return dict(found or {})


def _where(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return f"modality {name!r} (one sample of shape {tuple(shape)}, dtype {str(dtype).replace('torch.', '')})"


def infer_kind(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[str, str]:
    """(kind, why) the rule reads off one sample's shape (no batch axis) and dtype; ``ConfigError``
    in one line for a sample it cannot place."""
    where = _where(name, shape, dtype)
    if dtype.is_complex:
        raise ConfigError(f"{where}: the automatic encoder reads real numbers and integer token ids only; {WAY_OUT}")
    if len(shape) == 1:
        if dtype in INTEGER_TOKENS:
            return "tokens", "a 1-D tensor of integers: token ids"
        return "vector", "a 1-D tensor of numbers: a feature vector"
    if len(shape) == 2:
        a, b = shape
        if a < SmallCNN.MIN_SIZE or b < SmallCNN.MIN_SIZE:
            return "sequence", (f"{a} x {b} is too small for the image CNN (needs {SmallCNN.MIN_SIZE} x "
                                f"{SmallCNN.MIN_SIZE}): read as {a} channels x {b} steps")
        if a <= 16 and b >= 8 * a:
            return "sequence", f"few rows over many columns: read as {a} channels x {b} steps"
        return "image", "a 2-D grid: an image or spectrogram (height x width)"
    if len(shape) == 3:
        if min(shape[1:]) < SmallCNN.MIN_SIZE:
            raise ConfigError(f"{where}: read as an image C x H x W, but H x W = {shape[1]} x {shape[2]} is too small "
                              f"for the image CNN (SmallCNN needs at least {SmallCNN.MIN_SIZE} x {SmallCNN.MIN_SIZE}); "
                              f"{WAY_OUT}")
        return "image", "a 3-D tensor: an image C x H x W"
    raise ConfigError(f"{where}: the automatic encoder places 1-D vectors or token ids, 2-D sequences or images and "
                      f"3-D images only; {WAY_OUT}")


def _token_vocabulary(dataset: Any, name: str) -> int:
    """Largest token id in the training split + 1 (in memory: one max; otherwise one pass)."""
    inputs = getattr(dataset, "inputs", None)
    if isinstance(inputs, dict) and name in inputs:
        return int(inputs[name].max()) + 1
    from ..data.base import iterate_batches  # a lazy dataset: read it once
    top = 0
    for batch, _ in iterate_batches(dataset, 256):
        top = max(top, int(batch[name].max()))
    return top + 1


def build_encoder(name: str, spec: Any, decl: dict[str, Any] | None, dataset: Any, sample: torch.Tensor,
                  model_cfg: dict) -> nn.Module:
    """One modality's encoder: ``spec`` from ``model.encoder`` (or auto), ``decl`` the dataset's
    declared kind, ``sample`` one training sample (no batch axis)."""
    width, dim, norm = model_cfg["width"], model_cfg["feature_dim"], model_cfg.get("norm", "batch")
    shape, dtype = tuple(sample.shape), sample.dtype
    options: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        options, spec = dict(spec), spec["name"]
    if isinstance(spec, str) and spec.startswith(BACKBONE_PREFIXES):
        from .pretrained import build_backbone
        return build_backbone(name, spec, options, shape, decl or {})
    decl = dict(decl or {})
    if spec == "auto":
        kind = decl.get("kind") or infer_kind(name, shape, dtype)[0]
        spec = KIND_ENCODERS[kind]
    where = _where(name, shape, dtype)
    if spec in ("resnet18-audio", "resnet18-visual"):
        return ENCODERS[spec]()
    if spec == "cnn":
        if len(shape) not in (2, 3) or min(shape[-2:]) < SmallCNN.MIN_SIZE:
            raise ConfigError(f"{where}: the image CNN (cnn) reads H x W or C x H x W with H, W >= {SmallCNN.MIN_SIZE}; "
                              f"{WAY_OUT}")
        return ENCODERS["cnn"](in_channels=shape[0] if len(shape) == 3 else 1, width=width, out_dim=dim, norm=norm)
    if spec == "cnn1d":
        if len(shape) not in (1, 2):
            raise ConfigError(f"{where}: the 1-D CNN (cnn1d) reads C x T (or T) sequences; {WAY_OUT}")
        channels = shape[0] if len(shape) == 2 else 1
        return ENCODERS["cnn1d"](in_channels=channels, length=shape[-1], width=width, out_dim=dim, norm=norm)
    if spec == "transformer":
        if len(shape) != 1 or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise ConfigError(f"{where}: the transformer reads padded integer token ids of shape T; {WAY_OUT}")
        vocab = int(decl.get("vocab_size") or _token_vocabulary(dataset, name))
        padding = int(decl.get("padding_id", 0))
        return ENCODERS["transformer"](vocab_size=max(vocab, padding + 1), max_len=shape[0], padding_id=padding,
                                       width=width, out_dim=dim)
    if spec == "tabular":
        categories = list(decl.get("categories", []))
        numeric = int(decl.get("numeric", (shape[0] if len(shape) == 1 else 0) - len(categories)))
        if len(shape) != 1 or shape[0] != len(categories) + numeric:
            raise ConfigError(f"{where}: the tabular encoder reads one row of {len(categories)} category codes and "
                              f"{numeric} numbers (declare modality_kinds={{{name!r}: {{'kind': 'table', "
                              "'categories': [...], 'numeric': n}}); " + WAY_OUT)
        return ENCODERS["tabular"](categories, numeric, width=width, out_dim=dim, norm=norm)
    if len(shape) == 0:  # mlp
        raise ConfigError(f"{where}: a 0-dimensional sample has no features to encode; give each sample as a "
                          f"vector of shape (1,) at least; {WAY_OUT}")
    in_dim = int(torch.tensor(shape).prod())
    return ENCODERS["mlp"](in_dim=in_dim, hidden=2 * width * 2, out_dim=dim, norm=norm)


def build_encoders(model_cfg: dict, dataset: Any, modalities: tuple[str, ...] | list[str],
                   known: tuple[str, ...] | list[str] | None = None) -> dict[str, nn.Module]:
    """One encoder per modality of ``dataset`` (the training split), chosen as the module docstring
    says. ``known``: every modality the dataset can give (a ``model.encoder`` mapping may name those
    not in this run; any other name is an error)."""
    spec = model_cfg.get("encoder", "auto")
    check_encoder_spec(spec)
    if isinstance(spec, Mapping):
        allowed = set(modalities) | set(known or ())
        unknown = [m for m in spec if m not in allowed]
        if unknown:
            raise ConfigError(f"model.encoder names modality {unknown} that the data does not have; it has "
                              f"{sorted(allowed)}")
    preferred, kinds = preferred_encoders(dataset), declared_kinds(dataset)
    first = dataset[[0]][0]
    encoders = {}
    for m in modalities:
        choice = encoder_for(model_cfg, m)
        if choice == "auto" and m in preferred:
            choice = preferred[m]
        encoders[m] = build_encoder(m, choice, kinds.get(m), dataset, first[m][0], model_cfg)
    return encoders


def describe_choice(name: str, sample: torch.Tensor, declared: dict[str, Any] | None = None) -> str:
    """One line: the kind the automatic choice gives a modality and why (for docs and messages)."""
    if declared and declared.get("kind"):
        return f"{name}: {declared['kind']} (declared by the dataset) -> {KIND_ENCODERS[declared['kind']]}"
    kind, why = infer_kind(name, tuple(sample.shape), sample.dtype)
    return f"{name}: {kind} ({why}) -> {KIND_ENCODERS[kind]}"
