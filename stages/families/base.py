"""What every backbone family adapter answers: how to build and load a few of its layers, run them as the backbone
does (masks, positions, shared state), run one of them on SynQT's query tokens only, and build LST's side block.

A family adapter holds no weights: `FrozenLayers` (stages/backbone_layers.py) owns the modules and asks its family.
"""
from __future__ import annotations

import torch
from torch import nn


def bidirectional_mask(config, hidden: torch.Tensor, mask: torch.Tensor):
    """The attention mask an encoder builds from mask [B, T] bool (True = real token) for hidden [B, T, D].

    Without the skip check where transformers has it: the check tests `mask.all()` in Python, a host sync at every
    step on a GPU."""
    import inspect

    from transformers.masking_utils import create_bidirectional_mask

    no_skip = ({"allow_is_bidirectional_skip": False}
               if "allow_is_bidirectional_skip" in inspect.signature(create_bidirectional_mask).parameters else {})
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask.long(), **no_skip)


class Family:
    """One backbone family. Subclasses set `model_types` and override what differs from an encoder.

    Module names in a `FrozenLayers`: `layer.{i}.…` for backbone layer i + 1 (0-based i, as in the checkpoint), plus
    the family's shared modules (`shared_modules`: weights read from the checkpoint, such as MPNet's and T5's
    relative position bias or a decoder's final norm) and runtime modules (`runtime_modules`: no checkpoint weights,
    such as rotary tables computed from the config).
    """

    model_types: tuple[str, ...] = ()
    default_attention = "sdpa"  # what AutoModel picks; "eager" when the family has nothing else
    # What stage one, the baselines and the methods ask of a family, in this one record:
    causal = False  # does the backbone mask future tokens (decoders): pooling `last`, positions counted over real tokens
    pooling: str | None = None  # the default pooling; None: the model folder's own (sentence-transformers), else cls
    towers: dict[str, str] = {}  # a two-tower checkpoint's model_type -> the class of the tower used (CLIPVisionModel);
    # its layers are built from config.vision_config
    encoder_class: str | None = None  # an encoder-decoder: the transformers class of its encoder (T5EncoderModel)
    interpolates_positions = False  # the forward interpolates position embeddings to any grid (--image-size)
    lora_targets: tuple[str, ...] = ("query", "value")  # the LoRA baseline's attention query and value projections
    lora_fan_in_fan_out = False  # the targets are Conv1D ([in, out] weights: GPT-2)
    frozen_layers = True  # the layers load as FrozenLayers (SHERL, SynQT); False: a record of facts only
    wide_stream = False  # the residual stream is far from unit scale at every token (Gemma 3): see RotaryDecoder

    def build_layer(self, config, index: int) -> nn.Module:
        """Backbone layer `index` (0-based) with random weights; called on the meta device."""
        raise NotImplementedError

    def shared_modules(self, config, indices: list[int]) -> dict[str, nn.Module]:
        """Modules outside the layers whose weights the given layers need (1-based indices); on the meta device."""
        return {}

    def runtime_modules(self, config) -> dict[str, nn.Module]:
        """Modules with no checkpoint weights (built on the real device; their buffers come from the config)."""
        return {}

    def checkpoint_tensor(self, name: str, keys: set[str], get_tensor) -> torch.Tensor:
        """The checkpoint tensor for module parameter `name`; KeyError when missing, ValueError when ambiguous."""
        raise NotImplementedError

    def run(self, frozen, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] = H_{first - 1}, mask [B, T] bool (True = real) -> H_last [B, T, D], as the backbone."""
        raise NotImplementedError

    def query_pass(self, frozen, index: int, queries: torch.Tensor, hidden: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SynQT's query-only pass through layer `index` (0-based): queries [B, n, D] attend to the keys and values
        of hidden [B, T, D] (= H_index) at real tokens; returns (Q_out, h, hh), each [B, n, D]: the layer's output at
        the queries, its attention branch and its FFN branch (before their residual sums)."""
        raise NotImplementedError(f"synqt does not support {type(self).__name__}")

    def head_norm(self, frozen) -> nn.Module | None:
        """The norm that follows the last layer in the backbone, if loaded (SynQT copies it); None: a fresh one."""
        return None

    def stream_scale(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The scale [B, T, 1] of the residual stream hidden [B, T, D] that a frozen layer expects its input at, which
        whatever a side network feeds into the layer (SHERL's E') must match; no gradient. None:
        the layers' input is already normalised (post-LN encoders: unit scale)."""
        return None

    def head_input(self, pooled: torch.Tensor) -> torch.Tensor:
        """The pooled final state [B, D] as a side network's linear head reads it: as it is, unless the family's final
        state is far from unit scale (see RotaryDecoder)."""
        return pooled

    def side_block(self, config, width: int, r: int, dropout: float) -> nn.Module:
        """LST's side block: this family's layer shrunk to `width` (ffn / r); forward(x [B, T, h], mask [B, T])."""
        raise NotImplementedError


def find_key(candidates: list[str], keys: set[str], exclude: tuple[str, ...] = ()) -> str | None:
    """The one checkpoint key equal to a candidate or ending in '.' + candidate (a model prefix such as `bert.` or
    `model.`), skipping keys that contain any `exclude` part; ValueError when several match."""
    found = sorted({key for key in keys for want in candidates if (key == want or key.endswith("." + want))
                    and not any(part in key for part in exclude)})
    if len(found) > 1:
        raise ValueError(f"checkpoint has several keys for {candidates[0]!r}: {found}")
    return found[0] if found else None


def key_positions(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool -> [B, T] long: 0 .. len - 1 over the real tokens, whichever side the padding is on (padding
    before the first real token gets 0, after the last one keeps counting): what the backbone saw at extraction."""
    first = torch.where(mask.any(1), mask.long().argmax(1), 0)
    return (torch.arange(mask.shape[1], device=mask.device)[None] - first[:, None]).clamp_min(0)


def query_positions(mask: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T] bool -> [B, n]: n query tokens placed right after each sample's last real token (len, len + 1, ...)."""
    return mask.sum(1, keepdim=True) + torch.arange(n, device=mask.device)[None]
