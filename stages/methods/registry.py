"""Method registry, in the manner of PEFT's tuner registry: name -> (config class, module class)."""
from __future__ import annotations

import dataclasses
import types
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
    """Make a side network available by `config_class.method` (to `pipeline fit --method`, `pipeline methods` and
    `SideNetwork.for_cache`). config_class: a MethodConfig dataclass (options with defaults); model_class: an
    nn.Module built as model_class(config, spec: FeatureSpec), with `required_layers(config, spec)` (a static method:
    the hidden_states indices it reads) and forward(hidden_states: CachedHiddenStates [B, K, T, D] or a float tensor,
    mask [B, T] bool) -> logits [B, num_labels]. Raises ValueError for an empty name or a missing required_layers."""
    if not config_class.method:
        raise ValueError(f"{config_class.__name__}.method is empty: name the method (a class attribute)")
    if not callable(getattr(model_class, "required_layers", None)):
        raise ValueError(f"{model_class.__name__} needs a static method required_layers(config, spec) -> list[int]")
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
    if origin in (typing.Union, types.UnionType):  # `bool | None`: None is a default's "not set", never typed
        (kind,) = set(typing.get_args(kind)) - {type(None)}
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


ENTRY_POINT_GROUP = "cachetune.methods"  # a package's own side networks: NAME = "module" or "module:function"
_plugins_loaded = False


def _load_builtin_methods() -> None:
    from . import linear, lst, sherl, synqt, unipt, utuning  # noqa: F401  (each registers itself on import)

    _load_plugins()


def _load_plugins() -> None:
    """Methods other packages declare under the entry-point group `cachetune.methods`: the module is imported (its
    register_method calls run) and, for "module:function", the function is called. A plugin that fails to load is
    an InputError naming it and its package, not a method that silently goes missing."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    from cachetune.cache.errors import InputError

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
            if callable(loaded) and not isinstance(loaded, type):
                loaded()
        except Exception as error:
            _plugins_loaded = False
            package = entry.dist.name if entry.dist else "its package"
            raise InputError(f"the side-network plugin {entry.name!r} ({entry.value}, from {package}) failed to load "
                             f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
                             f"fix or uninstall {package}") from None
