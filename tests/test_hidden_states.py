"""Batches stay in the store's encoding until a method uses a layer: the fused decode-and-project against the float32
reference (outputs and weight gradients), on fp8, int8 and float16 encodings, and every method on one batch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cachetune.cache.encoding import Decoder, Encoding
from cachetune.cache.hidden_states import CachedHiddenStates
from cachetune.stages.methods.base import rms_normalize
from cachetune.stages.methods.decode_linear import decode_linear


def per_layer_linear(x: torch.Tensor, linears) -> torch.Tensor:
    """The float32 reference the methods used before: [B, n, T, D] through linears[l] per slice, one einsum."""
    out = torch.einsum("bntd,nhd->bnth", x, torch.stack([linear.weight for linear in linears]))
    return out + torch.stack([linear.bias for linear in linears])[:, None, :]


def encoded_batch(dtype: str, seed: int = 0) -> CachedHiddenStates:
    """[3, 4, 6, 130] hidden states (a width that is not a multiple of 64) with a massive channel, as `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(3, 4, 6, 130, generator=generator) * 3
    values[:, :, 0, 7] = 900.0  # an attention-sink-like outlier on the first token
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5]).bool()
    return CachedHiddenStates.encode(values, mask, dtype)


@pytest.mark.parametrize("dtype", ["fp8", "int8", "float16"])
@pytest.mark.parametrize("normalize", [False, True])
def test_decode_linear_matches_the_float32_reference(dtype, normalize):
    states = encoded_batch(dtype)
    torch.manual_seed(1)
    fused, plain = nn.ModuleList(nn.Linear(130, 16) for _ in range(3)), nn.ModuleList(nn.Linear(130, 16) for _ in range(3))
    plain.load_state_dict(fused.state_dict())
    dense = states.dense()  # the old path: every layer widened to float32 at once
    assert not dense[1, :, 4:].any() and not dense[2, :, 1:].any()  # padded positions decode to zeros
    reference_input = rms_normalize(dense[:, 1:]) if normalize else dense[:, 1:]
    reference = per_layer_linear(reference_input, plain)
    out = decode_linear(states, fused, [1, 2, 3], normalize=normalize)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-4)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (reference * upstream).sum().backward()
    for ours, theirs in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-3)


def test_decode_linear_saves_no_float32_copy():
    """What autograd keeps for backward is the codes (uint8), not the decoded float32 layers."""
    states = encoded_batch("fp8")
    linears = nn.ModuleList(nn.Linear(130, 16) for _ in range(4))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        decode_linear(states, linears).sum().backward()
    assert not any(t.dtype == torch.float32 and t.shape[-1] == 130 and t.dim() >= 3 for t in saved)


def test_layers_decode_one_at_a_time_like_the_decoder():
    states = encoded_batch("int8")
    everything = Decoder(Encoding("int8"), {}, list(range(4))).decode(states.codes, states.scales, states.mask)
    torch.testing.assert_close(states.dense(), everything)
    chosen = states.select([3, 1])
    torch.testing.assert_close(chosen.layer(0), everything[:, 3])
    torch.testing.assert_close(chosen.layer(-1), everything[:, 1])


@pytest.mark.parametrize("method", ["linear", "lst", "unipt", "utuning", "sherl", "synqt"])
def test_methods_give_the_same_logits_and_gradients_on_codes_and_on_float32(method, tmp_path):
    """Every method, fed an 8-bit batch or its float32 decoding, gives the same logits and weight gradients."""
    from transformers import BertConfig, BertModel

    from cachetune.stages.methods import FeatureSpec, build_model, config_from_options, get_method

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                         vocab_size=100)).save_pretrained(tmp_path)  # frozen layers for sherl and synqt
    spec = FeatureSpec(hidden_size=64, num_layers=4, num_labels=3, pooling="mean", backbone_path=str(tmp_path),
                       cached_layers=tuple(range(5)))
    options = {"linear": {}, "unipt": {}, "utuning": {}, "synqt": {"drop_path": "0"}}.get(method, {})
    config = config_from_options(method, {**options, **({} if method in ("unipt", "utuning") else {"dropout": "0"})})
    layers = get_method(method).model_class.required_layers(config, spec)
    values = torch.randn(5, len(layers), 7, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[1, 5:] = mask[3, 2:] = False
    states = CachedHiddenStates.encode(values, mask, "fp8")
    model = build_model(config, spec).eval()
    results = []
    for features in (states, states.dense()):
        model.zero_grad()
        logits = model(features, mask)
        logits.square().sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (ours, our_grads), (theirs, their_grads) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert len(our_grads) == len(their_grads) > 0
    for mine, reference in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)
