"""Backbone family records, one per layout: model_type -> the adapter that loads, runs and mirrors its layers, and
the facts stage one, the baselines and the methods ask of it (causal or not, pooling, vision tower, position
interpolation, LoRA targets: `Family` in base.py).

Encoders (post-LN text, stages/families/encoder.py), vision encoders (pre-LN, vision.py), decoder-only LMs in the
Llama layout (decoder.py), GPT-2 (gpt2.py), the T5 encoder (t5.py), and DistilBERT's facts (encoder.py).
"""
from __future__ import annotations

import importlib
import pkgutil

from cachetune.cache.errors import InputError

from .base import Family

# Every module of this package is read for its Family records (module-level instances), so adding a family is one
# record in one file here: a new module, or an instance beside its kin (a RotaryDecoder for a Llama-layout model).
_LISTED_FIRST = ("encoder", "vision", "decoder", "gpt2", "t5")  # the order messages list the families in
_RECORDS = {}
for _name in sorted((m.name for m in pkgutil.iter_modules(__path__)),
                    key=lambda name: (_LISTED_FIRST.index(name) if name in _LISTED_FIRST else len(_LISTED_FIRST), name)):
    for _value in vars(importlib.import_module(f"{__name__}.{_name}")).values():
        if isinstance(_value, Family):
            _RECORDS[id(_value)] = _value
FAMILIES: dict[str, Family] = {kind: family for family in _RECORDS.values() for kind in family.model_types}
ADAPTERS: dict[str, Family] = {kind: family for kind, family in FAMILIES.items() if family.frozen_layers}


def family_facts(model_type: str) -> Family:
    """The record of a model_type: its family's, or the generic encoder's for a family without one."""
    return FAMILIES.get(model_type, Family())  # any other text encoder (BERT-like: ELECTRA, ...): the defaults


class UnsupportedFamily(InputError, ValueError):
    """A backbone family without an adapter: the CLI prints it as one line (InputError), exit 2."""


def family_for(model_type: str) -> Family:
    """The adapter of a model_type; UnsupportedFamily (an InputError and a ValueError) naming the supported ones."""
    if model_type not in ADAPTERS:
        raise UnsupportedFamily(f"model_type {model_type!r} has no frozen-layer support (needed by sherl and synqt); "
                                f"supported: {', '.join(ADAPTERS)}; linear, lst, unipt and utuning read only the cache")
    return ADAPTERS[model_type]
