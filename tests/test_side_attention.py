"""LST's side-block attention with dropout on the CPU: recomputed in backward, the same numbers, less memory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cachetune.stages.families.side_block import side_attention


def inputs(kv_heads=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(8, 4, 40, 16, generator=generator, requires_grad=True)
    k = torch.randn(8, kv_heads, 40, 16, generator=generator, requires_grad=True)
    v = torch.randn(8, kv_heads, 40, 16, generator=generator, requires_grad=True)
    allowed = torch.ones(8, 1, 1, 40, dtype=torch.bool)
    allowed[:, :, :, 30:] = False
    return q, k, v, allowed


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["heads", "grouped key/value heads"])
def test_equals_torch_attention_with_the_same_dropout_mask(kv_heads):
    q, k, v, allowed = inputs(kv_heads)
    torch.manual_seed(3)
    ours = side_attention(q, k, v, allowed, 0.2, enable_gqa=kv_heads != 4)
    ours.square().sum().backward()
    ours_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(3)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=0.2, enable_gqa=kv_heads != 4)
    reference.square().sum().backward()
    assert torch.equal(ours, reference)
    for mine, theirs in zip(ours_grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(mine, theirs)


def saved_bytes(attention) -> int:
    """Bytes of the tensors autograd saves for backward in attention()'s forward."""
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        attention()
    return sum(saved)


def test_keeps_no_attention_weights_for_backward():
    q, k, v, allowed = inputs()
    weights = 8 * 4 * 40 * 40 * 4  # [B, heads, T, T] float32
    ours = saved_bytes(lambda: side_attention(q, k, v, allowed, 0.1))
    math = saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=0.1))
    inputs_only = sum(t.untyped_storage().nbytes() for t in (q, k, v))  # held by the layers around it anyway
    assert ours == inputs_only and math >= inputs_only + 2 * weights, (ours, math)
