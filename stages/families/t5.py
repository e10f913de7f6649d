"""The T5 encoder (`T5EncoderModel`, or the encoder of a full T5 checkpoint): pre-norm RMS LayerNorm (scale only),
bidirectional attention without 1/sqrt(d) scaling, a relative position bias computed ONCE by block 0's
`relative_attention_bias` and passed to every block (like MPNet's), a ReLU or gated-GELU FFN. Blocks at
`encoder.block.N`; `hidden_states[L]` is after `encoder.final_layer_norm`. Every block is built without its own
bias table; the shared table is loaded from block 0 (`relative_attention_bias`) whichever blocks are loaded.
T5's decoder (and so SHERL's T5 late route as the paper runs it) is out of scope: this is an encoder backbone.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from .base import Family, bidirectional_mask, find_key, key_positions, query_positions
from .side_block import PreNormSideBlock, side_heads

_BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def relative_bias(table: nn.Embedding, config, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """T5Attention's bucketed bidirectional bias for arbitrary positions: [B, nq], [B, nk] -> [B, heads, nq, nk]."""
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = key_positions[:, None, :] - query_positions[:, :, None]  # memory - context, as compute_bias
    buckets = T5Attention._relative_position_bucket(relative, bidirectional=True,
                                                    num_buckets=config.relative_attention_num_buckets,
                                                    max_distance=config.relative_attention_max_distance)
    return table(buckets).permute(0, 3, 1, 2)


def t5_position_bias(table: nn.Embedding, config, length: int) -> torch.Tensor:
    """T5Attention.compute_bias itself ([1, heads, T, T]), on a stand-in that holds only the shared table."""
    from transformers.models.t5.modeling_t5 import T5Attention

    stand_in = SimpleNamespace(relative_attention_bias=table, is_decoder=False,
                               relative_attention_num_buckets=config.relative_attention_num_buckets,
                               relative_attention_max_distance=config.relative_attention_max_distance,
                               _relative_position_bucket=T5Attention._relative_position_bucket)
    return T5Attention.compute_bias(stand_in, length, length, device=table.weight.device)


class T5Encoder(Family):
    model_types = ("t5",)
    pooling = "mean"  # no CLS token
    encoder_class = "T5EncoderModel"  # AutoModel would build the whole encoder-decoder
    lora_targets = ("q", "v")

    def build_layer(self, config, index):
        from transformers.models.t5.modeling_t5 import T5Block

        return T5Block(config, has_relative_attention_bias=False, layer_idx=index)

    def shared_modules(self, config, indices):
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        shared = {"relative_attention_bias": nn.Embedding(config.relative_attention_num_buckets, config.num_heads)}
        if config.num_hidden_layers in indices:
            shared["norm"] = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        return shared

    def checkpoint_tensor(self, name, keys, get_tensor):
        if name.startswith("layer."):
            _, index, rest = name.split(".", 2)
            wanted = f"encoder.block.{index}.{rest}"
        elif name.startswith("relative_attention_bias."):
            wanted = _BIAS_KEY
        else:
            wanted = name.replace("norm.", "encoder.final_layer_norm.", 1)
        key = find_key([wanted], keys)
        if key is None:
            raise KeyError(f"checkpoint has no weights for {wanted}")
        return get_tensor(key)

    def run(self, frozen, hidden, mask):
        attention_mask = bidirectional_mask(frozen.config, hidden, mask)
        bias = t5_position_bias(frozen.relative_attention_bias, frozen.config, hidden.shape[1])
        for layer in frozen.layer.values():
            hidden = layer(hidden, attention_mask=attention_mask, position_bias=bias)[0]
        if getattr(frozen, "norm", None) is not None:
            hidden = frozen.norm(hidden)
        return hidden

    def query_pass(self, frozen, index, queries, hidden, mask):
        """x + Attn(N x), then a + FFN(N a), restricted to the queries, placed after the last real token: their
        scores get the relative bias of (token position - query position), as T5 would give tokens appended there.
        No 1/sqrt(d) scaling (T5's)."""
        block, config = frozen.layer[str(index)], frozen.config
        attention, norm = block.layer[0].SelfAttention, block.layer[0].layer_norm
        B, T, D = hidden.shape
        n, heads, d = queries.shape[1], config.num_heads, config.d_kv
        with torch.no_grad():
            source = norm(hidden)
            keys = attention.k(source).view(B, T, heads, d).transpose(1, 2)
            values = attention.v(source).view(B, T, heads, d).transpose(1, 2)
            bias = relative_bias(frozen.relative_attention_bias, config, query_positions(mask, n), key_positions(mask))
            bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
        q = attention.q(norm(queries)).view(B, n, heads, d).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.to(q.dtype), scale=1.0)
        h = attention.o(attended.transpose(1, 2).reshape(B, n, heads * d))
        a = queries + h
        feed_forward = block.layer[-1]
        hh = feed_forward.DenseReluDense(feed_forward.layer_norm(a))
        return a + hh, h, hh

    def head_norm(self, frozen):
        return getattr(frozen, "norm", None)

    def side_block(self, config, width, r, dropout):
        """Pre-RMSNorm, bidirectional, no position bias (the side path's positions come only from what the
        ladder reads), the backbone's FFN kind (ReLU, or gated GELU for `gated-gelu`)."""
        heads, _ = side_heads(width, config.num_heads, config.num_heads, False)
        return PreNormSideBlock(width, heads, heads, max(1, config.d_ff // r), dropout, config.layer_norm_epsilon,
                                rms=True, causal=False, rope_theta=None, gated=config.is_gated_act,
                                act=config.dense_act_fn)


T5_FAMILY = T5Encoder()
