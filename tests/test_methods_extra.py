"""utuning and synqt: shapes, masking, learning a toy task, configs; SynQT's frozen layers and extraction."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from torch.nn import functional as F
from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel, RobertaConfig, RobertaModel

from cachetune.stages.backbone_layers import load_frozen_layers
from cachetune.stages.methods import FeatureSpec, build_model, config_from_dict, config_from_options, get_method, method_names
from cachetune.stages.families.encoder import Encoder, extract
from cachetune.stages.training.side_model import trainable_state

METHODS = ["utuning", "synqt"]
LEARNING_RATE = {"utuning": 1e-2, "synqt": 1e-2}
LAYERS = 3
TINY = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, vocab_size=100)




def make_task(folder, config_class=BertConfig, model_class=BertModel, pooling="mean"):
    """Hidden states of a tiny random encoder over padded sequences; label 1 when the tokens come from the upper ids."""
    torch.manual_seed(0)
    backbone = model_class(config_class(**TINY)).eval()
    backbone.save_pretrained(folder)
    n, length = 64, 10
    labels = torch.arange(n) % 2
    ids = torch.where(labels[:, None].bool(), torch.randint(55, 100, (n, length)), torch.randint(5, 50, (n, length)))
    lengths = torch.randint(4, length + 1, (n,))
    mask = torch.arange(length)[None] < lengths[:, None]
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    spec = FeatureSpec(hidden_size=32, num_layers=LAYERS, num_labels=2, pooling=pooling, backbone_path=str(folder),
                       cached_layers=tuple(range(LAYERS + 1)))
    return spec, torch.stack(hidden, 1), mask, labels


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("tiny_bert"))


def build(name, spec, **options):
    config = config_from_options(name, options)
    model = build_model(config, spec)
    return config, model, type(model).required_layers(config, spec)


def with_labels(spec, num_labels):
    return FeatureSpec(**{**spec.to_dict(), "num_labels": num_labels, "cached_layers": spec.cached_layers})


def assert_padding_ignored(model, features, mask):
    model.eval()
    logits = model(features, mask)
    pad = ~mask[:, None, :, None]
    noisy = features.masked_fill(pad, 0.0) + 5 * pad * torch.randn_like(features)
    torch.testing.assert_close(model(noisy, mask), logits, atol=1e-5, rtol=1e-4)
    return logits


@pytest.mark.parametrize("name", METHODS)
def test_shapes_and_padding_is_ignored(task, name):
    spec, hidden, mask, _ = task
    for num_labels in (2, 1):
        _, model, layers = build(name, with_labels(spec, num_labels))
        assert layers == sorted(layers) and all(0 <= l <= LAYERS for l in layers)
        logits = assert_padding_ignored(model, hidden[:8, layers], mask[:8])
        assert logits.shape == (8, num_labels)


def train(model, features, mask, labels, lr, steps=40):
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        batch = torch.randperm(len(labels))[:32]
        loss = F.cross_entropy(model(features[batch], mask[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = F.cross_entropy(model(features, mask), labels).item()
    return losses[0], final


@pytest.mark.parametrize("name, options", [("utuning", {"tuner": "adapter"}), ("utuning", {"tuner": "lora"}),
                                           ("utuning", {"tuner": "prefix"}), ("synqt", {})])
def test_loss_falls(task, name, options):
    spec, hidden, mask, labels = task
    torch.manual_seed(0)
    _, model, layers = build(name, spec, **options)
    first, final = train(model, hidden[:, layers], mask, labels, LEARNING_RATE[name])
    assert final < 0.6 * first, (first, final)


@pytest.mark.parametrize("name", METHODS)
def test_config_round_trip(name):
    assert name in method_names()
    config = config_from_options(name, {})
    data = config.to_dict()
    assert data["method"] == name
    assert config_from_dict(data) == config
    assert get_method(name).config_class.from_dict(data) == config
    with pytest.raises(ValueError, match="no option 'bogus'"):
        config_from_options(name, {"bogus": "1"})


def test_utuning_options(task):
    spec, hidden, mask, _ = task
    config, model, layers = build("utuning", spec)
    assert layers == list(range(LAYERS + 1))
    assert (config.tuner, config.bottleneck, config.zero_init_last) == ("adapter", 32, False)  # see utuning.py
    assert model.lateral[0].down.out_features == 32
    _, model, _ = build("utuning", spec, tuner="lora", rank="3")
    assert model.vertical[0].a.out_features == 3
    _, model, _ = build("utuning", spec, tuner="prefix", prefixes="5", zero_init_last="true")
    assert model.lateral[0].keys.shape == (5, 32)
    x = torch.randn(2, 4, 32)
    for tuner in ("adapter", "lora", "prefix"):  # the last block's tuners start as the identity
        _, model, _ = build("utuning", spec, tuner=tuner, zero_init_last="true")
        torch.testing.assert_close(model.lateral[-1](x), x)
        torch.testing.assert_close(model.vertical[-1](x), x)
        assert not torch.allclose(model.lateral[0](x), x)
    with pytest.raises(ValueError, match="tuner"):
        build("utuning", spec, tuner="nope")


def test_synqt_frozen_layers_and_gradients(task):
    spec, hidden, mask, labels = task
    _, model, layers = build("synqt", spec)
    assert layers == list(range(LAYERS))  # H_L is never read
    assert model.frozen.indices == list(range(1, LAYERS + 1))
    # The frozen module holds exactly encoder layers 1..L, nothing of the embeddings or pooler.
    with safe_open(os.path.join(spec.backbone_path, "model.safetensors"), framework="pt") as handle:
        expected = {k.removeprefix("encoder.") for k in handle.keys() if k.startswith("encoder.layer.")}
        numel = sum(handle.get_tensor(f"encoder.{k}").numel() for k in expected)
    assert set(model.frozen.parameter_names()) == expected
    assert sum(p.numel() for p in model.frozen.parameters()) == numel
    # The head's LayerNorm is a trainable copy of layer L's output LayerNorm, not the frozen one.
    last = model.frozen.layer[str(LAYERS - 1)].output.LayerNorm
    assert model.head_norm is not last and model.head_norm.weight.requires_grad
    torch.testing.assert_close(model.head_norm.weight, last.weight)
    model.train()
    assert not model.frozen.training
    F.cross_entropy(model(hidden[:8, layers], mask[:8]), labels[:8]).backward()
    for name, parameter in model.named_parameters():
        if name.startswith("frozen."):
            assert not parameter.requires_grad and parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Saved state drops the frozen weights; a rebuilt model with it loaded gives the same output.
    state = trainable_state(model)
    assert not any(k.startswith("frozen.") for k in state) and "head_norm.weight" in state
    _, again, _ = build("synqt", spec)
    again.load_state_dict(state, strict=False)
    model.eval(), again.eval()
    torch.testing.assert_close(again(hidden[:4, layers], mask[:4]), model(hidden[:4, layers], mask[:4]))


def test_synqt_extraction_matches_hand_written_attention(task):
    spec, hidden, mask, _ = task
    _, model, _ = build("synqt", spec)
    layer = model.frozen.layer["1"]  # layer 2, reads H_1
    parts = Encoder.parts(layer)
    torch.manual_seed(1)
    B, T, D, heads = 3, hidden.shape[2], 32, 4
    d = D // heads
    query, H, m = torch.randn(B, 1, D), hidden[:B, 1], mask[:B]
    self_attention = layer.attention.self
    keys = self_attention.key(H).view(B, T, heads, d).transpose(1, 2)
    values = self_attention.value(H).view(B, T, heads, d).transpose(1, 2)
    with torch.no_grad():
        out, h, hh = extract(parts, query, keys, values, m, heads)
        # By hand, with the layer's own weights.
        def proj(x, linear):
            return x @ linear.weight.t() + linear.bias
        q = proj(query, self_attention.query).view(B, 1, heads, d).transpose(1, 2)
        k = proj(H, self_attention.key).view(B, T, heads, d).transpose(1, 2)
        v = proj(H, self_attention.value).view(B, T, heads, d).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / d ** 0.5
        scores = scores.masked_fill(~m[:, None, None, :], float("-inf"))
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, 1, D)
        h_hand = proj(context, layer.attention.output.dense)
        norm = layer.attention.output.LayerNorm
        a = F.layer_norm(query + h_hand, (D,), norm.weight, norm.bias, norm.eps)
        hh_hand = proj(F.gelu(proj(a, layer.intermediate.dense)), layer.output.dense)
        norm = layer.output.LayerNorm
        out_hand = F.layer_norm(a + hh_hand, (D,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(h, h_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hh, hh_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, out_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_synqt_extraction_matches_the_layer_itself(tmp_path, family):
    """A query appended to the tokens, with its own key masked out, comes out of transformers' own layer as Q_i."""
    config_class, model_class = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel)}[family]
    spec, hidden, mask, _ = make_task(tmp_path, config_class, model_class, pooling="cls")
    _, model, layers = build("synqt", spec)
    frozen_one = load_frozen_layers(spec.backbone_path, [2])
    B, T, D = 4, hidden.shape[2], 32
    torch.manual_seed(2)
    query = torch.randn(B, 1, D)
    parts = Encoder.parts(model.frozen.layer["1"])
    with torch.no_grad():
        keys = parts.key(hidden[:B, 1]).view(B, T, 4, 8).transpose(1, 2)
        values = parts.value(hidden[:B, 1]).view(B, T, 4, 8).transpose(1, 2)
        out, _, _ = extract(parts, query, keys, values, mask[:B], 4)
        joint = frozen_one(torch.cat([hidden[:B, 1], query], 1), torch.cat([mask[:B], torch.zeros(B, 1, dtype=torch.bool)], 1))
    torch.testing.assert_close(out[:, 0], joint[:, -1], atol=1e-5, rtol=1e-5)
    assert_padding_ignored(model, hidden[:4, layers], mask[:4])


def test_synqt_mpnet_runs_without_position_bias(tmp_path):
    spec, hidden, mask, _ = make_task(tmp_path, MPNetConfig, MPNetModel)
    _, model, layers = build("synqt", spec)
    logits = assert_padding_ignored(model, hidden[:4, layers], mask[:4])
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()


def test_synqt_rejects_bad_options(task):
    spec, _, _, _ = task
    with pytest.raises(ValueError, match="queries"):
        build("synqt", spec, queries="0")
    _, model, _ = build("synqt", spec, queries="1")
    assert model.queries.shape == (LAYERS, 1, 32)
