"""The `model` section of the training config, derived from the signature of the model config's
`__init__` (one source of truth for model hyper-parameters; see training/config.py)."""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from dataclasses import field
from typing import Any, Optional

_SCALARS = (int, float, bool, str)

# `model.arch` when the config does not set it; the choices are training/architectures.py's ARCHS.
DEFAULT_ARCH = "hyena_rtf"
# Fields the training config adds in front of the model config's parameters.
RESERVED = ("arch", "preset")


def _omegaconf_type(annotation: Any) -> Any:
    """Map a model-config annotation to a type OmegaConf validates, wrapped in Optional.

    Scalars stay typed (so `model.d_model=abc` fails), list/tuple/Sequence of a scalar become
    List[scalar]; anything OmegaConf cannot check becomes Any.
    """
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation in _SCALARS:
        return Optional[annotation]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _omegaconf_type(args[0])
    if origin in (list, tuple, collections.abc.Sequence):
        elems = [a for a in args if a is not Ellipsis]
        if len(set(elems)) == 1 and elems[0] in _SCALARS:
            return Optional[list[elems[0]]]
        return Optional[list[Any]]
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return Optional[kinds.pop()] if len(kinds) == 1 and next(iter(kinds), None) in _SCALARS else Any
    return Any


def model_schema(config_cls: type) -> type:
    """Dataclass with one Optional field (default None) per parameter of `config_cls.__init__`.

    Parameters without a type annotation, *args/**kwargs and `self` are skipped. Two fields are
    added in front: `arch` (default DEFAULT_ARCH; training/architectures.py) and `preset`.
    """
    hints = typing.get_type_hints(config_cls.__init__)
    fields: list[tuple] = [("arch", str, field(default=DEFAULT_ARCH)), ("preset", Optional[str], field(default=None))]
    for name, p in inspect.signature(config_cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name not in hints:
            continue
        if name in RESERVED:
            raise TypeError(f"{config_cls.__name__} has a parameter named {name!r}, which the training config reserves")
        fields.append((name, _omegaconf_type(hints[name]), field(default=None)))
    return dataclasses.make_dataclass("ModelConfig", fields)


def model_defaults(config_cls: type) -> dict[str, Any]:
    """Signature defaults of `config_cls.__init__` (the values used when neither preset nor YAML sets one)."""
    out = {}
    for name, p in inspect.signature(config_cls.__init__).parameters.items():
        if p.default is not inspect.Parameter.empty and name != "self":
            out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out
