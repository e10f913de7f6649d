"""Decoder-only language models in the Llama layout: Llama (SmolLM2 is one), Mistral, Qwen2, Gemma-3 (text).

A layer is pre-norm: x + Attn(Norm_1 x), then + MLP(Norm_2 x) (Gemma-3 also normalises each branch's output:
x + Norm(Attn(Norm x)), then x + Norm(MLP(Norm x))). Attention has rotary positions on queries and keys, grouped
key/value heads and a causal mask; some layers see only a sliding window (Mistral, Qwen2 with
use_sliding_window, Gemma-3's `sliding_attention` layers, each with its own rotary table). Embedding scale
(Gemma-3) and BOS handling happen before layer 1, so they are already in the cached H_0.

In transformers 5 `hidden_states[L]` is AFTER the model's final norm (it equals `last_hidden_state`), so when layer
L is loaded the final norm is loaded too and applied after it: frozen layers 1..L map H_0 to H_L exactly.
Positions are those the backbone saw at extraction, 0 .. len - 1 over the real tokens (`key_positions`).
"""
from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.nn import functional as F

from .base import Family, find_key, key_positions, query_positions
from .side_block import PreNormSideBlock, side_heads


def layer_type(config, index: int) -> str:
    """"full_attention" or "sliding_attention" for layer `index` (0-based), as the family's model decides."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"  # Mistral


def rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in parameters:  # Gemma-3: one table per layer type
        parameters = parameters["full_attention"]
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class RotaryDecoder(Family):
    causal = True
    pooling = "last"  # only the last real token has seen the whole text
    lora_targets = ("q_proj", "v_proj")

    def __init__(self, model_types: tuple[str, ...], module: str, prefix: str, sandwich_norms: bool = False,
                 wide_stream: bool = False):
        self.model_types, self.module, self.prefix = model_types, module, prefix
        self.wide_stream = wide_stream  # scales far from 1 in the stream and the final state: see stream_scale
        self.sandwich_norms = sandwich_norms  # Gemma-3: a norm after each branch too
        self.per_type_rotary = sandwich_norms  # Gemma-3's rotary embedding takes the layer type

    def _class(self, suffix: str):
        return getattr(importlib.import_module(self.module), self.prefix + suffix)

    def build_layer(self, config, index: int) -> nn.Module:
        return self._class("DecoderLayer")(config, layer_idx=index)

    def shared_modules(self, config, indices: list[int]) -> dict[str, nn.Module]:
        if config.num_hidden_layers in indices:  # H_L is after the final norm
            return {"norm": self._class("RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)}
        return {}

    def runtime_modules(self, config) -> dict[str, nn.Module]:
        return {"rotary_emb": self._class("RotaryEmbedding")(config)}

    def checkpoint_tensor(self, name: str, keys: set[str], get_tensor) -> torch.Tensor:
        if name.startswith("layer."):
            _, index, rest = name.split(".", 2)
            wanted = f"layers.{index}.{rest}"
        else:
            wanted = name  # norm.weight
        key = find_key([wanted], keys, exclude=("vision", "mtp"))
        if key is None:
            raise KeyError(f"checkpoint has no weights for {wanted}")
        return get_tensor(key)

    def position_embeddings(self, frozen, hidden: torch.Tensor, positions: torch.Tensor, kind: str):
        if self.per_type_rotary:
            return frozen.rotary_emb(hidden, positions, kind)
        return frozen.rotary_emb(hidden, positions)

    def run(self, frozen, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config, positions = frozen.config, key_positions(mask)
        arguments = dict(config=config, inputs_embeds=hidden, attention_mask=mask.long(), cache=None,
                         position_ids=positions)
        masks, tables = {}, {}
        for name, layer in frozen.layer.items():
            kind = layer_type(config, int(name))
            if kind not in masks:  # as the model: one mask and one rotary table per layer type
                build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                masks[kind] = build(**arguments)
                tables[kind] = self.position_embeddings(frozen, hidden, positions, kind)
            hidden = layer(hidden, attention_mask=masks[kind], position_ids=positions, position_embeddings=tables[kind])
        if getattr(frozen, "norm", None) is not None:
            hidden = frozen.norm(hidden)
        return hidden

    def query_pass(self, frozen, index, queries, hidden, mask):
        """The layer restricted to the queries (see stages/methods/synqt.py):
            K, V = rope(W_k N_1(H)), W_v N_1(H) at the tokens' positions        (no gradient)
            h = W_o Attn(rope(W_q N_1(Q)) at len, len + 1, ...; K, V)   real keys only (and within the window)
            a = Q + h;  hh = MLP(N_2 a);  Q_out = a + hh
        Gemma-3: q and k pass its per-head q_norm / k_norm, and h = N(W_o Attn), hh = N(MLP(N a))."""
        from importlib import import_module

        apply_rotary = import_module(self.module).apply_rotary_pos_emb
        layer, config = frozen.layer[str(index)], frozen.config
        attention, kind = layer.self_attn, layer_type(config, index)
        B, T, _ = hidden.shape
        n, d = queries.shape[1], attention.head_dim
        token_positions, positions = key_positions(mask), query_positions(mask, n)
        with torch.no_grad():  # K, V need no gradient
            source = layer.input_layernorm(hidden)
            keys = attention.k_proj(source).view(B, T, -1, d).transpose(1, 2)
            values = attention.v_proj(source).view(B, T, -1, d).transpose(1, 2)
            if hasattr(attention, "k_norm"):
                keys = attention.k_norm(keys)
            cos, sin = self.position_embeddings(frozen, hidden, token_positions, kind)
            keys, _ = apply_rotary(keys, keys, cos, sin)
        q = attention.q_proj(layer.input_layernorm(queries)).view(B, n, -1, d).transpose(1, 2)
        if hasattr(attention, "q_norm"):
            q = attention.q_norm(q)
        cos, sin = self.position_embeddings(frozen, queries, positions, kind)
        q, _ = apply_rotary(q, q, cos, sin)
        allowed = mask[:, None, None, :]  # [B, 1, n, T]
        if kind == "sliding_attention":
            window = positions[:, None, :, None] - token_positions[:, None, None, :] < config.sliding_window
            allowed = allowed & window
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=attention.scaling,
                                                  enable_gqa=keys.shape[1] != q.shape[1])
        h = attention.o_proj(attended.transpose(1, 2).reshape(B, n, -1))
        if self.sandwich_norms:
            h = layer.post_attention_layernorm(h)
            a = queries + h
            hh = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(a)))
        else:
            a = queries + h
            hh = layer.mlp(layer.post_attention_layernorm(a))
        return a + hh, h, hh

    def head_norm(self, frozen) -> nn.Module | None:
        return getattr(frozen, "norm", None)

    def stream_scale(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """wide_stream: per-token RMS [B, T, 1] (no gradient). A pre-norm layer adds its branches to a raw residual
        stream whose scale grows with depth (real Gemma 3 270M: median RMS 1 at H_0, 1,348 at H_17, its post-branch
        norms' gains up to 1,649), so what is fed in beside it at unit scale is a rounding error next to the branches."""
        return hidden.detach().pow(2).mean(-1, keepdim=True).sqrt() if self.wide_stream else None

    def head_input(self, pooled: torch.Tensor) -> torch.Tensor:
        """wide_stream: the pooled final state at unit RMS (no parameters). The final norm's gains (Gemma 3 270M: up to
        301) set the scale of H_L, and of the last layer's output on anything but the stream it was trained on (SHERL's
        E': pooled RMS 47 against H_L's 3.9), so a fresh head starts with logits of +-20."""
        return F.rms_norm(pooled, pooled.shape[-1:]) if self.wide_stream else pooled

    def side_block(self, config, width: int, r: int, dropout: float) -> nn.Module:
        heads, kv_heads = side_heads(width, config.num_attention_heads,
                                     getattr(config, "num_key_value_heads", None) or config.num_attention_heads, True)
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        return PreNormSideBlock(width, heads, kv_heads, max(1, config.intermediate_size // r), dropout,
                                config.rms_norm_eps, rms=True, causal=True, rope_theta=rope_theta(config), gated=True,
                                act=act)


LLAMA = RotaryDecoder(("llama",), "transformers.models.llama.modeling_llama", "Llama")
MISTRAL = RotaryDecoder(("mistral",), "transformers.models.mistral.modeling_mistral", "Mistral")
QWEN2 = RotaryDecoder(("qwen2",), "transformers.models.qwen2.modeling_qwen2", "Qwen2")
GEMMA3 = RotaryDecoder(("gemma3_text",), "transformers.models.gemma3.modeling_gemma3", "Gemma3", sandwich_norms=True,
                       wide_stream=True)
