"""unipt: Universal Parallel Tuning (Diao et al., CVPR 2024), token-level form.

Every layer is projected to the side width; the last one is the anchor that each earlier layer is
related to token by token, and the results are mixed with confidence weights.

Decoder backbones: `rms_norm=true` (default off) puts every cached layer at unit RMS per token first, against the
massive activations of decoders' residual streams; what it was measured to do: `base.rms_normalize`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from cachetune.cache.hidden_states import CachedHiddenStates

from .base import FeatureSpec, MethodConfig, per_layer_norm, pool, side_width
from .decode_linear import decode_linear
from .registry import register_method


@dataclass
class UniPTConfig(MethodConfig):
    method = "unipt"
    r: int = 2  # reduction factor: side width h = D / r
    rms_norm: bool = False  # normalise each cached layer to unit RMS first (no parameters); see base.rms_normalize


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[..., T, h] -> [..., h] over real tokens; mask [B, T] broadcasts from the front."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    while weights.dim() < x.dim():
        weights = weights.unsqueeze(1)
    return (x * weights).sum(-2) / weights.sum(-2).clamp_min(1.0)


class UniPT(nn.Module):
    def __init__(self, config: UniPTConfig, spec: FeatureSpec):
        super().__init__()
        self.spec = spec
        self.rms_norm = config.rms_norm
        D = spec.hidden_size
        h = side_width(D, config.r)
        n = spec.num_layers + 1
        self.project = nn.ModuleList(nn.Linear(D, h) for _ in range(n))
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(n))
        self.confidence = nn.Linear(h, 1)
        self.fuse = nn.Linear(h, h)
        self.fuse_norm = nn.LayerNorm(h)
        self.up = nn.Linear(h, D)
        self.head = nn.Linear(D, spec.num_labels)

    @staticmethod
    def required_layers(config: UniPTConfig, spec: FeatureSpec) -> list[int]:
        return list(range(spec.num_layers + 1))

    def forward(self, features: CachedHiddenStates | torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features: H_0 .. H_L [B, L+1, T, D] (values or CachedHiddenStates), mask [B, T] bool -> logits [B, C]."""
        states = CachedHiddenStates.wrap(features, mask)
        # T_l = LN(W_l H_l), stacked [B, L+1, T, h]; the anchor is the last layer's.
        t = per_layer_norm(decode_linear(states, self.project, normalize=self.rms_norm), self.norms)
        anchor, others = t[:, -1], t[:, :-1]
        # Parallel interaction: ReLU'd raw dot products with padded keys zeroed, rows l1-normalised, plus identity.
        scores = torch.einsum("bqh,blkh->blqk", anchor, others) * mask[:, None, None, :].to(t.dtype)
        relation = F.normalize(F.relu(scores), p=1, dim=-1, eps=1e-8)
        mixed = relation @ others + others  # M_l, [B, L, T, h]
        # Confidence aggregation from the masked means of the LN'd features.
        a_bar, t_bar = masked_mean(anchor, mask), masked_mean(others, mask)
        alpha = torch.softmax(self.confidence(a_bar[:, None] * t_bar).squeeze(-1), dim=1)  # [B, L]
        y = anchor + self.fuse_norm(self.fuse((alpha[:, :, None, None] * mixed).sum(1)))
        return self.head(pool(self.up(F.relu(y)), mask, self.spec.pooling))


register_method(UniPTConfig, UniPT, "UniPT: anchor-guided parallel interaction and confidence aggregation over all layers")
