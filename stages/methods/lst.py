"""lst: Ladder Side-Tuning (Sung et al. 2022). A narrow transformer ladder fed, through gates, by layer outputs.

The backbone's blocks are numbered i = 0 .. L-1 (block i turns H_i into H_{i+1}); every `drop_every`-th block
starting at 0 is dropped, and each kept block feeds its OUTPUT H_{i+1} to the ladder, as the authors' loop over
blocks does (`side_downsample(layer_outputs[0])`). So for 12 layers the ladder reads H_2,3,4,6,7,8,10,11,12: the
last layer's output is always read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .base import FeatureSpec, MethodConfig, per_layer_linear, pool, side_width
from .registry import register_method
from .support import needs_layer_shape


@dataclass
class LSTConfig(MethodConfig):
    method = "lst"
    r: int = 8  # reduction factor: side width h = D / r
    drop_every: int = 4  # drop blocks 0, 4, 8, ... (block i makes H_{i+1}); 0 keeps all
    dropout: float = 0.1


def kept_layers(config: LSTConfig, num_layers: int) -> list[int]:
    """The hidden_states the ladder reads: H_{i+1} for every kept block i."""
    return [i + 1 for i in range(num_layers) if config.drop_every <= 0 or i % config.drop_every != 0]


def backbone_shape(path: str, hidden_size: int) -> tuple[int, int, float]:
    """(ffn width, attention heads, LayerNorm eps) of the backbone's layers; defaults when no config.json."""
    if path and os.path.exists(os.path.join(path, "config.json")):
        from ..layer_config import ffn_width, layer_config, layer_norm_eps

        config = layer_config(path)
        return ffn_width(config), config.num_attention_heads, layer_norm_eps(config)
    return 4 * hidden_size, 4, 1e-12


class SideBlock(nn.Module):
    """A post-LN transformer layer (BERT's arrangement) at the side width."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], dropout_p=self.attention_dropout if self.training else 0.0
        )
        x = self.norm1(x + self.dropout(self.out(attended.transpose(1, 2).reshape(B, T, H))))
        return self.norm2(x + self.dropout(self.ffn(x)))


class LadderSideNetwork(nn.Module):
    supports_backbone = staticmethod(needs_layer_shape)  # sized from the layer config: stages/methods/support.py

    def __init__(self, config: LSTConfig, spec: FeatureSpec):
        super().__init__()
        self.spec = spec
        D = spec.hidden_size
        h = side_width(D, config.r)
        ffn, heads, eps = backbone_shape(spec.backbone_path, D)
        while h % heads:  # the backbone's head count when it divides h, else the largest smaller one that does
            heads -= 1
        self.layers = kept_layers(config, spec.num_layers)
        self.dropout = nn.Dropout(config.dropout)
        self.first = nn.Linear(D, h)
        self.down = nn.ModuleList(nn.Linear(D, h) for _ in self.layers)
        self.gates = nn.Parameter(torch.zeros(len(self.layers)))  # alpha_l; mu_l = sigmoid(alpha_l / 0.1)
        self.blocks = nn.ModuleList(SideBlock(h, heads, max(1, ffn // config.r), config.dropout, eps) for _ in self.layers)
        self.final_norm = nn.LayerNorm(h, eps=eps)
        self.up = nn.Linear(h, D)
        self.head = nn.Linear(D, spec.num_labels)
        for projection in [self.first, *self.down, self.up]:
            nn.init.normal_(projection.weight, std=0.01)
            nn.init.zeros_(projection.bias)

    @staticmethod
    def required_layers(config: LSTConfig, spec: FeatureSpec) -> list[int]:
        return [0, *kept_layers(config, spec.num_layers)]

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # features: [B, 1 + kept, T, D] = H_0 then the kept blocks' outputs, in order.
        s = self.first(self.dropout(features[:, 0]))  # s_0 = W_first dropout(H_0)
        gates = torch.sigmoid(self.gates / 0.1)  # mu_l = sigmoid(alpha_l / 0.1)
        downs = per_layer_linear(features[:, 1:], self.down)  # W_down,l H_l for every kept l at once
        for i, block in enumerate(self.blocks):
            s = gates[i] * s + (1 - gates[i]) * downs[:, i]  # s <- mu s + (1 - mu) W_down,l H_l
            s = block(s, mask)  # then the side block
        s = self.up(self.dropout(self.final_norm(s)))
        return self.head(pool(s, mask, self.spec.pooling))


register_method(LSTConfig, LadderSideNetwork, "Ladder Side-Tuning: gated narrow transformer ladder over layer outputs")
