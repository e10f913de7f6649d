"""Pre-LN vision encoders: ViT, DeiT, DINOv2 and the vision tower of CLIP and SigLIP (`clip`/`siglip` checkpoints:
only `vision_model.encoder.layers.N`, never the text tower).

transformers 5 renamed some vision layers' modules (ViT: `layers.N.attention.q_proj`, `mlp.fc1`) but saves and
ships checkpoints under the older names (`encoder.layer.N.attention.attention.query`, `intermediate.dense`); both
spellings are looked up. DINOv2's SwiGLU FFN is stored fused (`mlp.weights_in`) and split into gate and up halves
here, as transformers does when it loads the model. Every token is real (no mask beyond lengths).

SynQT's query pass on a pre-LN layer x + Attn(LN1 x), then a + FFN(LN2 a): keys and values from LN1(H) (every
token's own LN1, as in the layer), h = W_o Attn(W_q LN1(Q), K, V) (times LayerScale 1 for DINOv2), a = Q + h,
hh = FFN(LN2 a) (times LayerScale 2), Q_i = a + hh. The final norm lies outside the layers and is not loaded.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from ..layer_config import ffn_width
from .base import Family, bidirectional_mask
from .encoder import LayerParts, encoder_side_block, parts_query_pass

_VIT_RENAMES = (("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
                ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense."))
_VIT_MLP = (("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."))
_OTHER_TOWERS = ("text_model.",)  # never read a text tower's layers for a vision family


class FFNInput:
    """A vision MLP up to its last dense: act(fc1 x), or SwiGLU silu(gate x) * up x. A plain callable over the
    layer's own MLP (not a module: it owns no weights)."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.mlp, "fc1"):
            return self.mlp.activation_fn(self.mlp.fc1(x))
        return self.mlp.act_fn(self.mlp.gate_proj(x)) * self.mlp.up_proj(x)


def _ffn_output(mlp: nn.Module) -> nn.Linear:
    return mlp.fc2 if hasattr(mlp, "fc2") else mlp.down_proj


class Vision(Family):
    """model_types, the layer class, where layer N lives in a checkpoint (the module's own spelling first), and
    (module name part, older checkpoint name part) renames."""

    pooling = "cls"

    def __init__(self, model_types, module: str, layer_class: str, containers: tuple[str, ...], renames=(),
                 pooling: str = "cls", towers: dict[str, str] | None = None, interpolates_positions: bool = False,
                 lora_targets: tuple[str, ...] = ("query", "value")):
        self.model_types, self.module, self.layer_class = model_types, module, layer_class
        self.pooling, self.towers, self.interpolates_positions = pooling, towers or {}, interpolates_positions
        self.lora_targets = lora_targets
        self.containers, self.renames = containers, renames

    def build_layer(self, config, index):
        return getattr(importlib.import_module(self.module), self.layer_class)(config)

    def checkpoint_tensor(self, name, keys, get_tensor):
        """The tensor for module name `layer.{i}.{rest}`, under either spelling of its key."""
        _, index, rest = name.split(".", 2)
        spellings = [rest] + [rest.replace(new, old) for new, old in self.renames if new in rest]
        wanted = [container.format(i=index) + spelling for container in self.containers for spelling in spellings]

        def lookup(candidates: list[str]) -> str | None:
            found = sorted({key for key in keys for want in candidates if (key == want or key.endswith("." + want))
                            and not any(key.startswith(other) or ("." + other) in key for other in _OTHER_TOWERS)})
            if len(found) > 1:
                raise ValueError(f"checkpoint has several keys for {candidates[0]!r}: {found}")
            return found[0] if found else None

        key = lookup(wanted)
        if key is not None:
            return get_tensor(key)
        for part, which in {"mlp.gate_proj.": 0, "mlp.up_proj.": 1}.items():  # DINOv2 SwiGLU, stored fused
            if rest.startswith(part):
                fused = lookup([c.format(i=index) + rest.replace(part, "mlp.weights_in.") for c in self.containers])
                if fused is not None:
                    return get_tensor(fused).chunk(2, dim=0)[which]
        raise KeyError(f"checkpoint has no weights for layer {int(index) + 1}'s {rest} "
                       f"(looked for {wanted[0]!r} and older spellings)")

    def run(self, frozen, hidden, mask):
        attention_mask = bidirectional_mask(frozen.config, hidden, mask)
        for layer in frozen.layer.values():
            hidden = layer(hidden, attention_mask)
        return hidden

    @staticmethod
    def parts(layer) -> LayerParts:
        if hasattr(layer, "layernorm_before"):  # ViT, DeiT
            heads = layer.attention
            return LayerParts(heads.q_proj, heads.k_proj, heads.v_proj, heads.o_proj, layer.layernorm_before,
                              FFNInput(layer.mlp), _ffn_output(layer.mlp), layer.layernorm_after, True)
        if hasattr(layer, "layer_scale1"):  # DINOv2
            heads = layer.attention
            return LayerParts(heads.q_proj, heads.k_proj, heads.v_proj, heads.o_proj, layer.norm1, FFNInput(layer.mlp),
                              _ffn_output(layer.mlp), layer.norm2, True, layer.layer_scale1, layer.layer_scale2)
        heads = layer.self_attn  # CLIP, SigLIP vision towers
        return LayerParts(heads.q_proj, heads.k_proj, heads.v_proj, heads.out_proj, layer.layer_norm1,
                          FFNInput(layer.mlp), _ffn_output(layer.mlp), layer.layer_norm2, True)

    def query_pass(self, frozen, index, queries, hidden, mask):
        return parts_query_pass(self.parts(frozen.layer[str(index)]), frozen.config.num_attention_heads,
                                queries, hidden, mask)

    def side_block(self, config, width, r, dropout):
        return encoder_side_block(width, config.num_attention_heads, max(1, ffn_width(config) // r), dropout,
                                  float(getattr(config, "layer_norm_eps", 1e-12)))


VIT = Vision(("vit",), "transformers.models.vit.modeling_vit", "ViTLayer", ("layers.{i}.", "encoder.layer.{i}."),
             _VIT_RENAMES + _VIT_MLP)
DEIT = Vision(("deit",), "transformers.models.deit.modeling_deit", "DeiTLayer", ("layers.{i}.", "encoder.layer.{i}."),
              _VIT_RENAMES + _VIT_MLP)
DINOV2 = Vision(("dinov2",), "transformers.models.dinov2.modeling_dinov2", "Dinov2Layer",
                ("encoder.layer.{i}.", "layers.{i}."), _VIT_RENAMES + (("mlp.down_proj.", "mlp.weights_out."),),
                interpolates_positions=True, lora_targets=("q_proj", "v_proj"))
CLIP = Vision(("clip_vision_model", "clip"), "transformers.models.clip.modeling_clip", "CLIPEncoderLayer",
              ("encoder.layers.{i}.",), towers={"clip": "CLIPVisionModel"})
SIGLIP = Vision(("siglip_vision_model", "siglip"), "transformers.models.siglip.modeling_siglip", "SiglipEncoderLayer",
                ("encoder.layers.{i}.",), pooling="mean", towers={"siglip": "SiglipVisionModel"})  # no CLS token
