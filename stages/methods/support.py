"""Which side networks can run on a cache's backbone: asked before anything is built or trained.

`extract` accepts any model transformers can load, but some methods rebuild parts of the backbone: SHERL and
SynQT load its frozen layers (the families of stages/backbone_layers.py's SUPPORTED_MODEL_TYPES), LST sizes its
side blocks from the layer config's FFN width and head count. A method declares what it needs with one class
attribute, `supports_backbone = staticmethod(needs_...)`: a function of the backbone folder that returns why it
cannot run there, or None. Methods without it (linear, unipt, utuning) read only the cached features.
"""
from __future__ import annotations

import os

from cachetune.cache.errors import InputError


def _config(backbone_path: str):
    """The backbone's config, or None when its folder (config.json) is not there. A config.json transformers
    cannot read is an InputError (extract could not have loaded that model either)."""
    if not backbone_path or not os.path.exists(os.path.join(backbone_path, "config.json")):
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(backbone_path)
    except (ValueError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot read the backbone's config at {backbone_path}: {message}; pass --backbone DIR "
                         "with the model the cache was extracted from") from None


def needs_frozen_layers(backbone_path: str) -> str | None:
    """For methods that load the backbone's own layers (stages/backbone_layers.py): its family must be there."""
    config = _config(backbone_path)
    if config is None:
        return (f"it loads the backbone's layers from {backbone_path}, which holds no config.json "
                "(pass --backbone DIR if the folder moved)")
    from ..backbone_layers import SUPPORTED_MODEL_TYPES

    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return (f"it rebuilds the backbone's frozen layers, and {config.model_type} layers are not among the families "
                f"it can build ({', '.join(SUPPORTED_MODEL_TYPES)})")
    return None


def needs_layer_shape(backbone_path: str) -> str | None:
    """For methods sized from the layer config (FFN width, attention heads); without a folder they use defaults."""
    config = _config(backbone_path)
    if config is None:
        return None
    from ..layer_config import ffn_width, layer_config

    try:
        layer = layer_config(backbone_path)
        ffn_width(layer)
        int(layer.num_attention_heads)
    except (AttributeError, TypeError, ValueError):
        return (f"it takes the FFN width and head count of its side blocks from the layer config, and the "
                f"{config.model_type} config names no FFN width (intermediate_size or mlp_ratio)")
    return None


def unsupported_reason(method: str, backbone_path: str) -> str | None:
    """Why `method` cannot run on the backbone at `backbone_path`, or None when it can."""
    from .registry import get_method

    check = getattr(get_method(method).model_class, "supports_backbone", None)
    return check(backbone_path) if check is not None else None


def universal_methods() -> list[str]:
    """The methods that read only cached features, so run on every cache."""
    from .registry import get_method, method_names

    return [name for name in method_names() if getattr(get_method(name).model_class, "supports_backbone", None) is None]


def require_support(method: str, backbone_path: str, model_type: str | None = None) -> None:
    """Raises InputError (one line, the fix) when `method` cannot run on this backbone."""
    reason = unsupported_reason(method, backbone_path)
    if reason:
        kind = f"{model_type} " if model_type else ""
        raise InputError(f"method {method!r} cannot run on this cache's {kind}backbone ({backbone_path}): {reason}; "
                         f"pick a method that can, e.g. {', '.join(universal_methods())}")


def split_supported(methods: list[str], backbone_path: str) -> tuple[list[str], dict[str, str]]:
    """(methods that can run, {method: why not} for the rest)."""
    reasons = {method: unsupported_reason(method, backbone_path) for method in methods}
    return [m for m in methods if not reasons[m]], {m: r for m, r in reasons.items() if r}
