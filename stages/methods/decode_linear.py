"""Decode-and-project: a side network's first linear layer on cached hidden states, without float32 copies.

y_l = N(x_l) W_l^T + b_l for each selected layer l, where x_l is layer l decoded from its codes and N is the
identity or RMS normalisation (base.rms_normalize; both parameter-free). The cache is data, so no gradient flows
to x: backward needs only dL/dW_l = sum over (b, t) of dy_l^T N(x_l) and dL/db_l = sum of dy_l. Plain autograd
would keep every N(x_l) in float32 (4 bytes per value) until backward; this function keeps the codes (1 byte per
value on an 8-bit store, already alive as the batch) and decodes each layer again in backward, one at a time.
The cost is a second decode per layer: an element-wise product, small beside the two matmuls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cachetune.cache.hidden_states import CachedHiddenStates

from .base import rms_normalize


def _decoded(states: CachedHiddenStates, k: int, normalize: bool) -> torch.Tensor:
    x = states.layer(k)
    return rms_normalize(x) if normalize else x


class _DecodeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, states, slots, normalize, decoded):
        # Under autocast F.linear computes in the autocast dtype, as an nn.Linear would; backward repeats that dtype.
        outputs = [F.linear(decoded[k] if k in decoded else _decoded(states, k, normalize), weight[i],
                            None if bias is None else bias[i]) for i, k in enumerate(slots)]
        out = torch.stack(outputs, 1)  # [B, n, T, h]
        ctx.states, ctx.slots, ctx.normalize, ctx.has_bias = states, slots, normalize, bias is not None
        ctx.weight_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        states, slots = ctx.states, ctx.slots
        n, h = grad.shape[1], grad.shape[-1]
        grad_bias = None
        rows = []
        for i, k in enumerate(slots):
            x = _decoded(states, k, ctx.normalize).to(grad.dtype)  # [B, T, D]
            g = grad[:, i]  # [B, T, h]
            rows.append((g.reshape(-1, h).t() @ x.reshape(-1, x.shape[-1])).to(ctx.weight_dtype))
        grad_weight = torch.stack(rows)  # [n, h, D]
        if ctx.has_bias:
            grad_bias = grad.sum((0, 2)).to(ctx.weight_dtype).view(n, h)
        return grad_weight, grad_bias, None, None, None, None


def decode_linear(states: CachedHiddenStates, linears, slots=None, normalize: bool = False,
                  decoded: dict | None = None) -> torch.Tensor:
    """[B, n, T, h]: layer slot slots[l] of `states` decoded (and RMS-normalised when `normalize`) through
    linears[l] (nn.Linear D -> h, one per slot, all of one shape), for every l; slots default to all K.
    decoded: {slot: that layer already decoded (and normalised) [B, T, D]}, which the caller also uses (a residual
    term), so the forward pass does not decode it again; backward decodes it again all the same.

    Gradients reach the linears' weights and biases only (the cache is data). Saved for backward: nothing beyond
    the batch's own codes. Raises ValueError when len(linears) != len(slots).
    """
    slots = tuple(range(states.num_layers) if slots is None else (range(states.num_layers)[k] for k in slots))
    if len(slots) != len(linears):
        raise ValueError(f"{len(linears)} linear layers for {len(slots)} cached layers")
    weight = torch.stack([linear.weight for linear in linears])  # [n, h, D]
    bias = torch.stack([linear.bias for linear in linears]) if linears[0].bias is not None else None
    return _DecodeLinear.apply(weight, bias, states, slots, normalize, decoded or {})
