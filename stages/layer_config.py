"""A backbone's layer shape from its config.json alone: no model code is imported here.

The config the layers are built from is the model's own, or the vision tower's of a two-tower CLIP/SigLIP
checkpoint. Families name the FFN width differently: `intermediate_size` (BERT, ViT, CLIP, ...) or
`mlp_ratio` x width (DINOv2).
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

# Two-tower checkpoints whose vision tower's layers are used: model_type -> the checkpoint's vision prefix.
VISION_TOWERS = {"clip": "vision_model.", "siglip": "vision_model."}


def layer_config(backbone_path: str) -> PretrainedConfig:
    """The config the layers are built from: the model's, or the vision tower's of a CLIP/SigLIP checkpoint."""
    config = AutoConfig.from_pretrained(backbone_path)
    if config.model_type in VISION_TOWERS:
        config = config.vision_config
    return config


def ffn_width(config: PretrainedConfig) -> int:
    if getattr(config, "intermediate_size", None):
        return int(config.intermediate_size)
    return int(config.hidden_size * config.mlp_ratio)


def layer_norm_eps(config: PretrainedConfig) -> float:
    return float(getattr(config, "layer_norm_eps", 1e-12))
