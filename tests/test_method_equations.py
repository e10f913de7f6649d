"""Each side network's logits against its METHODS.md equations, written out by hand in this file.

The shape/masking/learning tests elsewhere would pass a UniPT without its identity term, a SHERL without the
redundancy division, an LST with the gate after the side block or a wrong U-Tuning recurrence. Here each model
gets small seeded random weights (gates and scalars away from their init, so every term matters), runs in eval
mode in float64, and its logits are compared with an expected value computed step by step from the equations
with plain torch ops on the model's own parameter tensors -- never through the model's submodules or helpers.
The frozen BERT layers of SHERL and SynQT are recomputed by hand too (checked against the backbone's own
hidden states).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch
from torch.nn import functional as F
from transformers import BertConfig, BertModel

from cachetune.stages.methods import FeatureSpec, build_model, config_from_options

D = 16  # backbone width
HEADS = 2  # the tiny BERT's attention heads
FFN = 32  # the tiny BERT's intermediate size
BERT_EPS = 1e-12  # the tiny BERT's layer_norm_eps (BertConfig's default)
B, T = 2, 5
LENGTHS = (5, 3)  # the second sequence has two padded tokens
RTOL, ATOL = 1e-9, 1e-10


# ---------------------------------------------------------------------------------------------------------------
# Shared fixtures and plain-torch helpers


def token_mask() -> torch.Tensor:
    return torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]


def write_bert(folder, layers: int, seed: int = 0):
    """A tiny random BERT (larger init than BERT's 0.02, so attention is far from uniform) and its hidden states."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=D, num_hidden_layers=layers, num_attention_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=16, initializer_range=0.3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    backbone = BertModel(config).eval()
    backbone.save_pretrained(folder)
    mask = token_mask()
    ids = torch.randint(5, 40, (B, T))
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    return torch.stack(hidden, 1).double(), mask  # [B, L+1, T, D]


def make_spec(layers: int, folder="", pooling="mean", num_labels=3) -> FeatureSpec:
    return FeatureSpec(hidden_size=D, num_layers=layers, num_labels=num_labels, pooling=pooling,
                       backbone_path=str(folder), cached_layers=tuple(range(layers + 1)))


def randomize(model: torch.nn.Module, seed: int, skip=("frozen.",)) -> torch.nn.Module:
    """Seeded random values for every trainable parameter (LayerNorm weights around 1); float64, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(skip):
                continue
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if "norm" in name.lower() and name.endswith("weight"):
                parameter.copy_(1.0 + 0.3 * noise)
            else:
                parameter.copy_(0.5 * noise)
    return model.double().eval()


def lin(x, linear):
    """W x + b with a Linear module's own parameter tensors."""
    return F.linear(x, linear.weight, linear.bias)


def ln(x, norm):
    """LayerNorm with a LayerNorm module's own parameter tensors and eps."""
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def masked_mean(x, mask):
    """[B, T, d] -> [B, d] over real tokens."""
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1)


def pool(x, mask, mode):
    return x[:, 0] if mode == "cls" else masked_mean(x, mask)


def attention(q, k, v, key_mask, heads, scale=None):
    """Multi-head scaled dot-product attention by hand: q [B, n, d], k, v [B, T, d], padded keys masked out."""
    Bq, n, width = q.shape
    dh = width // heads
    scale = dh ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for b in range(Bq):
        for head in range(heads):
            cols = slice(head * dh, (head + 1) * dh)
            scores = (q[b, :, cols] @ k[b, :, cols].T) * scale  # [n, T]
            scores = scores.masked_fill(~key_mask[b][None, :], float("-inf"))
            out[b, :, cols] = torch.softmax(scores, -1) @ v[b, :, cols]
    return out


def bert_layer(layer, x, key_mask, queries=None):
    """A post-LN BERT layer by hand from its weights. With `queries`, only they are updated (SynQT's extraction):
    returns (output, h, hh); without, every token of x is (SHERL's late route)."""
    self_attention, out_dense = layer.attention.self, layer.attention.output.dense
    target = x if queries is None else queries
    h = lin(attention(lin(target, self_attention.query), lin(x, self_attention.key), lin(x, self_attention.value),
                      key_mask, HEADS), out_dense)
    a = ln(target + h, layer.attention.output.LayerNorm)
    hh = lin(F.gelu(lin(a, layer.intermediate.dense)), layer.output.dense)
    return ln(a + hh, layer.output.LayerNorm), h, hh


# ---------------------------------------------------------------------------------------------------------------
# UniPT


def expected_unipt(model, features, mask):
    L = model.spec.num_layers
    # T_l = LN(W_l H_l), l = 0..L; anchor A = T_L.
    t = [ln(lin(features[:, l], model.project[l]), model.norms[l]) for l in range(L + 1)]
    A = t[L]
    key = mask.to(A.dtype)[:, None, :]  # [B, 1, T]: zero the padded keys
    M, c = [], []
    for l in range(L):
        scores = torch.relu((A @ t[l].transpose(1, 2)) * key)  # [B, T, T], no softmax, no 1/sqrt(d)
        rows = scores / scores.sum(-1, keepdim=True).clamp_min(1e-8)  # l1 rows, eps 1e-8
        M.append(rows @ t[l] + t[l])  # (R + I) T_l
        c.append(lin(masked_mean(A, mask) * masked_mean(t[l], mask), model.confidence)[:, 0])
    alpha = torch.softmax(torch.stack(c, 1), 1)  # [B, L], softmax over l
    mixed = sum(alpha[:, l, None, None] * M[l] for l in range(L))
    Y = A + ln(lin(mixed, model.fuse), model.fuse_norm)
    return lin(pool(lin(torch.relu(Y), model.up), mask, model.spec.pooling), model.head)


def unipt_case(model_class=None, layers=3):
    torch.manual_seed(10)
    spec = make_spec(layers)
    config = config_from_options("unipt", {"r": "2"})
    model = build_model(config, spec) if model_class is None else model_class(config, spec)
    randomize(model, seed=11)
    assert type(model).required_layers(config, spec) == list(range(layers + 1))
    features = torch.randn(B, layers + 1, T, D, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    return model, features, token_mask()


def check_unipt(model_class=None):
    model, features, mask = unipt_case(model_class)
    with torch.no_grad():
        torch.testing.assert_close(model(features, mask), expected_unipt(model, features, mask), rtol=RTOL, atol=ATOL)


def test_unipt_matches_equations():
    check_unipt()


# ---------------------------------------------------------------------------------------------------------------
# SHERL (BERT form, k = 1). L = 4 so there are three non-guide layers: with only two, both share one redundancy
# value and dividing by it cancels in the l1 normalisation, so a missing division would go unnoticed.

SHERL_LAYERS = 4


def expected_sherl(model, features, mask):
    L = model.spec.num_layers
    # z_l = LN(W_l H_l), l = 0..L-1; guide g = z_{L-1}, the others s_0..s_{L-2}.
    z = [ln(lin(features[:, l], model.transforms[l][0]), model.transforms[l][1]) for l in range(L)]
    g, s = z[L - 1], z[: L - 1]
    n = len(s)
    merged = torch.empty_like(g)
    for b in range(B):
        for tok in range(T):  # token by token, no mask
            vectors = [s[l][b, tok] for l in range(n)]
            norms = [v.norm().clamp_min(1e-6) for v in vectors]
            rho = []
            for l in range(n):
                total = torch.zeros((), dtype=g.dtype)
                for other in range(n):
                    cosine = 1.0 if other == l else (vectors[l] @ vectors[other]) / (norms[l] * norms[other])
                    total = total + torch.relu(torch.as_tensor(cosine, dtype=g.dtype))
                rho.append(total)
            score = [torch.relu(vectors[l] * g[b, tok] @ model.score.weight[0] + model.score.bias[0]) / rho[l]
                     for l in range(n)]
            denominator = sum(score) + 1e-6
            merged[b, tok] = sum((score[l] / denominator) * vectors[l] for l in range(n)) + g[b, tok]
    # E' = Out(e) + tanh(gamma / 0.1) H_{L-1}; Out = ReLU -> Linear -> LayerNorm(eps 1e-12) (-> Dropout, off).
    out_linear, out_norm = model.out[1], model.out[2]
    restored = F.layer_norm(lin(torch.relu(merged), out_linear), (D,), out_norm.weight, out_norm.bias, 1e-12)
    restored = restored + torch.tanh(model.gate / 0.1) * features[:, L - 1]
    late, _, _ = bert_layer(model.frozen.layer[str(L - 1)], restored, mask)  # layer L, frozen
    return lin(pool(late, mask, model.spec.pooling), model.head)


def assert_hand_layer_reproduces(model, hidden, mask, layer: int):
    """The hand-written BERT layer, on the model's frozen copy of backbone layer `layer`, maps H_{layer-1} to the
    backbone's own H_layer at real tokens: the hand computation is checked before it checks the method."""
    with torch.no_grad():
        again, _, _ = bert_layer(model.frozen.layer[str(layer - 1)], hidden[:, layer - 1], mask)
    real = mask[:, :, None].expand_as(again)
    torch.testing.assert_close(again[real], hidden[:, layer][real], rtol=1e-6, atol=1e-5)


def sherl_case(folder, model_class=None):
    hidden, mask = write_bert(folder, SHERL_LAYERS, seed=20)
    spec = make_spec(SHERL_LAYERS, folder)
    config = config_from_options("sherl", {"r": "2"})
    model = build_model(config, spec) if model_class is None else model_class(config, spec)
    randomize(model, seed=21)
    with torch.no_grad():
        model.gate.fill_(0.07)  # tanh(0.7): the H_{L-1} term counts, but does not swamp Out(e)
        model.score.bias.fill_(1.0)  # most scores positive, so several layers mix and redundancy matters
    layers = type(model).required_layers(config, spec)
    assert layers == list(range(SHERL_LAYERS))  # H_0 .. H_{L-1}; H_L is never read
    with torch.no_grad():  # the case must exercise the weights: most tokens mix two or more layers
        z = [ln(lin(hidden[:, l], model.transforms[l][0]), model.transforms[l][1]) for l in range(SHERL_LAYERS)]
        scores = torch.stack([lin(z[l] * z[-1], model.score)[..., 0] for l in range(SHERL_LAYERS - 1)], -1)
    assert ((scores > 0).sum(-1) >= 2).sum() >= B * T // 2
    # The hand-written frozen layer reproduces the backbone: layer L on H_{L-1} gives H_L.
    assert_hand_layer_reproduces(model, hidden, mask, SHERL_LAYERS)
    return model, hidden[:, layers], mask


def check_sherl(folder, model_class=None):
    model, features, mask = sherl_case(folder, model_class)
    with torch.no_grad():
        torch.testing.assert_close(model(features, mask), expected_sherl(model, features, mask), rtol=RTOL, atol=ATOL)


def test_sherl_matches_equations(tmp_path):
    check_sherl(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# LST


def lst_layers(num_layers, drop_every=4):
    """From METHODS.md: blocks i = 0..L-1, every 4th from 0 dropped; kept block i feeds its output H_{i+1}."""
    return [i + 1 for i in range(num_layers) if i % drop_every != 0]


def expected_lst(model, features, mask, heads):
    """features [B, 1 + kept, T, D] = H_0, then the kept blocks' outputs in order."""
    s = lin(features[:, 0], model.first)  # s_0 = W_first H_0 (dropout off)
    h = s.shape[-1]
    for k in range(features.shape[1] - 1):
        mu = torch.sigmoid(model.gates[k] / 0.1)
        s = mu * s + (1 - mu) * lin(features[:, k + 1], model.down[k])  # gate first ...
        block = model.blocks[k]  # ... THEN the side block: post-LN, width h
        qkv = lin(s, block.qkv)
        q, key, v = qkv[..., :h], qkv[..., h:2 * h], qkv[..., 2 * h:]
        s = ln(s + lin(attention(q, key, v, mask, heads), block.out), block.norm1)
        s = ln(s + lin(F.gelu(lin(s, block.ffn[0])), block.ffn[2]), block.norm2)
    s = lin(ln(s, model.final_norm), model.up)
    return lin(pool(s, mask, model.spec.pooling), model.head)


def lst_case(folder, model_class=None, layers=4, pooling="mean"):
    """The BERT folder sets the side blocks' shape: HEADS heads (they divide h = 8), ffn FFN / r."""
    torch.manual_seed(30)
    if folder:
        write_bert(folder, layers, seed=30)
    spec = make_spec(layers, folder, pooling=pooling)
    config = config_from_options("lst", {"r": "2"})
    model = build_model(config, spec) if model_class is None else model_class(config, spec)
    randomize(model, seed=31)
    kept = lst_layers(layers)
    with torch.no_grad():  # gates well away from 0.5 and from each other
        model.gates.copy_(torch.linspace(-0.15, 0.2, len(kept), dtype=torch.float64))
    assert type(model).required_layers(config, spec) == [0, *kept]
    features = torch.randn(B, 1 + len(kept), T, D, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    return model, features, token_mask()


def check_lst(folder, model_class=None):
    model, features, mask = lst_case(folder, model_class)
    assert model.blocks[0].ffn[0].out_features == FFN // 2
    with torch.no_grad():
        expected = expected_lst(model, features, mask, heads=HEADS)
        torch.testing.assert_close(model(features, mask), expected, rtol=RTOL, atol=ATOL)


def test_lst_matches_equations(tmp_path):
    check_lst(tmp_path)


def test_lst_12_layers_reads_the_last_output():
    assert lst_layers(12) == [2, 3, 4, 6, 7, 8, 10, 11, 12]
    model, features, mask = lst_case("", layers=12, pooling="cls")  # no config.json: 4 heads, ffn 4D / r
    config = config_from_options("lst", {"r": "2"})
    assert type(model).required_layers(config, model.spec) == [0, 2, 3, 4, 6, 7, 8, 10, 11, 12]
    with torch.no_grad():
        logits = model(features, mask)
        torch.testing.assert_close(logits, expected_lst(model, features, mask, heads=4), rtol=RTOL, atol=ATOL)
        # The last slot is H_12, fed through the last gate and block: changing it changes the output.
        moved = features.clone()
        moved[:, -1] += torch.randn(B, T, D, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
        assert (model(moved, mask) - logits).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# U-Tuning (bypass form)


def tuner_by_hand(tuner, kind, x):
    if kind == "adapter":  # x + W_2 GELU(W_1 x)
        return x + lin(F.gelu(lin(x, tuner.down)), tuner.up)
    if kind == "lora":  # x + B A x
        return x + F.linear(F.linear(x, tuner.a.weight), tuner.b.weight)
    # prefix (our extension): x + softmax(x P_k^T / sqrt(D)) P_v, the keys being the n prefixes only
    return x + torch.softmax(x @ tuner.keys.T / math.sqrt(x.shape[-1]), -1) @ tuner.values


def expected_utuning(model, features, mask, kind):
    L = model.spec.num_layers
    x = features[:, 0]  # x_0 = H_0
    for l in range(1, L + 1):  # x_l = Lat_l(H_l) + Ver_l(x_{l-1})
        x = tuner_by_hand(model.lateral[l - 1], kind, features[:, l]) + tuner_by_hand(model.vertical[l - 1], kind, x)
    return lin(pool(ln(x, model.norm), mask, model.spec.pooling), model.head)


def utuning_case(kind, model_class=None, layers=3):
    spec = make_spec(layers, pooling="mean")
    config = config_from_options("utuning", {"tuner": kind, "bottleneck": "6", "rank": "3", "prefixes": "4"})
    model = build_model(config, spec) if model_class is None else model_class(config, spec)
    randomize(model, seed=40)
    assert type(model).required_layers(config, spec) == list(range(layers + 1))
    features = torch.randn(B, layers + 1, T, D, generator=torch.Generator().manual_seed(41), dtype=torch.float64)
    return model, features, token_mask()


def check_utuning(kind, model_class=None):
    model, features, mask = utuning_case(kind, model_class)
    with torch.no_grad():
        expected = expected_utuning(model, features, mask, kind)
        torch.testing.assert_close(model(features, mask), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["adapter", "lora", "prefix"])
def test_utuning_matches_equations(kind):
    check_utuning(kind)


# ---------------------------------------------------------------------------------------------------------------
# SynQT

SYNQT_LAYERS = 3
QUERIES = 2


def adapter_by_hand(adapter, x):
    """Ad_k(x) = x + W_2 GELU(W_1 x) (its dropout is off in eval)."""
    return x + lin(F.gelu(lin(x, adapter.down)), adapter.up)


def expected_synqt(model, features, mask):
    L, n = model.spec.num_layers, model.queries.shape[1]
    previous = masked_mean(features[:, 0], mask)  # Q_0: masked mean of H_0
    qs, hs, hhs = [], [], []
    for i in range(1, L + 1):
        syn = model.synthesis[i - 1]
        # Synthesis: u = Ad48(q_i + f Q_{i-1}), Q_{i-1} broadcast over the n queries.
        u = adapter_by_hand(syn.adapter, model.queries[i - 1][None] + model.feature_scale * previous[:, None])
        # Q^ = u + s_a Attn(LN u): single head among the n queries, own LayerNorms, adapter q/k/v/out, scale D^-1/2.
        x = ln(u, syn.attention_norm)
        att = syn.attention
        qn, kvn = ln(x, att.q_norm), ln(x, att.kv_norm)
        scores = adapter_by_hand(att.q, qn) @ adapter_by_hand(att.k, kvn).transpose(1, 2) * D ** -0.5
        attended = adapter_by_hand(att.out, torch.softmax(scores, -1) @ adapter_by_hand(att.v, kvn))
        u = u + syn.attention_scale * attended
        q_hat = u + syn.ffn_scale * adapter_by_hand(syn.ffn, ln(u, syn.norm))  # Q^ += s_f Ad48(LN Q^)
        # Knowledge extraction through frozen layer i over the cached H_{i-1}; queries see only the tokens.
        q_i, h_i, hh_i = bert_layer(model.frozen.layer[str(i - 1)], features[:, i - 1], mask, queries=q_hat)
        previous = q_i.mean(1)  # averaged over the n queries
        qs.append(previous)
        hs.append(h_i.mean(1))
        hhs.append(hh_i.mean(1))
    feats = [qs[-1], *qs, *hs, *hhs]  # 3L + 1
    feats = [f + adapter_by_hand(model.feature_adapter, ln(f, model.feature_norm)) for f in feats]
    w = torch.tanh(F.gelu(lin(feats[0], model.weights)))  # [B, 3L]
    z = (feats[0] + sum(w[:, j - 1, None] * feats[j] for j in range(1, len(feats)))) / (3 * L + 1)
    return lin(ln(z, model.head_norm), model.head)


def synqt_case(folder, model_class=None):
    hidden, mask = write_bert(folder, SYNQT_LAYERS, seed=50)
    spec = make_spec(SYNQT_LAYERS, folder, pooling="cls")
    config = config_from_options("synqt", {"queries": str(QUERIES), "adapter_dim": "6", "attention_adapter_dim": "3"})
    model = build_model(config, spec) if model_class is None else model_class(config, spec)
    randomize(model, seed=51)
    layers = type(model).required_layers(config, spec)
    assert layers == list(range(SYNQT_LAYERS))  # H_0 .. H_{L-1}
    # The hand-written layer is the backbone's own: layer 2 on H_1 gives H_2 at real tokens.
    assert_hand_layer_reproduces(model, hidden, mask, 2)
    return model, hidden[:, layers], mask


def check_synqt(folder, model_class=None):
    model, features, mask = synqt_case(folder, model_class)
    with torch.no_grad():
        torch.testing.assert_close(model(features, mask), expected_synqt(model, features, mask), rtol=RTOL, atol=ATOL)


def test_synqt_matches_equations(tmp_path):
    check_synqt(tmp_path)
