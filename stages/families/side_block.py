"""LST side blocks of pre-norm families, shrunk by r: one class, set up by each family's adapter.

    x = x + drop(W_o Attn(Norm_1 x))        attention: causal or not, rotary or not, grouped key/value heads
    x = x + drop(FFN(Norm_2 x))             FFN: W_down (act(W_gate x) * W_up x) (gated) or W_2 act(W_1 x)

Llama layout (Llama, Mistral, Qwen2, Gemma-3): RMSNorm, rotary, causal, gated; GPT-2: LayerNorm, no rotary
(its learned positions are already in H_0, which feeds the ladder), causal, plain GELU FFN; T5 encoder: RMSNorm,
bidirectional, its own FFN kind. Padded keys are always masked; a causal block also masks future keys.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


def side_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, dropout: float,
                   enable_gqa: bool = False) -> torch.Tensor:
    """dropout(softmax(q k^T / sqrt(d), over the `allowed` keys)) v: torch's scaled_dot_product_attention.

    q [B, heads, T, d], k and v [B, kv_heads, T, d], allowed: bool, broadcastable to [B, heads, T, T]; dropout: the
    probability applied to the attention weights (pass 0 outside training). Returns [B, heads, T, d].
    With dropout on the CPU torch runs its math kernel, which keeps the [B, heads, T, T] weights and their dropout
    mask for backward (47 of LST's 108 MB step on the main job); there the attention is recomputed in backward
    instead (torch.utils.checkpoint restores the random state: the same mask, the same numbers). The fused kernels
    (on the CPU without dropout, on a GPU with it) keep no weights."""
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, enable_gqa=enable_gqa)

    if dropout > 0 and torch.is_grad_enabled() and not q.is_cuda:
        return checkpoint(attend, q, k, v, use_reentrant=False)
    return attend(q, k, v)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w (Zhang & Sennrich 2019), as Llama's and T5's norms."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (Su et al. 2021) in the Llama (half-split) arrangement: x [B, heads, T, d], positions [B, T]."""
    d = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # angles in float32 at least, as Llama
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=dtype) / d))
    angles = positions[:, None, :, None].to(dtype) * inv_freq  # [B, 1, T, d/2]
    angles = torch.cat([angles, angles], -1)
    return x * angles.cos().to(x.dtype) + rotate_half(x) * angles.sin().to(x.dtype)


def side_heads(width: int, heads: int, kv_heads: int, even_head_dim: bool) -> tuple[int, int]:
    """The backbone's (heads, key/value heads) where they fit the side width, else the largest smaller counts
    that do: heads divides width (with an even head width for rotary), key/value heads divides heads."""
    while heads > 1 and (width % heads or (even_head_dim and (width // heads) % 2)):
        heads -= 1
    kv_heads = max(1, min(kv_heads, heads))
    while heads % kv_heads:
        kv_heads -= 1
    return heads, kv_heads


class PreNormSideBlock(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, ffn: int, dropout: float, eps: float, *,
                 rms: bool = True, causal: bool = True, rope_theta: float | None = 10000.0, gated: bool = True,
                 act: str = "silu"):
        super().__init__()
        from transformers.activations import ACT2FN

        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.causal, self.rope_theta = causal, rope_theta
        norm = (lambda: RMSNorm(width, eps)) if rms else (lambda: nn.LayerNorm(width, eps=eps))
        self.norm1, self.norm2 = norm(), norm()
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(width, width)
        self.gate = nn.Linear(width, ffn) if gated else None
        self.up, self.down = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.act = ACT2FN[act]
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from .base import key_positions

        B, T, H = x.shape
        y = self.norm1(x)
        q = self.q(y).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(y).view(B, T, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope_theta is not None:
            positions = key_positions(mask)
            q, k = rotary(q, positions, self.rope_theta), rotary(k, positions, self.rope_theta)
        allowed = mask[:, None, None, :]  # [B, 1, 1, T]: real keys
        if self.causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # A padded query row whose keys are all masked (left padding, causal) would be NaN: let it see itself.
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=x.device)
        attended = side_attention(q, k, v, allowed, self.attention_dropout if self.training else 0.0,
                                  enable_gqa=self.kv_heads != self.heads)
        x = x + self.dropout(self.out(attended.transpose(1, 2).reshape(B, T, H)))
        y = self.norm2(x)
        hidden = self.act(self.gate(y)) * self.up(y) if self.gate is not None else self.act(self.up(y))
        return x + self.dropout(self.down(hidden))
