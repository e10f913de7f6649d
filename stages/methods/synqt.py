"""synqt: query synthesis with query-only knowledge extraction (SynQT, 2024), for post-LN BERT-like encoders
and pre-LN vision transformers.

Per layer i = 1 .. L, n learnable queries are synthesised (an adapter, a small self-attention among the queries)
from their own parameters and the previous layer's query outputs, then sent through frozen layer i: the queries
attend, with the layer's own W_q / W_k / W_v / W_o, to keys and values of the cached H_{i-1}, and pass the
layer's own attention LayerNorm, FFN and output LayerNorm. Only the n query tokens go through the layer with
gradients; the backbone's tokens are never updated, so H_L is not read (required layers are 0 .. L-1).

K and V (W_k H_{i-1}, W_v H_{i-1} over all T tokens) are computed per batch, not cached, under torch.no_grad():
they need no gradient, and caching them in stage one would double the store per layer.

Families: BERT, RoBERTa and XLM-RoBERTa (attention.self.query/key/value, attention.output.dense/LayerNorm) and
MPNet (attention.attn.q/k/v/o, attention.LayerNorm). MPNet adds a relative position bias to its attention
scores; the learnable queries have no position, so no bias applies to them and none is added (the shared
relative_attention_bias is loaded with the layers but unused).

Vision families (pre-LN): ViT and DeiT (attention.q_proj/k_proj/v_proj/o_proj, layernorm_before/after, mlp.fc1/fc2),
DINOv2 (the same attention, norm1/norm2, LayerScale after attention and FFN, MLP or SwiGLU FFN) and the CLIP and
SigLIP vision towers (self_attn.q_proj/k_proj/v_proj/out_proj, layer_norm1/2, mlp.fc1/fc2). The layer does
x + Attn(LN1 x) then x + FFN(LN2 x); restricted to the queries that is: keys and values from LN1(H_{i-1}) (every
token's own LN1, as in the layer), h = W_o Attn(W_q LN1(Q), K, V) (times LayerScale 1 for DINOv2), a = Q + h,
hh = FFN(LN2 a) (times LayerScale 2), Q_i = a + hh. A pre-LN layer has no output LayerNorm (the backbone's final
norm lies outside its layers and is not loaded), so the head's norm is a fresh trainable LayerNorm instead of a
copy of the last layer's output norm.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .base import FeatureSpec, MethodConfig
from .registry import register_method
from .support import needs_frozen_layers


@dataclass
class SynQTConfig(MethodConfig):
    method = "synqt"
    queries: int = 4  # n learnable queries per layer (the authors use 1, 4 or 16)
    adapter_dim: int = 48  # bottleneck of the synthesis and head adapters (Ad48)
    attention_adapter_dim: int = 8  # bottleneck of the q/k/v/out adapters of the query self-attention
    feature_scale: float = 0.1  # f: weight of the previous layer's query outputs, shared by all layers
    attention_scale: float = 0.1  # s_a at init, per layer
    ffn_scale: float = 0.1  # s_f at init, per layer
    dropout: float = 0.1
    drop_path: float = 0.3  # on every head feature but the first


class Adapter(nn.Module):
    """Ad_k(x) = x + drop(W_2 drop(GELU(W_1 x))), bottleneck k; PyTorch default init, as the authors. The
    synthesis and head adapters use dropout 0.1, the q/k/v/out adapters of the query self-attention none."""

    def __init__(self, width: int, bottleneck: int, dropout: float = 0.0):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.up(self.dropout(F.gelu(self.down(x)))))


class QueryAttention(nn.Module):
    """Single-head self-attention among the n queries: own LayerNorms, adapters as q/k/v/out, scale D^-1/2."""

    def __init__(self, width: int, bottleneck: int, dropout: float):
        super().__init__()
        self.q_norm, self.kv_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.out = (Adapter(width, bottleneck) for _ in range(4))
        self.attention_dropout, self.dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.scale = width ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, kv = self.q_norm(x), self.kv_norm(x)
        weights = torch.softmax(self.q(q) @ self.k(kv).transpose(-1, -2) * self.scale, dim=-1)
        return self.dropout(self.out(self.attention_dropout(weights) @ self.v(kv)))


class Synthesis(nn.Module):
    """u = Ad48(q + f Q_prev); Q^ = u + s_a Attn(LN_1 u); Q^ += s_f Ad48(LN_2 Q^); dropout."""

    def __init__(self, config: SynQTConfig, width: int):
        super().__init__()
        self.adapter = Adapter(width, config.adapter_dim, config.dropout)
        self.attention_norm = nn.LayerNorm(width)  # the authors' norm1, before the query self-attention
        self.attention = QueryAttention(width, config.attention_adapter_dim, config.dropout)
        self.norm = nn.LayerNorm(width)
        self.ffn = Adapter(width, config.adapter_dim, config.dropout)
        self.attention_scale = nn.Parameter(torch.tensor(float(config.attention_scale)))
        self.ffn_scale = nn.Parameter(torch.tensor(float(config.ffn_scale)))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, seed: torch.Tensor) -> torch.Tensor:
        u = self.adapter(seed)
        u = u + self.attention_scale * self.attention(self.attention_norm(u))
        u = u + self.ffn_scale * self.ffn(self.norm(u))
        return self.dropout(u)


class LayerParts(NamedTuple):
    """The submodules of one frozen layer that knowledge extraction uses.

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


class FFNInput:
    """A vision MLP up to its last dense: act(fc1 x), or SwiGLU silu(gate x) * up x. A plain callable over the
    layer's own MLP (not a module: it owns no weights)."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.mlp, "fc1"):
            return self.mlp.activation_fn(self.mlp.fc1(x))
        return self.mlp.act_fn(self.mlp.gate_proj(x)) * self.mlp.up_proj(x)


def _ffn_output(mlp: nn.Module) -> nn.Linear:
    return mlp.fc2 if hasattr(mlp, "fc2") else mlp.down_proj


def layer_parts(layer: nn.Module) -> LayerParts:
    if hasattr(layer, "layernorm_before"):  # ViT, DeiT
        heads = layer.attention
        return LayerParts(heads.q_proj, heads.k_proj, heads.v_proj, heads.o_proj, layer.layernorm_before,
                          FFNInput(layer.mlp), _ffn_output(layer.mlp), layer.layernorm_after, True)
    if hasattr(layer, "norm1") and hasattr(layer, "layer_scale1"):  # DINOv2
        heads = layer.attention
        return LayerParts(heads.q_proj, heads.k_proj, heads.v_proj, heads.o_proj, layer.norm1, FFNInput(layer.mlp),
                          _ffn_output(layer.mlp), layer.norm2, True, layer.layer_scale1, layer.layer_scale2)
    if hasattr(layer, "self_attn") and hasattr(layer, "layer_norm1"):  # CLIP, SigLIP vision towers
        heads = layer.self_attn
        return LayerParts(heads.q_proj, heads.k_proj, heads.v_proj, heads.out_proj, layer.layer_norm1,
                          FFNInput(layer.mlp), _ffn_output(layer.mlp), layer.layer_norm2, True)
    attention = getattr(layer, "attention", None)
    if hasattr(attention, "self") and hasattr(attention, "output"):  # BERT, RoBERTa, XLM-RoBERTa
        heads = attention.self
        q, k, v, o, norm = heads.query, heads.key, heads.value, attention.output.dense, attention.output.LayerNorm
    elif hasattr(attention, "attn"):  # MPNet
        heads = attention.attn
        q, k, v, o, norm = heads.q, heads.k, heads.v, heads.o, attention.LayerNorm
    else:
        raise ValueError(f"synqt supports post-LN BERT, RoBERTa, XLM-RoBERTa and MPNet layers and pre-LN ViT, DeiT, "
                         f"DINOv2, CLIP and SigLIP vision layers, not {type(layer).__name__}")
    return LayerParts(q, k, v, o, norm, layer.intermediate, layer.output.dense, layer.output.LayerNorm)


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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _check(config: SynQTConfig) -> None:
    for name in ("queries", "adapter_dim", "attention_adapter_dim"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in ("dropout", "drop_path"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {getattr(config, name)}")


class SynQT(nn.Module):
    supports_backbone = staticmethod(needs_frozen_layers)  # loads every layer: stages/methods/support.py

    def __init__(self, config: SynQTConfig, spec: FeatureSpec):
        super().__init__()
        _check(config)
        self.spec = spec
        D, L = spec.hidden_size, spec.num_layers
        from ..backbone_layers import load_frozen_layers  # imports transformers' model code: only when used

        self.frozen = load_frozen_layers(spec.backbone_path, list(range(1, L + 1)))
        if self.frozen.config.hidden_size != D or self.frozen.config.num_hidden_layers != L:
            raise ValueError(f"backbone at {spec.backbone_path} has {self.frozen.config.num_hidden_layers} layers of "
                             f"width {self.frozen.config.hidden_size}; the features have {L} of width {D}")
        self.heads = self.frozen.config.num_attention_heads
        last = layer_parts(self.frozen.layer[str(L - 1)])  # raises for an unsupported layer layout
        self.queries = nn.Parameter(torch.empty(L, config.queries, D).uniform_(-1.0, 1.0))
        self.feature_scale = nn.Parameter(torch.tensor(float(config.feature_scale)))
        self.synthesis = nn.ModuleList(Synthesis(config, D) for _ in range(L))
        # Head over the 3L + 1 features.
        self.feature_norm = nn.LayerNorm(D)
        self.feature_adapter = Adapter(D, config.adapter_dim, config.dropout)
        self.drop_path = config.drop_path
        self.weights = nn.Linear(D, 3 * L)
        self.weights_dropout = nn.Dropout(config.dropout)
        if last.pre_norm:  # no output norm inside a pre-LN layer: a fresh trainable one
            self.head_norm = nn.LayerNorm(D, eps=getattr(self.frozen.config, "layer_norm_eps", 1e-6))
        else:
            self.head_norm = copy.deepcopy(last.output_norm).requires_grad_(True)  # a trainable copy
        self.head = nn.Linear(D, spec.num_labels)

    @staticmethod
    def required_layers(config: SynQTConfig, spec: FeatureSpec) -> list[int]:
        _check(config)
        return list(range(spec.num_layers))  # H_0 .. H_{L-1}; H_L is not read

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """[B, 3L+1, D] -> z [B, D]: shared adapter, DropPath on all but the first, tanh-gated mean."""
        features = features + self.feature_adapter(self.feature_norm(features))
        if self.training and self.drop_path > 0:
            B, J, _ = features.shape
            keep = torch.ones(B, J, 1, dtype=features.dtype, device=features.device)
            keep[:, 1:] = torch.bernoulli(torch.full((B, J - 1, 1), 1.0 - self.drop_path, device=features.device))
            keep[:, 1:] /= 1.0 - self.drop_path
            features = features * keep
        weights = torch.tanh(self.weights_dropout(F.gelu(self.weights(features[:, 0]))))  # [B, 3L]
        weights = torch.cat([torch.ones_like(weights[:, :1]), weights], 1)
        return (weights.unsqueeze(-1) * features).mean(1)

    def frozen_parts(self) -> list[LayerParts]:
        """The frozen layers' submodules, looked up each call so they always follow `frozen`."""
        return [layer_parts(self.frozen.layer[str(i)]) for i in range(self.spec.num_layers)]

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B = features.shape[0]
        previous = masked_mean(features[:, 0], mask)  # Q_0: the masked mean of H_0 (our choice)
        qs, hs, hhs = [], [], []
        for i, (parts, synthesis) in enumerate(zip(self.frozen_parts(), self.synthesis)):
            hidden = features[:, i]  # H_{i}, the input of layer i + 1
            T, D = hidden.shape[1:]
            with torch.no_grad():  # K, V per batch, not cached; no gradient needed
                source = key_value_input(parts, hidden)
                keys = parts.key(source).view(B, T, self.heads, D // self.heads).transpose(1, 2)
                values = parts.value(source).view(B, T, self.heads, D // self.heads).transpose(1, 2)
            seed = self.queries[i].expand(B, -1, -1) + self.feature_scale * previous[:, None]
            q, h, hh = extract(parts, synthesis(seed), keys, values, mask, self.heads)
            previous = q.mean(1)
            qs.append(previous)
            hs.append(h.mean(1))
            hhs.append(hh.mean(1))
        z = self.combine(torch.stack([qs[-1], *qs, *hs, *hhs], 1))
        return self.head(self.head_norm(z))


register_method(SynQTConfig, SynQT, "SynQT: synthesised queries extract knowledge through the frozen layers' own weights")
