"""sherl: SHERL (ECCV 2024), BERT-encoder form.

Early route: merge the early layers' features with redundancy-aware weights guided by the last early layer.
Late route: run the backbone's last k layers, frozen, on the merged features; gradients flow through them.

Side width: the authors' BERT form (VSE-infinity's text encoder) uses h = embed_size / downsample_factor =
1024 / 2, halving the 1024-wide joint embedding it projects into. Without a joint space here, the default halves
the backbone's own width instead: r = 2, h = D / 2 (384 on a BERT-base-sized model, 192 on MiniLM).

Families whose adapter gives a `stream_scale` (Gemma 3): Out's LayerNorm gives E' unit scale, right for a post-LN
encoder's layer input, but a Gemma 3 layer adds its branches to a raw residual stream at per-token RMS ~1,350
(H_17 of the real 270M), so E' = Out(ê) * rms(H_{L-1}) + tanh(γ / 0.1) H_{L-1} there, and the head reads the pooled
output through the family's `head_input` (unit RMS). Measured: BENCHMARKS.md, "Gemma 3 270M".

Decoder backbones: `rms_norm=true` (default off) puts every cached layer at unit RMS per token first, against the
massive activations of decoders' residual streams; what it was measured to do: `base.rms_normalize`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from cachetune.cache.hidden_states import CachedHiddenStates

from .base import FeatureSpec, MethodConfig, per_layer_norm, pool, rms_normalize, side_width
from .decode_linear import decode_linear
from .registry import register_method
from .support import needs_frozen_layers

TRANSFORMS = ("linear_ln", "gated")


@dataclass
class SHERLConfig(MethodConfig):
    method = "sherl"
    r: int = 2  # reduction factor: side width h = D / r (the authors' BERT form halves its width; see above)
    transform: str = "linear_ln"  # per-layer transform: "linear_ln" (BERT form) or "gated" (T5 form)
    late_layers: int = 1  # k: the last k pretrained layers run frozen in the late route
    dropout: float = 0.1
    rms_norm: bool = False  # normalise the early layers to unit RMS before their transforms (the late layer still
    # gets the raw H_{L-1} through the gate); see base.rms_normalize


class GatedTransform(nn.Module):
    """T5 form: u = ReLU(W_1 x); (W_2 u + u) * sigmoid(W_3 u)."""

    def __init__(self, d_in: int, h: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d_in, h), nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.relu(self.w1(x))
        return (self.w2(u) + u) * torch.sigmoid(self.w3(u))


def _check(config: SHERLConfig, spec: FeatureSpec) -> None:
    if config.transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {config.transform!r}")
    if not 1 <= config.late_layers <= spec.num_layers - 1:
        raise ValueError(f"late_layers must lie in 1..{spec.num_layers - 1}, got {config.late_layers}")
    side_width(spec.hidden_size, config.r)


class SHERL(nn.Module):
    supports_backbone = staticmethod(needs_frozen_layers)  # loads the last layer(s): stages/methods/support.py

    def __init__(self, config: SHERLConfig, spec: FeatureSpec):
        super().__init__()
        _check(config, spec)
        self.spec = spec
        self.rms_norm = config.rms_norm
        D, h = spec.hidden_size, spec.hidden_size // config.r
        early = spec.num_layers - config.late_layers + 1  # H_0 .. H_{L-k}
        if config.transform == "linear_ln":
            self.transforms = nn.ModuleList(nn.Sequential(nn.Linear(D, h), nn.LayerNorm(h)) for _ in range(early))
        else:
            self.transforms = nn.ModuleList(GatedTransform(D, h) for _ in range(early))
        self.score = nn.Linear(h, 1)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(h, D), nn.LayerNorm(D, eps=1e-12), nn.Dropout(config.dropout))
        self.gate = nn.Parameter(torch.zeros(()))  # gamma; tanh(gamma / 0.1) = 0 at init
        late = list(range(spec.num_layers - config.late_layers + 1, spec.num_layers + 1))
        from ..backbone_layers import load_frozen_layers  # imports transformers' model code: only when used

        self.frozen = load_frozen_layers(spec.backbone_path, late)
        self.head = nn.Linear(D, spec.num_labels)

    @staticmethod
    def required_layers(config: SHERLConfig, spec: FeatureSpec) -> list[int]:
        _check(config, spec)
        return list(range(spec.num_layers - config.late_layers + 1))

    def merge(self, states: CachedHiddenStates, last: torch.Tensor) -> torch.Tensor:
        """Early route: n cached layers [B, n, T, D] -> merged side features [B, T, h], token by token. last: the
        last of them decoded [B, T, D], which forward needs too (decoded once)."""
        decoded = {} if self.rms_norm else {states.num_layers - 1: last}
        if isinstance(self.transforms[0], GatedTransform):
            layer = lambda l: decoded[l] if l in decoded else (  # noqa: E731
                rms_normalize(states.layer(l)) if self.rms_norm else states.layer(l))
            z = torch.stack([transform(layer(l)) for l, transform in enumerate(self.transforms)], 2)
        else:  # z_l = LN(W_l H_l) for every l, decoded layer by layer (no float32 copy kept for backward)
            z = per_layer_norm(decode_linear(states, [t[0] for t in self.transforms], None, self.rms_norm, decoded),
                               [t[1] for t in self.transforms]).transpose(1, 2)  # [B, T, n, h]
        s, guide = z[:, :, :-1], z[:, :, -1]
        unit = F.normalize(s, dim=-1, eps=1e-6)
        cosine = unit @ unit.transpose(-1, -2)  # [B, T, n-1, n-1]
        eye = torch.eye(cosine.shape[-1], dtype=torch.bool, device=cosine.device)
        redundancy = F.relu(cosine.masked_fill(eye, 1.0)).sum(-1)  # self-term is 1 even for a zero vector
        scores = F.relu(self.score(s * guide.unsqueeze(2)).squeeze(-1)) / redundancy
        weights = scores / (scores.sum(-1, keepdim=True) + 1e-6)
        return (weights.unsqueeze(-1) * s).sum(2) + guide

    def forward(self, features: CachedHiddenStates | torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features: H_0 .. H_{L-k} [B, L-k+1, T, D] (values or CachedHiddenStates), mask [B, T] bool -> logits [B, C]."""
        states = CachedHiddenStates.wrap(features, mask)
        last = states.layer(-1)  # H_{L-k}: the gate's input, and the merge's guide
        restored = self.out(self.merge(states, last))
        scale = self.frozen.stream_scale(last)  # Gemma 3: at the residual stream's own scale
        if scale is not None:
            restored = restored * scale
        restored = restored + torch.tanh(self.gate / 0.1) * last
        return self.head(self.frozen.head_input(pool(self.frozen(restored, mask), mask, self.spec.pooling)))


register_method(SHERLConfig, SHERL, "SHERL: redundancy-aware merge of early layers, then the frozen last layer(s)")
