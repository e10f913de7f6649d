"""Backbone family adapters, one per layout: model_type -> the adapter that loads, runs and mirrors its layers.

Encoders (post-LN text, stages/families/encoder.py), vision encoders (pre-LN, vision.py), decoder-only LMs in the
Llama layout (decoder.py), GPT-2 (gpt2.py), the T5 encoder (t5.py). Adding a family is one adapter here.
"""
from __future__ import annotations

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


def family_for(model_type: str) -> Family:
    """The adapter of a model_type; ValueError naming the supported ones otherwise."""
    if model_type not in ADAPTERS:
        raise ValueError(f"model_type {model_type!r} is not supported for frozen layers; supported: "
                         f"{', '.join(ADAPTERS)}")
    return ADAPTERS[model_type]
