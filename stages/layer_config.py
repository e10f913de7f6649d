"""A backbone's layer shape from its config.json alone: no model code is imported here.

The config the layers are built from is the model's own, or the vision tower's of a two-tower CLIP/SigLIP
checkpoint. Families name the FFN width differently: `intermediate_size` (BERT, ViT, CLIP, Llama, ...),
`d_ff` (T5), `n_inner` (GPT-2, default 4 x width) or `mlp_ratio` x width (DINOv2).
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig


def layer_config(backbone_path: str) -> PretrainedConfig:
    """The config the layers are built from: the model's, or the vision tower's of a CLIP/SigLIP checkpoint."""
    from .families import family_facts  # the family adapters import this module's helpers

    config = AutoConfig.from_pretrained(backbone_path)
    if config.model_type in family_facts(config.model_type).towers:  # a two-tower checkpoint: its vision tower's
        config = config.vision_config
    return config


def ffn_width(config: PretrainedConfig) -> int:
    """The FFN's inner width: intermediate_size, d_ff (T5), n_inner or 4 x width (GPT-2), mlp_ratio x width."""
    for name in ("intermediate_size", "d_ff", "n_inner"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    if getattr(config, "mlp_ratio", None):
        return int(config.hidden_size * config.mlp_ratio)
    return 4 * int(config.hidden_size)


def layer_norm_eps(config: PretrainedConfig) -> float:
    for name in ("layer_norm_eps", "rms_norm_eps", "layer_norm_epsilon"):
        if getattr(config, name, None) is not None:
            return float(getattr(config, name))
    return 1e-12
