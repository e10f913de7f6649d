"""Load a few frozen layers of a Hugging Face backbone, never the whole model.

Layer l (1-based) maps hidden_states[l - 1] to hidden_states[l]. Only those layers' weights are read from the
checkpoint, plus the shared state they need outside themselves (MPNet's and T5's relative position bias table; a
decoder's rotary table, built from the config, and its final norm when layer L is loaded, since hidden_states[L] is
after it), and the layers are run with the masks and positions the backbone itself would build.

What differs between families (which layer class, where its weights live, how masks, positions and shared state
are made, SynQT's query-only pass, LST's side block) is one adapter per family in stages/families/: text encoders
(BERT, RoBERTa, XLM-RoBERTa, MPNet), vision encoders (ViT, DeiT, DINOv2, CLIP and SigLIP vision towers),
decoder-only LMs in the Llama layout (Llama, Mistral, Qwen2, Gemma-3 text), GPT-2, and the T5 encoder.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoConfig

from .families import ADAPTERS, Family, family_for
from .layer_config import layer_config

SUPPORTED_MODEL_TYPES = tuple(ADAPTERS)  # the families whose frozen layers load (read by the fit-time check)


class FrozenLayers(nn.Module):
    """The requested pretrained layers, frozen and always in eval mode. Gradients still flow to the input.

    Parameter names mirror the checkpoint's layers as `layer.{l-1}.…`, plus the family's shared modules
    (`relative_attention_bias.weight` for MPNet and T5, `norm.weight` for a decoder's final norm).
    """

    def __init__(self, config, indices: list[int], family: Family):
        super().__init__()
        self.config, self.family = config, family
        self.indices = list(indices)
        with torch.device("meta"):  # weights come from the checkpoint
            self.layer = nn.ModuleDict({str(i - 1): family.build_layer(config, i - 1) for i in self.indices})
            for name, module in family.shared_modules(config, self.indices).items():
                setattr(self, name, module)
        for name, module in family.runtime_modules(config).items():
            setattr(self, name, module)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenLayers":
        return super().train(False)

    def hold_in(self, dtype: torch.dtype) -> "FrozenLayers":
        """The frozen weight matrices converted to `dtype` (bf16 when training runs in bf16: half the bytes, and
        autocast casts them per op anyway). Vectors (norm weights, biases) and buffers keep theirs: the CPU's layer
        norm refuses a bf16 weight on a float32 input, and a rotary table in bf16 would move positions."""
        for parameter in self.parameters():
            if parameter.ndim >= 2:
                parameter.data = parameter.data.to(dtype)
        return self

    def parameter_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] = H_{first-1}, mask [B, T] bool (True = real token) -> H_{last} [B, T, D]."""
        return self.family.run(self, hidden, mask)

    def query_pass(self, index: int, queries: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor):
        """SynQT: layer `index` (0-based) on queries [B, n, D] over the keys/values of hidden [B, T, D]; returns
        (Q_out, h, hh), each [B, n, D] (see Family.query_pass)."""
        return self.family.query_pass(self, index, queries, hidden, mask)

    def stream_scale(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The scale [B, T, 1] the layers expect their input stream hidden [B, T, D] at, or None (see Family)."""
        return self.family.stream_scale(hidden)

    def head_input(self, pooled: torch.Tensor) -> torch.Tensor:
        """The pooled final state [B, D] as a linear head should read it (see Family)."""
        return self.family.head_input(pooled)

    def head_norm(self) -> nn.Module | None:
        """The norm after the last loaded layer in the backbone (post-LN output norm, or a decoder's final norm)."""
        return self.family.head_norm(self)


def _open_checkpoint(folder: str):
    """(name -> tensor, set of names) over the folder's weights, reading one tensor at a time where it can."""
    path = os.path.join(folder, "model.safetensors")
    if os.path.exists(path):
        from safetensors import safe_open

        handle = safe_open(path, framework="pt")
        return handle.get_tensor, set(handle.keys())
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):  # sharded: open each shard once, on first use
        import json

        from safetensors import safe_open

        shards = json.load(open(index_path))["weight_map"]
        handles = {}

        def get_tensor(key):
            shard = shards[key]
            if shard not in handles:
                handles[shard] = safe_open(os.path.join(folder, shard), framework="pt")
            return handles[shard].get_tensor(key)

        return get_tensor, set(shards)
    path = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return state.__getitem__, set(state)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def family_of(backbone_path: str) -> Family:
    """The family adapter of the backbone at `backbone_path` (reads config.json only); ValueError if unsupported."""
    return family_for(AutoConfig.from_pretrained(backbone_path).model_type)


def load_frozen_layers(backbone_path: str, indices: list[int], attn_implementation: str | None = None) -> FrozenLayers:
    """Build only layers `indices` (1-based) of the backbone at `backbone_path` and load their weights.

    Raises ValueError for an unsupported model_type (naming the supported ones) or indices outside 1..L."""
    family = family_of(backbone_path)
    config = layer_config(backbone_path)
    indices = sorted(set(indices))
    if not indices or indices[0] < 1 or indices[-1] > config.num_hidden_layers:
        raise ValueError(f"layer indices must lie in 1..{config.num_hidden_layers}, got {indices}")
    if family.default_attention == "eager" and attn_implementation not in (None, "eager"):
        raise ValueError(f"{config.model_type} layers support only eager attention")
    config._attn_implementation = attn_implementation or family.default_attention
    module = FrozenLayers(config, indices, family)
    get_tensor, keys = _open_checkpoint(backbone_path)
    state = {}
    for name in module.state_dict():
        tensor = family.checkpoint_tensor(name, keys, get_tensor)
        state[name] = tensor.float() if tensor.is_floating_point() else tensor
    module.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise RuntimeError("some layer tensors were not loaded from the checkpoint")
    module.requires_grad_(False)
    return module.eval()
