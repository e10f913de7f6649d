"""lst: Ladder Side-Tuning (Sung et al. 2022). A narrow transformer ladder fed, through gates, by layer outputs.

The backbone's blocks are numbered i = 0 .. L-1 (block i turns H_i into H_{i+1}); every `drop_every`-th block
starting at 0 is dropped, and each kept block feeds its OUTPUT H_{i+1} to the ladder, as the authors' loop over
blocks does (`side_downsample(layer_outputs[0])`). So for 12 layers the ladder reads H_2,3,4,6,7,8,10,11,12: the
last layer's output is always read.

Side blocks are the backbone family's own layer shrunk by r (width h = D / r, FFN width / r, the backbone's heads
where they divide h): post-LN for BERT-like encoders; for decoder-only LMs in the Llama layout pre-norm RMSNorm,
gated SiLU MLP, rotary positions, causal masking and grouped key/value heads (where the shrunk width allows); for
GPT-2 pre-LN, causal, GELU MLP (positions are in H_0); for T5 pre-RMSNorm, bidirectional. Each family's block is in
its adapter (stages/families/).

Decoder backbones: `rms_norm=true` (default off) puts every cached layer at unit RMS per token first, against the
massive activations of decoders' residual streams; what it was measured to do: `base.rms_normalize`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..families.encoder import SideBlock, encoder_side_block  # noqa: F401  (SideBlock: the encoders' block)
from cachetune.cache.hidden_states import CachedHiddenStates

from .base import FeatureSpec, MethodConfig, pool, rms_normalize, side_width
from .decode_linear import decode_linear
from .registry import register_method
from .support import needs_layer_shape


@dataclass
class LSTConfig(MethodConfig):
    method = "lst"
    r: int = 8  # reduction factor: side width h = D / r
    drop_every: int = 4  # drop blocks 0, 4, 8, ... (block i makes H_{i+1}); 0 keeps all
    dropout: float = 0.1
    rms_norm: bool = False  # normalise each cached layer to unit RMS first (no parameters); see base.rms_normalize


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


def side_block_builder(path: str, hidden_size: int):
    """(width, r, dropout) -> side block: the backbone family's own block shrunk by r (stages/families/; post-LN
    for encoders, pre-norm rotary causal for decoders), and the family's norm eps; without a config.json, a
    post-LN block with 4 heads and FFN 4D / r, and for a family without an adapter a post-LN block of its shape."""
    ffn, heads, eps = backbone_shape(path, hidden_size)
    if path and os.path.exists(os.path.join(path, "config.json")):
        from ..families import ADAPTERS
        from ..layer_config import layer_config

        config = layer_config(path)
        family = ADAPTERS.get(config.model_type)
        if family is not None:
            return (lambda width, r, dropout: family.side_block(config, width, r, dropout)), eps
    return (lambda width, r, dropout: encoder_side_block(width, heads, max(1, ffn // r), dropout, eps)), eps


class LadderSideNetwork(nn.Module):
    supports_backbone = staticmethod(needs_layer_shape)  # sized from the layer config: stages/methods/support.py

    def __init__(self, config: LSTConfig, spec: FeatureSpec):
        super().__init__()
        self.spec = spec
        self.rms_norm = config.rms_norm
        D = spec.hidden_size
        h = side_width(D, config.r)
        side_block, eps = side_block_builder(spec.backbone_path, D)
        self.layers = kept_layers(config, spec.num_layers)
        self.dropout = nn.Dropout(config.dropout)
        self.first = nn.Linear(D, h)
        self.down = nn.ModuleList(nn.Linear(D, h) for _ in self.layers)
        self.gates = nn.Parameter(torch.zeros(len(self.layers)))  # alpha_l; mu_l = sigmoid(alpha_l / 0.1)
        self.blocks = nn.ModuleList(side_block(h, config.r, config.dropout) for _ in self.layers)
        self.final_norm = nn.LayerNorm(h, eps=eps)
        self.up = nn.Linear(h, D)
        self.head = nn.Linear(D, spec.num_labels)
        for projection in [self.first, *self.down, self.up]:
            nn.init.normal_(projection.weight, std=0.01)
            nn.init.zeros_(projection.bias)

    @staticmethod
    def required_layers(config: LSTConfig, spec: FeatureSpec) -> list[int]:
        return [0, *kept_layers(config, spec.num_layers)]

    def forward(self, features: CachedHiddenStates | torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features: [B, 1 + kept, T, D] = H_0 then the kept blocks' outputs, in order (values or
        CachedHiddenStates); mask [B, T] bool -> logits [B, C]."""
        states = CachedHiddenStates.wrap(features, mask)
        first = rms_normalize(states.layer(0)) if self.rms_norm else states.layer(0)
        s = self.first(self.dropout(first))  # s_0 = W_first dropout(H_0)
        gates = torch.sigmoid(self.gates / 0.1)  # mu_l = sigmoid(alpha_l / 0.1)
        # W_down,l H_l for every kept l, decoded layer by layer (decode_linear keeps no float32 copy for backward)
        downs = decode_linear(states, self.down, range(1, states.num_layers), normalize=self.rms_norm)
        for i, block in enumerate(self.blocks):
            s = gates[i] * s + (1 - gates[i]) * downs[:, i]  # s <- mu s + (1 - mu) W_down,l H_l
            s = block(s, mask)  # then the side block
        s = self.up(self.dropout(self.final_norm(s)))
        return self.head(pool(s, mask, self.spec.pooling))


register_method(LSTConfig, LadderSideNetwork, "Ladder Side-Tuning: gated narrow transformer ladder over layer outputs")
