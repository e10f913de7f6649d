"""What every side network shares: the cache's shape facts, the config base class, pooling."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class FeatureSpec:
    """Facts about the cached features a side network is built for."""

    hidden_size: int  # D
    num_layers: int  # L; hidden_states has L + 1 entries, 0 = embeddings
    num_labels: int  # classes, or 1 for regression
    pooling: str  # "cls", "mean" or "last" (the last real token: causal decoders)
    backbone_path: str  # local folder of the backbone, for methods that load frozen layers
    cached_layers: tuple[int, ...]  # hidden_states indices present in the cache
    model_type: str = ""  # the backbone's config.model_type (its family: stages/families), "" when not known

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureSpec":
        return cls(**{**data, "cached_layers": tuple(data["cached_layers"])})


@dataclass
class MethodConfig:
    """Base of every method's options. Subclasses set `method` and add fields with defaults."""

    method: ClassVar[str] = ""
    may_be_zero: ClassVar[tuple[str, ...]] = ("drop_every", "late_layers")  # counts where 0 means "none"

    def __post_init__(self):
        """Counts (r, widths, queries, ...) must be >= 1 and probabilities (dropout, drop_path) in [0, 1): a bad
        value is a ValueError naming the option, raised before any model is built."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and value < (0 if field.name in self.may_be_zero else 1):
                raise ValueError(f"option {field.name}={value} for method {self.method!r} must be at least "
                                 f"{0 if field.name in self.may_be_zero else 1}")
            if field.name in ("dropout", "drop_path") and not 0 <= value < 1:
                raise ValueError(f"option {field.name}={value} for method {self.method!r} must be in [0, 1)")

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        data = dict(data)
        name = data.pop("method", cls.method)
        if name != cls.method:
            raise ValueError(f"config is for method {name!r}, not {cls.method!r}")
        return cls(**data)


def side_width(hidden_size: int, r: int) -> int:
    """h = D / r, the width of a side network; r must divide D."""
    if r < 1 or hidden_size % r:
        raise ValueError(f"r={r} does not divide the hidden size {hidden_size}")
    return hidden_size // r


def pool(x: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, T, D] -> [B, D] by the first token (cls), the mean over real tokens (mean), or the last real token (last).

    `last` is what transformers' `*ForSequenceClassification` does for decoders: in a causal model only the last
    token has seen the whole text. mask [B, T] bool; cached batches hold real tokens first (padding on the right),
    but the index is taken from the mask so either padding side works.
    """
    if mode == "cls":
        return x[:, 0]
    if mode == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).amax(1).clamp_min(0)  # [B]
        return x[torch.arange(x.shape[0], device=x.device), last]
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def rms_normalize(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[..., D] -> x / sqrt(mean(x^2) + eps) per token and layer, no parameters (RMSNorm without its weight, Zhang &
    Sennrich 2019): what a pre-norm backbone layer does to its input before using it. Padded positions stay finite.

    Why: decoder residual streams carry massive activations (SmolLM2-135M, measured on movies: max |x| 27,296 in
    H_12..H_28, median |x| 1.8-10.5), and they sit on the first token (the attention sink; every other token of H_12
    and H_20 stays below ~175). Measured with linear probes on single layers (bench/rms_norm_probe.py, 600 training
    samples, 3 seeds, loaded machine): mean-pooled H_6 / H_12 gain +2.5 / +4.3 points with it, last-token ones change
    by -1.7..+0.7 (noise), so methods keep it off by default (last-token pooling never sees the first token). Full
    side networks with and without it were not measured: `python bench/rms_norm.py` does it."""
    return torch.nn.functional.rms_norm(features, features.shape[-1:], eps=eps)


def per_layer_norm(x: torch.Tensor, norms) -> torch.Tensor:
    """[B, n, T, h]: slice l through LayerNorm norms[l] (all of one eps), in one call."""
    normalised = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=norms[0].eps)
    return (normalised * torch.stack([norm.weight for norm in norms])[:, None, :]
            + torch.stack([norm.bias for norm in norms])[:, None, :])
