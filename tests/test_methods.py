"""Side networks: shapes, masking, learning a separable toy task, SHERL's gradient path, configs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.nn import functional as F
from transformers import BertConfig, BertModel

from cachetune.stages.methods import FeatureSpec, build_model, config_from_dict, config_from_options, get_method, method_names
from cachetune.stages.methods.lst import LSTConfig, LadderSideNetwork

METHODS = ["linear", "lst", "unipt", "sherl"]
OPTIONS = {"linear": {}, "lst": {"r": "4"}, "unipt": {}, "sherl": {"r": "4"}}
LEARNING_RATE = {"linear": 3e-2, "lst": 3e-3, "unipt": 3e-3, "sherl": 3e-3}
LAYERS = 3




@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Hidden states of a tiny random BERT over padded sequences; label 1 when the tokens come from the upper ids."""
    torch.manual_seed(0)
    backbone = BertModel(BertConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                    intermediate_size=64, vocab_size=100)).eval()
    folder = tmp_path_factory.mktemp("tiny_bert")
    backbone.save_pretrained(folder)
    n, length = 64, 10
    labels = torch.arange(n) % 2
    ids = torch.where(labels[:, None].bool(), torch.randint(55, 100, (n, length)), torch.randint(5, 50, (n, length)))
    lengths = torch.randint(4, length + 1, (n,))
    mask = torch.arange(length)[None] < lengths[:, None]
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    spec = FeatureSpec(hidden_size=32, num_layers=LAYERS, num_labels=2, pooling="mean", backbone_path=str(folder),
                       cached_layers=tuple(range(LAYERS + 1)))
    return spec, torch.stack(hidden, 1), mask, labels


def build(name, spec, **options):
    config = config_from_options(name, {**OPTIONS[name], **options})
    model = build_model(config, spec)
    return config, model, type(model).required_layers(config, spec)


@pytest.mark.parametrize("name", METHODS)
def test_shapes_and_padding_is_ignored(task, name):
    spec, hidden, mask, _ = task
    for num_labels in (2, 1):
        current = FeatureSpec(**{**spec.to_dict(), "num_labels": num_labels, "cached_layers": spec.cached_layers})
        _, model, layers = build(name, current)
        assert layers == sorted(layers) and all(0 <= l <= LAYERS for l in layers)
        model.eval()
        features = hidden[:8, layers]
        logits = model(features, mask[:8])
        assert logits.shape == (8, num_labels)
        # Whatever sits at padded positions must not change the output.
        noisy = features.masked_fill(~mask[:8, None, :, None], 0.0) + 5 * (~mask[:8, None, :, None]) * torch.randn_like(features)
        torch.testing.assert_close(model(noisy, mask[:8]), logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_loss_falls(task, name):
    spec, hidden, mask, labels = task
    torch.manual_seed(0)
    _, model, layers = build(name, spec)
    model.train()
    features = hidden[:, layers]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE[name])
    losses = []
    for step in range(40):
        batch = torch.randperm(len(labels))[:32]
        loss = F.cross_entropy(model(features[batch], mask[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = F.cross_entropy(model(features, mask), labels).item()
    assert final < 0.6 * losses[0], (losses[0], final)


def test_sherl_gradient_flows_through_frozen_layer(task):
    spec, hidden, mask, labels = task
    _, model, layers = build("sherl", spec)
    assert layers == list(range(LAYERS))  # H_L is never read
    assert model.frozen.indices == [LAYERS]
    model.train()
    assert not model.frozen.training
    # The side modules feed only the frozen layer, so any gradient on them came through it.
    F.cross_entropy(model(hidden[:8, layers], mask[:8]), labels[:8]).backward()
    for name, parameter in model.named_parameters():
        if name.startswith("frozen."):
            assert not parameter.requires_grad and parameter.grad is None, name
        elif not name.startswith("head."):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert {n.split(".")[2] for n, _ in model.named_parameters() if n.startswith("frozen.")} == {str(LAYERS - 1)}


def test_sherl_options(task):
    spec, hidden, mask, _ = task
    _, model, layers = build("sherl", spec, transform="gated", late_layers="2")
    assert layers == [0, 1] and model.frozen.indices == [2, 3]
    assert model(hidden[:4, layers], mask[:4]).shape == (4, 2)
    with pytest.raises(ValueError, match="transform"):
        build("sherl", spec, transform="nope")
    with pytest.raises(ValueError, match="late_layers"):
        build("sherl", spec, late_layers="3")


def test_lst_layers_and_heads(task):
    spec, _, _, _ = task
    spec12 = FeatureSpec(hidden_size=48, num_layers=12, num_labels=2, pooling="cls", backbone_path="",
                         cached_layers=tuple(range(13)))
    # Blocks i = 0..11, every 4th from 0 dropped; kept block i feeds its output H_{i+1}: H_12 is always read.
    assert LadderSideNetwork.required_layers(LSTConfig(), spec12) == [0, 2, 3, 4, 6, 7, 8, 10, 11, 12]
    assert LadderSideNetwork.required_layers(LSTConfig(drop_every=0), spec12) == list(range(13))
    model = LadderSideNetwork(LSTConfig(r=2), spec12)  # no config.json: ffn 4h, 4 heads
    assert model.blocks[0].heads == 4 and model.blocks[0].ffn[0].out_features == 96
    model = LadderSideNetwork(LSTConfig(r=4), spec)  # tiny BERT: h 8, 4 heads, ffn 64 / 4
    assert model.blocks[0].heads == 4 and model.blocks[0].ffn[0].out_features == 16
    assert torch.allclose(torch.sigmoid(model.gates / 0.1), torch.full_like(model.gates, 0.5))


@pytest.mark.parametrize("name", METHODS)
def test_config_round_trip(name):
    assert name in method_names()
    config = config_from_options(name, OPTIONS[name])
    data = config.to_dict()
    assert data["method"] == name
    assert config_from_dict(data) == config
    assert get_method(name).config_class.from_dict(data) == config
    with pytest.raises(ValueError, match="no option 'bogus'"):
        config_from_options(name, {"bogus": "1"})


def test_weight_decay_spares_biases_norms_and_gates(task):
    from cachetune.stages.training.training_loop import parameter_groups

    spec, _, _, _ = task
    _, model, _ = build("lst", spec)
    decayed, spared = parameter_groups(list(model.parameters()), 0.01)
    assert decayed["weight_decay"] == 0.01 and spared["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    spared_names = {names[id(p)] for p in spared["params"]}
    assert "gates" in spared_names and "final_norm.weight" in spared_names and "first.bias" in spared_names
    assert "first.weight" in decayed_names and "head.weight" in decayed_names
    assert decayed_names.isdisjoint(spared_names) and len(decayed_names | spared_names) == len(names)
