"""A saved side network: config.json + model.safetensors (+ metrics.json), loadable without pickle.

Frozen pretrained weights (modules under `frozen.`) are not saved: they are reloaded from the
backbone folder the cache records, so a model folder stays small.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from cachetune.cache.errors import InputError

from ..methods import FeatureSpec, MethodConfig, build_model, config_from_dict
from ..methods.support import unsupported_reason
from .target_scale import TargetScale

FROZEN_PREFIX = "frozen."


@dataclass
class SideModel:
    model: torch.nn.Module
    config: MethodConfig
    spec: FeatureSpec
    info: dict  # task, label names, cache key and extraction facts; regression: the target scale (target_scale.py)

    @property
    def layers(self) -> list[int]:
        return type(self.model).required_layers(self.config, self.spec)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights to keep (frozen layers excluded): snapshots never hold GPU memory."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
            if not k.startswith(FROZEN_PREFIX)}


def save_side_model(side: SideModel, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weights = save(state if state is not None else trainable_state(side.model))
    (folder / "model.safetensors").write_bytes(weights)  # through Python, so a full disk is an OSError
    payload = {"method_config": side.config.to_dict(), "feature_spec": side.spec.to_dict(), **side.info,
               "model_sha256": file_sha256(folder / "model.safetensors")}
    (folder / "config.json").write_text(json.dumps(payload, indent=2, sort_keys=True))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


INFO_KEYS = ("task", "label_names", "cache_key", "max_length", "dtype")


def load_side_model(folder: str | Path, backbone_path: str | None = None) -> SideModel:
    """The side network saved in `folder`; `backbone_path` replaces the backbone folder it recorded (moved since).
    A damaged or edited config.json or model.safetensors is an InputError that names the file, and so is a
    recorded backbone folder the method needs but cannot read (the fix: pass --backbone DIR)."""
    folder = Path(folder)
    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    if not config_file.exists() or not weights_file.exists():
        raise InputError(f"{folder} is not a saved side network (needs config.json and model.safetensors); "
                         "train one with `pipeline fit`")
    try:
        payload = json.loads(config_file.read_text())
        if "baseline" in payload:
            raise InputError(f"{folder} holds a `pipeline baseline` model; predict and evaluate take side networks "
                             "from `pipeline fit`")
        config = config_from_dict(payload.pop("method_config"))
        spec_data = payload.pop("feature_spec")
        if backbone_path:
            spec_data["backbone_path"] = backbone_path
        spec = FeatureSpec.from_dict(spec_data)
        missing_info = [key for key in INFO_KEYS if key not in payload]
        if missing_info:
            raise KeyError(", ".join(missing_info))
        TargetScale.of_info(payload)  # absent (saved before it was recorded): the identity
        cannot = unsupported_reason(config.method, spec.backbone_path)
        if cannot:  # the check `fit` makes, before the frozen layers are read from a folder that may have moved
            raise InputError(f"{folder} (method {config.method!r}) cannot be loaded: {cannot}")
        model = build_model(config, spec)
    except (InputError, OSError):  # an unreadable file is an OS error (exit 3), not a damaged one
        raise
    except Exception as error:  # truncated JSON, a removed key, a value of the wrong type
        raise InputError(f"{config_file} is damaged or was edited ({_reason(error)}); fit the model again "
                         "or restore the folder") from None
    expected = payload.pop("model_sha256", None)
    if expected is not None and file_sha256(weights_file) != expected:
        raise InputError(f"{weights_file} is damaged or was edited (its sha256 differs from the one config.json "
                         "recorded); fit the model again or restore the folder")
    try:
        state = load_file(str(weights_file))
    except Exception as error:
        raise InputError(f"{weights_file} is damaged ({_reason(error)}); fit the model again or restore the folder") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ from what config.json describes
        culprit = f"{config_file} was edited" if expected else f"{weights_file} and {config_file} do not match"
        raise InputError(f"{culprit} ({_reason(error)}): the folder is damaged; fit the model again or restore "
                         "the folder") from None
    missing = [k for k in missing if not k.startswith(FROZEN_PREFIX)]
    if missing or unexpected:
        raise InputError(f"{weights_file} does not fit method {config.method!r} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the folder is damaged or from another version")
    model.eval()
    return SideModel(model, config, spec, payload)


def _reason(error: Exception) -> str:
    text = " ".join(line.strip() for line in str(error).strip().splitlines())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__
