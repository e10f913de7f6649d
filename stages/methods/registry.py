"""Method registry, in the manner of PEFT's tuner registry: name -> (config class, module class)."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from torch import nn

from .base import FeatureSpec, MethodConfig


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_class: type[MethodConfig]
    model_class: type[nn.Module]
    summary: str


METHODS: dict[str, MethodEntry] = {}


def register_method(config_class: type[MethodConfig], model_class: type[nn.Module], summary: str) -> None:
    METHODS[config_class.method] = MethodEntry(config_class.method, config_class, model_class, summary)


def get_method(name: str) -> MethodEntry:
    _load_builtin_methods()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(METHODS)


def _parse_value(text, kind):
    if not isinstance(text, str):
        return text
    origin = typing.get_origin(kind)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if kind in (int, float, str):
        return kind(text)
    if origin in (tuple, list):
        (item,) = set(typing.get_args(kind)) - {Ellipsis}
        return tuple(item(part) for part in text.split(",") if part.strip())
    return text


def config_from_options(name: str, options: dict) -> MethodConfig:
    """Build a method's config from key=value options; an unknown key raises, listing the valid ones."""
    config_class = get_method(name).config_class
    hints = typing.get_type_hints(config_class)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(config_class)}
    values = {}
    for key, text in options.items():
        if key not in fields:
            raise ValueError(f"method {name!r} has no option {key!r}; valid options: {', '.join(sorted(fields))}")
        try:
            values[key] = _parse_value(text, fields[key])
        except (TypeError, ValueError) as error:
            raise ValueError(f"option {key}={text!r} for method {name!r}: {error}") from None
    return config_class(**values)


def config_from_dict(data: dict) -> MethodConfig:
    return get_method(data["method"]).config_class.from_dict(data)


def build_model(config: MethodConfig, spec: FeatureSpec) -> nn.Module:
    return get_method(config.method).model_class(config, spec)


def _load_builtin_methods() -> None:
    from . import linear, lst, sherl, synqt, unipt, utuning  # noqa: F401  (each registers itself on import)
