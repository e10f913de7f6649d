"""cachetune: cache a frozen backbone's hidden states once, train memory-light side networks on the cache."""
from __future__ import annotations

import os as _os

# In a source checkout the subpackages are the repository's top-level folders (cache/, stages/, pipeline/) beside
# this one; an installed wheel holds them inside this package, where the normal lookup finds them.
_source = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "stages")) and \
        _os.path.isfile(_os.path.join(_source, "stages", "__init__.py")):
    __path__.append(_source)

# The public API. Names load on first use (PEP 562), so `import cachetune` and the `pipeline` command stay fast.
_EXPORTS = {
    "extract": "cachetune.pipeline.extract_run",
    "Cache": "cachetune.cache.store",
    "CachedSplit": "cachetune.cache.dataset",
    "CachedHiddenStates": "cachetune.cache.hidden_states",
    "SideNetwork": "cachetune.stages.training.side_network",
    "FeatureSpec": "cachetune.stages.methods.base",
    "MethodConfig": "cachetune.stages.methods.base",
    "pool": "cachetune.stages.methods.base",
    "rms_normalize": "cachetune.stages.methods.base",
    "decode_linear": "cachetune.stages.methods.decode_linear",
    "register_method": "cachetune.stages.methods.registry",
    "method_names": "cachetune.stages.methods.registry",
    "CachetuneError": "cachetune.cache.errors",
    "InputError": "cachetune.cache.errors",
    "StorageError": "cachetune.cache.errors",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cachetune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
