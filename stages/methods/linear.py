"""linear: the floor every method must beat. z = pooled H_L; a linear head.

Decoder backbones: `rms_norm=true` (default off) puts every cached layer at unit RMS per token first, against the
massive activations of decoders' residual streams; what it was measured to do: `base.rms_normalize`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cachetune.cache.hidden_states import CachedHiddenStates

from .base import FeatureSpec, MethodConfig, pool, rms_normalize
from .registry import register_method


@dataclass
class LinearConfig(MethodConfig):
    method = "linear"
    dropout: float = 0.0
    rms_norm: bool = False  # normalise each cached layer to unit RMS first (no parameters); see base.rms_normalize


class LinearProbe(nn.Module):
    def __init__(self, config: LinearConfig, spec: FeatureSpec):
        super().__init__()
        self.spec = spec
        self.rms_norm = config.rms_norm
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(spec.hidden_size, spec.num_labels)

    @staticmethod
    def required_layers(config: LinearConfig, spec: FeatureSpec) -> list[int]:
        return [spec.num_layers]

    def forward(self, features: CachedHiddenStates | torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features: the cached H_L ([B, 1, T, D] values or CachedHiddenStates), mask [B, T] -> logits [B, C]."""
        last = CachedHiddenStates.wrap(features, mask).layer(-1)
        last = rms_normalize(last) if self.rms_norm else last
        return self.head(self.dropout(pool(last, mask, self.spec.pooling)))


register_method(LinearConfig, LinearProbe, "linear probe on the pooled last layer (the baseline)")
