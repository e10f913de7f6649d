"""Load a few frozen encoder layers of a Hugging Face backbone, never the whole model.

Layer l (1-based) maps hidden_states[l - 1] to hidden_states[l]. Only those layers' weights are read
from the checkpoint (plus, for MPNet, the encoder's shared relative_attention_bias), and the layers are
run with the attention mask the backbone's own encoder would build.

Text families: BERT, RoBERTa, XLM-RoBERTa, MPNet (post-LN). Vision families (pre-LN): ViT, DeiT, DINOv2 and the
vision tower of CLIP and SigLIP (`clip`/`siglip` checkpoints: only `vision_model.encoder.layers.N`, never the text
tower). transformers 5 renamed some vision layers' modules (ViT: `layers.N.attention.q_proj`, `mlp.fc1`) but
saves and ships checkpoints under the older names (`encoder.layer.N.attention.attention.query`,
`intermediate.dense`); both spellings are looked up. DINOv2's SwiGLU FFN is stored fused (`mlp.weights_in`)
and split into gate and up halves here, as transformers does when it loads the model.
"""
from __future__ import annotations

import importlib
import inspect
import os
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

from .layer_config import VISION_TOWERS, layer_config


# model_type -> (module, layer class), and the attention AutoModel picks by default (MPNet has only eager).
_FAMILIES = {
    "bert": ("transformers.models.bert.modeling_bert", "BertLayer", "sdpa"),
    "roberta": ("transformers.models.roberta.modeling_roberta", "RobertaLayer", "sdpa"),
    "xlm-roberta": ("transformers.models.xlm_roberta.modeling_xlm_roberta", "XLMRobertaLayer", "sdpa"),
    "mpnet": ("transformers.models.mpnet.modeling_mpnet", "MPNetLayer", "eager"),
    "vit": ("transformers.models.vit.modeling_vit", "ViTLayer", "sdpa"),
    "deit": ("transformers.models.deit.modeling_deit", "DeiTLayer", "sdpa"),
    "dinov2": ("transformers.models.dinov2.modeling_dinov2", "Dinov2Layer", "sdpa"),
    "clip_vision_model": ("transformers.models.clip.modeling_clip", "CLIPEncoderLayer", "sdpa"),
    "siglip_vision_model": ("transformers.models.siglip.modeling_siglip", "SiglipEncoderLayer", "sdpa"),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES) + tuple(VISION_TOWERS)

# Vision families: where layer N lives in a checkpoint (the module's own spelling first), and
# (module name part, older checkpoint name part) renames.
_VIT_RENAMES = (("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
                ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense."))
_VISION_KEYS = {
    "vit": (("layers.{i}.", "encoder.layer.{i}."), _VIT_RENAMES + (("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."))),
    "deit": (("layers.{i}.", "encoder.layer.{i}."), _VIT_RENAMES + (("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."))),
    "dinov2": (("encoder.layer.{i}.", "layers.{i}."), _VIT_RENAMES + (("mlp.down_proj.", "mlp.weights_out."),)),
    "clip_vision_model": (("encoder.layers.{i}.",), ()),
    "siglip_vision_model": (("encoder.layers.{i}.",), ()),
}
_OTHER_TOWERS = ("text_model.",)  # never read a text tower's layers for a vision family


def _mpnet_position_bias(relative_attention_bias: nn.Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """MPNetEncoder.compute_position_bias itself, run on a stand-in that holds only the shared embedding."""
    encoder = SimpleNamespace(relative_attention_bias=relative_attention_bias,
                              relative_position_bucket=MPNetEncoder.relative_position_bucket)
    return MPNetEncoder.compute_position_bias(encoder, hidden)


_NO_SKIP_CHECK = ({"allow_is_bidirectional_skip": False}
                  if "allow_is_bidirectional_skip" in inspect.signature(create_bidirectional_mask).parameters else {})


class FrozenLayers(nn.Module):
    """The requested pretrained layers, frozen and always in eval mode. Gradients still flow to the input.

    Parameter names mirror the checkpoint's without its `[prefix.]encoder.`: `layer.{l-1}.…` and, for MPNet,
    `relative_attention_bias.weight`.
    """

    def __init__(self, config, indices: list[int]):
        super().__init__()
        self.config = config
        self.indices = list(indices)
        module, name, _ = _FAMILIES[config.model_type]
        layer_class = getattr(importlib.import_module(module), name)
        self.layer = nn.ModuleDict({str(i - 1): layer_class(config) for i in self.indices})
        self.relative_attention_bias = None
        if config.model_type == "mpnet":
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_attention_heads)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenLayers":
        return super().train(False)

    def parameter_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D], mask [B, T] bool (True = real token) -> [B, T, D]."""
        # No skip check: transformers would test `mask.all()` in Python, a host sync at every step on a GPU.
        attention_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask.long(),
                                                   **_NO_SKIP_CHECK)
        if self.relative_attention_bias is not None:
            # MPNetEncoder computes the bias once from its input and passes it to every layer.
            bias = _mpnet_position_bias(self.relative_attention_bias, hidden)
            for layer in self.layer.values():
                hidden = layer(hidden, attention_mask, bias)[0]
        else:
            for layer in self.layer.values():
                hidden = layer(hidden, attention_mask)
        return hidden


def _open_checkpoint(folder: str):
    """(name -> tensor, set of names) over the folder's weights, reading one tensor at a time where it can."""
    path = os.path.join(folder, "model.safetensors")
    if os.path.exists(path):
        from safetensors import safe_open

        handle = safe_open(path, framework="pt")
        return handle.get_tensor, set(handle.keys())
    path = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return state.__getitem__, set(state)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def _checkpoint_key(name: str, keys: set[str]) -> str:
    """The checkpoint key for a module name, allowing a model prefix (bert., mpnet., …) and old LayerNorm names."""
    aliases = [name]
    if ".LayerNorm." in name:
        aliases.append(name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"))
    for alias in aliases:
        wanted = "encoder." + alias
        found = [key for key in keys if key == wanted or key.endswith("." + wanted)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"checkpoint has several keys for {wanted!r}: {sorted(found)}")
    raise KeyError(f"checkpoint has no weights for encoder.{name}")


def _vision_checkpoint_tensor(family: str, name: str, keys: set[str], get_tensor) -> torch.Tensor:
    """The tensor for module name `layer.{i}.{rest}` of a vision family, under either spelling of its key."""
    _, index, rest = name.split(".", 2)
    containers, renames = _VISION_KEYS[family]
    spellings = [rest] + [rest.replace(new, old) for new, old in renames if new in rest]
    wanted = [container.format(i=index) + spelling for container in containers for spelling in spellings]

    def lookup(candidates: list[str]) -> str | None:
        found = sorted({key for key in keys for want in candidates if (key == want or key.endswith("." + want))
                        and not any(key.startswith(other) or ("." + other) in key for other in _OTHER_TOWERS)})
        if len(found) > 1:
            raise ValueError(f"checkpoint has several keys for {candidates[0]!r}: {found}")
        return found[0] if found else None

    key = lookup(wanted)
    if key is not None:
        return get_tensor(key)
    half = {"mlp.gate_proj.": 0, "mlp.up_proj.": 1}
    for part, which in half.items():  # DINOv2 SwiGLU: gate and up are stored fused as mlp.weights_in
        if rest.startswith(part):
            fused = lookup([c.format(i=index) + rest.replace(part, "mlp.weights_in.") for c in containers])
            if fused is not None:
                return get_tensor(fused).chunk(2, dim=0)[which]
    raise KeyError(f"checkpoint has no weights for layer {int(index) + 1}'s {rest} (looked for {wanted[0]!r} and older spellings)")


def load_frozen_layers(backbone_path: str, indices: list[int], attn_implementation: str | None = None) -> FrozenLayers:
    """Build only encoder layers `indices` (1-based) of the backbone at `backbone_path` and load their weights."""
    model_type = AutoConfig.from_pretrained(backbone_path).model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    config = layer_config(backbone_path)
    indices = sorted(set(indices))
    if not indices or indices[0] < 1 or indices[-1] > config.num_hidden_layers:
        raise ValueError(f"layer indices must lie in 1..{config.num_hidden_layers}, got {indices}")
    default_attention = _FAMILIES[config.model_type][2]
    if default_attention == "eager" and attn_implementation not in (None, "eager"):
        raise ValueError(f"{config.model_type} layers support only eager attention")
    config._attn_implementation = attn_implementation or default_attention
    with torch.device("meta"):
        module = FrozenLayers(config, indices)
    get_tensor, keys = _open_checkpoint(backbone_path)
    state = {}
    for name in module.state_dict():
        if config.model_type in _VISION_KEYS:
            tensor = _vision_checkpoint_tensor(config.model_type, name, keys, get_tensor)
        else:
            tensor = get_tensor(_checkpoint_key(name, keys))
        state[name] = tensor.float() if tensor.is_floating_point() else tensor
    module.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise RuntimeError("some layer tensors were not loaded from the checkpoint")
    module.requires_grad_(False)
    return module.eval()
