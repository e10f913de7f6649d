"""Post-LN text encoders: BERT, RoBERTa, XLM-RoBERTa, MPNet; and the query pass and side block they share with the
pre-LN vision encoders (stages/families/vision.py).

A post-LN layer: a = LN_att(x + Attn(x)), out = LN_out(a + FFN(a)); the mask is bidirectional over real tokens.
MPNet adds a relative position bias to its attention scores, computed once by the encoder from its shared
`relative_attention_bias` and passed to every layer: it is loaded with the layers and passed the same way.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ..layer_config import ffn_width
from .base import Family, bidirectional_mask, find_key
from .side_block import side_attention


class LayerParts(NamedTuple):
    """The submodules of one frozen encoder layer that SynQT's query pass uses.

    Post-LN (BERT-like): attention_norm follows attention + residual, output_norm follows FFN + residual.
    Pre-LN (vision, `pre_norm`): attention_norm comes before attention (on the queries and, for K/V, on the
    tokens), output_norm before the FFN."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    out: nn.Linear  # W_o
    attention_norm: nn.LayerNorm
    intermediate: nn.Module  # dense + activation (for SwiGLU: silu(gate x) * up x)
    output: nn.Linear  # the FFN's last dense
    output_norm: nn.LayerNorm
    pre_norm: bool = False
    attention_scale: nn.Module | None = None  # DINOv2 LayerScale after attention
    ffn_scale: nn.Module | None = None  # DINOv2 LayerScale after the FFN


def key_value_input(parts: LayerParts, hidden: torch.Tensor) -> torch.Tensor:
    """What the layer projects to keys and values: H itself (post-LN) or LN1(H) (pre-LN)."""
    return parts.attention_norm(hidden) if parts.pre_norm else hidden


def extract(parts: LayerParts, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            mask: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One frozen layer run on the queries only. queries [B, n, D]; keys, values [B, heads, T, d]
    (already projected, from `key_value_input`); mask [B, T]. Returns (Q_i, h_i, hh_i), each [B, n, D]."""
    B, n, D = queries.shape
    x = parts.attention_norm(queries) if parts.pre_norm else queries
    q = parts.query(x).view(B, n, heads, D // heads).transpose(1, 2)
    attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None, :])  # scale d^-1/2
    h = parts.out(attended.transpose(1, 2).reshape(B, n, D))
    if parts.attention_scale is not None:
        h = parts.attention_scale(h)
    if parts.pre_norm:  # x + Attn(LN1 x), then a + FFN(LN2 a)
        a = queries + h
        hh = parts.output(parts.intermediate(parts.output_norm(a)))
        if parts.ffn_scale is not None:
            hh = parts.ffn_scale(hh)
        return a + hh, h, hh
    a = parts.attention_norm(queries + h)
    hh = parts.output(parts.intermediate(a))
    return parts.output_norm(a + hh), h, hh


def parts_query_pass(parts: LayerParts, heads: int, queries, hidden, mask):
    """K, V from the tokens (no gradient), then `extract` on the queries."""
    B, T, D = hidden.shape
    with torch.no_grad():
        source = key_value_input(parts, hidden)
        keys = parts.key(source).view(B, T, heads, D // heads).transpose(1, 2)
        values = parts.value(source).view(B, T, heads, D // heads).transpose(1, 2)
    return extract(parts, queries, keys, values, mask, heads)


class SideBlock(nn.Module):
    """A post-LN transformer layer (BERT's arrangement) at the side width: LST's side block for encoders."""

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
        attended = side_attention(q, k, v, mask[:, None, None, :], self.attention_dropout if self.training else 0.0)
        x = self.norm1(x + self.dropout(self.out(attended.transpose(1, 2).reshape(B, T, H))))
        return self.norm2(x + self.dropout(self.ffn(x)))


def encoder_side_block(width: int, heads: int, ffn: int, dropout: float, eps: float) -> SideBlock:
    """The backbone's head count when it divides the width, else the largest smaller one that does."""
    while width % heads:
        heads -= 1
    return SideBlock(width, heads, ffn, dropout, eps)


class Encoder(Family):
    """A post-LN text encoder; layers at `encoder.layer.N` (under any model prefix)."""

    def __init__(self, model_type: str, module: str, layer_class: str, default_attention: str = "sdpa"):
        self.model_types = (model_type,)
        self.module, self.layer_class, self.default_attention = module, layer_class, default_attention

    def build_layer(self, config, index: int) -> nn.Module:
        return getattr(importlib.import_module(self.module), self.layer_class)(config)


    def checkpoint_tensor(self, name, keys, get_tensor):
        """The key for a module name, allowing a model prefix (bert., mpnet., …) and old LayerNorm names."""
        aliases = [name]
        if ".LayerNorm." in name:
            aliases.append(name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"))
        for alias in aliases:
            key = find_key(["encoder." + alias], keys)
            if key is not None:
                return get_tensor(key)
        raise KeyError(f"checkpoint has no weights for encoder.{name}")

    def run(self, frozen, hidden, mask):
        attention_mask = bidirectional_mask(frozen.config, hidden, mask)
        for layer in frozen.layer.values():
            hidden = layer(hidden, attention_mask)
        return hidden

    def query_pass(self, frozen, index, queries, hidden, mask):
        return parts_query_pass(self.parts(frozen.layer[str(index)]), frozen.config.num_attention_heads,
                                queries, hidden, mask)

    @staticmethod
    def parts(layer) -> LayerParts:
        attention = layer.attention
        if hasattr(attention, "attn"):  # MPNet
            heads = attention.attn
            q, k, v, o, norm = heads.q, heads.k, heads.v, heads.o, attention.LayerNorm
        else:  # BERT, RoBERTa, XLM-RoBERTa
            heads = attention.self
            q, k, v, o, norm = heads.query, heads.key, heads.value, attention.output.dense, attention.output.LayerNorm
        return LayerParts(q, k, v, o, norm, layer.intermediate, layer.output.dense, layer.output.LayerNorm)

    def head_norm(self, frozen):
        return self.parts(frozen.layer[str(frozen.indices[-1] - 1)]).output_norm

    def side_block(self, config, width, r, dropout):
        return encoder_side_block(width, config.num_attention_heads, max(1, ffn_width(config) // r), dropout,
                                  float(getattr(config, "layer_norm_eps", 1e-12)))


def mpnet_position_bias(relative_attention_bias: nn.Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """MPNetEncoder.compute_position_bias itself, run on a stand-in that holds only the shared embedding."""
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    encoder = SimpleNamespace(relative_attention_bias=relative_attention_bias,
                              relative_position_bucket=MPNetEncoder.relative_position_bucket)
    return MPNetEncoder.compute_position_bias(encoder, hidden)


class MPNet(Encoder):
    """MPNet: an encoder whose layers share one relative position bias, computed once from the input (as
    MPNetEncoder does) and passed to every layer. SynQT's learnable queries have no position, so no relative bias
    applies to them and none is added."""

    lora_targets = ("q", "v")

    def shared_modules(self, config, indices):
        return {"relative_attention_bias": nn.Embedding(config.relative_attention_num_buckets,
                                                        config.num_attention_heads)}

    def run(self, frozen, hidden, mask):
        attention_mask = bidirectional_mask(frozen.config, hidden, mask)
        bias = mpnet_position_bias(frozen.relative_attention_bias, hidden)
        for layer in frozen.layer.values():
            hidden = layer(hidden, attention_mask, bias)[0]
        return hidden


BERT = Encoder("bert", "transformers.models.bert.modeling_bert", "BertLayer")
ROBERTA = Encoder("roberta", "transformers.models.roberta.modeling_roberta", "RobertaLayer")
XLM_ROBERTA = Encoder("xlm-roberta", "transformers.models.xlm_roberta.modeling_xlm_roberta", "XLMRobertaLayer")
MPNET = MPNet("mpnet", "transformers.models.mpnet.modeling_mpnet", "MPNetLayer", "eager")


class FactsOnly(Family):
    """A family known by its facts alone: stage one and the baselines run it; its layers do not load as FrozenLayers."""

    frozen_layers = False

    def __init__(self, model_types: tuple[str, ...], lora_targets: tuple[str, ...]):
        self.model_types, self.lora_targets = model_types, lora_targets


DISTILBERT = FactsOnly(("distilbert",), ("q_lin", "v_lin"))
