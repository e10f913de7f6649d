"""synqt: query synthesis with query-only knowledge extraction (SynQT, 2024), for post-LN BERT-like encoders,
pre-LN vision transformers, pre-norm decoder-only LMs (Llama layout, GPT-2) and the T5 encoder.

Per layer i = 1 .. L, n learnable queries are synthesised (an adapter, a small self-attention among the queries)
from their own parameters and the previous layer's query outputs, then sent through frozen layer i: the queries
attend, with the layer's own W_q / W_k / W_v / W_o, to keys and values of the cached H_{i-1}, and pass the
layer's own norms and FFN. Only the n query tokens go through the layer with gradients; the backbone's tokens are
never updated, so H_L is not read (required layers are 0 .. L-1). The pass itself is each family's adapter
(`query_pass` in stages/families/), run through `FrozenLayers.query_pass`.

K and V (W_k H_{i-1}, W_v H_{i-1} over all T tokens) are computed per batch, not cached, under torch.no_grad():
they need no gradient, and caching them in stage one would double the store per layer.

Post-LN encoders (BERT, RoBERTa, XLM-RoBERTa, MPNet): h = W_o Attn(W_q Q, W_k H, W_v H); a = LN_att(Q + h);
hh = FFN(a); Q_i = LN_out(a + hh). MPNet adds a relative position bias to its attention scores; the learnable
queries have no position there, so no bias applies to them and none is added. The head's norm is a trainable
copy of the last layer's output LayerNorm.

Pre-LN vision layers (ViT, DeiT, DINOv2, CLIP/SigLIP towers) do x + Attn(LN1 x) then x + FFN(LN2 x); restricted to
the queries: keys and values from LN1(H_{i-1}) (every token's own LN1, as in the layer), h = W_o Attn(W_q LN1(Q),
K, V) (times LayerScale 1 for DINOv2), a = Q + h, hh = FFN(LN2 a) (times LayerScale 2), Q_i = a + hh. The final
norm lies outside the layers and is not loaded, so the head's norm is a fresh trainable LayerNorm.

Pre-norm decoders (Llama, Mistral, Qwen2, Gemma-3 text; GPT-2). A decoder layer maps every token t to
x_t + Attn_t(N_1 x) then + MLP(N_2 .), where token t attends causally to tokens <= t with rotary positions. The
query-only pass places the n queries right after each sample's last real token, at positions len, len + 1, ...,
as if appended to the text, and lets each see every real token but not the other queries (nor itself):
    K = rope(W_k N_1(H_{i-1}), 0 .. len-1),  V = W_v N_1(H_{i-1})                (no gradient)
    h = W_o Attn(rope(W_q N_1(Q), len + j), K, V)    grouped key/value heads repeated as the model repeats them
    a = Q + h;  hh = MLP(N_2 a);  Q_i = a + hh
N_1, N_2 are the layer's own RMSNorms (its own input norm on the tokens too, as the layer does), so Q_i is exactly
what the frozen layer outputs at a token appended after the text whose own key is masked out (tested against the
layer run on [tokens; query]). Causality costs nothing: every real token lies before the queries. Sliding-window
layers (Mistral, Gemma-3) keep only keys within the window of the query's position. Gemma-3 adds its per-head
q/k norms and a norm after each branch (h = N(W_o Attn), hh = N(MLP(N a))). GPT-2 has no positions inside its
layers (they are in H_0), so its queries take none. The head's norm is a trainable copy of the model's final norm,
which the last decoder layer's output passes through in the backbone (hidden_states[L] is after it).

Scale: the head reads the normed z through the family's `head_input` (Gemma 3: at unit RMS, since the copied final
norm's gains reach 301 and a fresh head would start with logits of +-20; the identity elsewhere). The queries enter
every layer at their own (unit) scale on every family. Feeding them at the residual stream's scale instead (the
stream's RMS at the last token, ~1,300 deep in Gemma 3 270M) was tried and reverted: a random unit direction at that
scale is a token unlike any the layer saw (Gemma's stream holds ~90% of its energy in one channel), and on 2,000
training rows synqt stopped learning (validation 53% after 60 steps, against 72-75% without it; BENCHMARKS.md,
"Gemma 3 270M").

T5 encoder: the same pre-norm pass with T5's unscaled scores plus its relative position bias for (token position
- query position), the queries again after the last real token.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
import torch
from torch import nn
from torch.nn import functional as F

from cachetune.cache.hidden_states import CachedHiddenStates

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
        self.queries = nn.Parameter(torch.empty(L, config.queries, D).uniform_(-1.0, 1.0))
        self.feature_scale = nn.Parameter(torch.tensor(float(config.feature_scale)))
        self.synthesis = nn.ModuleList(Synthesis(config, D) for _ in range(L))
        # Head over the 3L + 1 features.
        self.feature_norm = nn.LayerNorm(D)
        self.feature_adapter = Adapter(D, config.adapter_dim, config.dropout)
        self.drop_path = config.drop_path
        self.weights = nn.Linear(D, 3 * L)
        self.weights_dropout = nn.Dropout(config.dropout)
        backbone_norm = self.frozen.head_norm()  # the norm after the last layer in the backbone, if it is loaded
        if backbone_norm is None:  # pre-LN vision: the final norm is outside the layers; a fresh trainable one
            self.head_norm = nn.LayerNorm(D, eps=getattr(self.frozen.config, "layer_norm_eps", 1e-6))
        else:
            self.head_norm = copy.deepcopy(backbone_norm).requires_grad_(True)  # a trainable copy
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

    def forward(self, features: CachedHiddenStates | torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features: H_0 .. H_{L-1} [B, L, T, D] (values or CachedHiddenStates), mask [B, T] bool -> logits [B, C].
        Each layer is decoded just in time for its frozen layer's keys and values, which need no gradient."""
        states = CachedHiddenStates.wrap(features, mask)
        B = states.shape[0]
        previous = masked_mean(states.layer(0), mask)  # Q_0: the masked mean of H_0 (our choice)
        qs, hs, hhs = [], [], []
        for i, synthesis in enumerate(self.synthesis):
            seed = self.queries[i].expand(B, -1, -1) + self.feature_scale * previous[:, None]
            q, h, hh = self.frozen.query_pass(i, synthesis(seed), states.layer(i), mask)  # layer i + 1 on H_i
            previous = q.mean(1)
            qs.append(previous)
            hs.append(h.mean(1))
            hhs.append(hh.mean(1))
        z = self.combine(torch.stack([qs[-1], *qs, *hs, *hhs], 1))
        return self.head(self.frozen.head_input(self.head_norm(z)))


register_method(SynQTConfig, SynQT, "SynQT: synthesised queries extract knowledge through the frozen layers' own weights")
