"""linear: the floor every method must beat. z = pooled H_L; a linear head.

Decoder backbones (`rms_norm`, default off): a decoder's raw residual streams carry massive activations (SmolLM2-135M,
measured on movies: max |x| 27,296 in H_12..H_28, median |x| 1.8-10.5), and they sit on the first token (the attention
sink; every other token of H_12 and H_20 stays below ~175). `rms_norm=true` puts every cached layer at unit RMS
per token first (no parameters, as a pre-norm layer treats its input). Measured with linear probes on single layers
(bench/rms_norm_probe.py, 600 training samples, 3 seeds, loaded machine): mean-pooled H_6 / H_12 gain +2.5 / +4.3
points with it, last-token ones change by -1.7..+0.7 (noise). Full side networks with and without it were not
measured (too slow on the shared 2-core machine): `python bench/rms_norm.py` does it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = rms_normalize(features[:, -1]) if self.rms_norm else features[:, -1]
        return self.head(self.dropout(pool(last, mask, self.spec.pooling)))


register_method(LinearConfig, LinearProbe, "linear probe on the pooled last layer (the baseline)")
