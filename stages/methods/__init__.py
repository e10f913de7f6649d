"""Side networks, one file per method, registered by name."""
from .base import FeatureSpec, MethodConfig, pool
from .registry import METHODS, build_model, config_from_dict, config_from_options, get_method, method_names, register_method

__all__ = ["FeatureSpec", "MethodConfig", "pool", "METHODS", "build_model", "config_from_dict",
           "config_from_options", "get_method", "method_names", "register_method"]
