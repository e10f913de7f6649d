"""GPT-2: a pre-LN causal decoder with learned absolute positions (added to the embeddings, so already in the
cached H_0: its layers take no positions), LayerNorm, and Conv1D projections (weights stored [in, out]; c_attn
holds W_q, W_k, W_v side by side). Layers at `h.N` (`transformer.h.N` in GPT2LMHeadModel); final norm `ln_f`, which
`hidden_states[L]` is after, as for the Llama layout.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Family, find_key
from .side_block import PreNormSideBlock, side_heads


class GPT2(Family):
    model_types = ("gpt2",)
    causal = True
    pooling = "last"
    lora_targets = ("c_attn",)  # query, key and value in one Conv1D: LoRA adapts all three
    lora_fan_in_fan_out = True

    def build_layer(self, config, index):
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        return GPT2Block(config, layer_idx=index)

    def shared_modules(self, config, indices):
        if config.num_hidden_layers in indices:
            return {"norm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)}
        return {}

    def checkpoint_tensor(self, name, keys, get_tensor):
        if name.startswith("layer."):
            _, index, rest = name.split(".", 2)
            wanted = f"h.{index}.{rest}"
        else:
            wanted = name.replace("norm.", "ln_f.", 1)
        key = find_key([wanted], keys)
        if key is None:
            raise KeyError(f"checkpoint has no weights for {wanted}")
        return get_tensor(key)

    def run(self, frozen, hidden, mask):
        from transformers.masking_utils import create_causal_mask

        from .base import key_positions

        causal = create_causal_mask(config=frozen.config, inputs_embeds=hidden, attention_mask=mask.long(), cache=None,
                                    position_ids=key_positions(mask))
        for layer in frozen.layer.values():
            hidden = layer(hidden, None, causal)
        if getattr(frozen, "norm", None) is not None:
            hidden = frozen.norm(hidden)
        return hidden

    def query_pass(self, frozen, index, queries, hidden, mask):
        """x + Attn(ln_1 x), then a + MLP(ln_2 a), restricted to the queries; no positions inside the layer, so
        the queries need none. Every query sees every real token (all come before it)."""
        layer = frozen.layer[str(index)]
        attention = layer.attn
        B, T, D = hidden.shape
        n, heads, d = queries.shape[1], attention.num_heads, attention.head_dim
        with torch.no_grad():
            _, keys, values = attention.c_attn(layer.ln_1(hidden)).split(attention.split_size, dim=2)
            keys = keys.view(B, T, heads, d).transpose(1, 2)
            values = values.view(B, T, heads, d).transpose(1, 2)
        q = attention.c_attn(layer.ln_1(queries))[..., :D].view(B, n, heads, d).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None, :],
                                                  scale=attention.scaling)
        h = attention.c_proj(attended.transpose(1, 2).reshape(B, n, D))
        a = queries + h
        hh = layer.mlp(layer.ln_2(a))
        return a + hh, h, hh

    def head_norm(self, frozen):
        return getattr(frozen, "norm", None)

    def side_block(self, config, width, r, dropout):
        heads, _ = side_heads(width, config.num_attention_heads, config.num_attention_heads, False)
        ffn = config.n_inner or 4 * config.hidden_size
        return PreNormSideBlock(width, heads, heads, max(1, ffn // r), dropout, config.layer_norm_epsilon, rms=False,
                                causal=True, rope_theta=None, gated=False, act=config.activation_function)


GPT2_FAMILY = GPT2()
