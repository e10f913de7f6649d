"""Backbone family adapters, one per layout: model_type -> the adapter that loads, runs and mirrors its layers.

Encoders (post-LN text, stages/families/encoder.py), vision encoders (pre-LN, vision.py), decoder-only LMs in the
Llama layout (decoder.py), GPT-2 (gpt2.py), the T5 encoder (t5.py). Adding a family is one adapter here.
"""
from __future__ import annotations

from cache.errors import InputError

from .base import Family
from .decoder import GEMMA3, LLAMA, MISTRAL, QWEN2
from .encoder import BERT, MPNET, ROBERTA, XLM_ROBERTA
from .gpt2 import GPT2_FAMILY
from .t5 import T5_FAMILY
from .vision import CLIP, DEIT, DINOV2, SIGLIP, VIT

ADAPTERS: dict[str, Family] = {
    model_type: family
    for family in (BERT, ROBERTA, XLM_ROBERTA, MPNET, VIT, DEIT, DINOV2, CLIP, SIGLIP, LLAMA, MISTRAL, QWEN2,
                   GEMMA3, GPT2_FAMILY, T5_FAMILY)
    for model_type in family.model_types
}


class UnsupportedFamily(InputError, ValueError):
    """A backbone family without an adapter: the CLI prints it as one line (InputError), exit 2."""


def family_for(model_type: str) -> Family:
    """The adapter of a model_type; UnsupportedFamily (an InputError and a ValueError) naming the supported ones."""
    if model_type not in ADAPTERS:
        raise UnsupportedFamily(f"model_type {model_type!r} has no frozen-layer support (needed by sherl and synqt); "
                                f"supported: {', '.join(ADAPTERS)}; linear, lst, unipt and utuning read only the cache")
    return ADAPTERS[model_type]
