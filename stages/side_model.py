"""A saved side network: config.json + model.safetensors (+ metrics.json), loadable without pickle.

Frozen pretrained weights (modules under `frozen.`) are not saved: they are reloaded from the
backbone folder the cache records, so a model folder stays small.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cache.errors import InputError

from .methods import FeatureSpec, MethodConfig, build_model, config_from_dict

FROZEN_PREFIX = "frozen."


@dataclass
class SideModel:
    model: torch.nn.Module
    config: MethodConfig
    spec: FeatureSpec
    info: dict  # task, label names, cache key and extraction facts

    @property
    def layers(self) -> list[int]:
        return type(self.model).required_layers(self.config, self.spec)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights to keep (frozen layers excluded): snapshots never hold GPU memory."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
            if not k.startswith(FROZEN_PREFIX)}


def save_side_model(side: SideModel, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"method_config": side.config.to_dict(), "feature_spec": side.spec.to_dict(), **side.info}
    save_file(state if state is not None else trainable_state(side.model), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(payload, indent=2, sort_keys=True))


def load_side_model(folder: str | Path, backbone_path: str | None = None) -> SideModel:
    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise InputError(f"{folder} is not a saved side network (needs config.json and model.safetensors); "
                         "train one with `pipeline fit`")
    payload = json.loads((folder / "config.json").read_text())
    config = config_from_dict(payload.pop("method_config"))
    spec_data = payload.pop("feature_spec")
    if backbone_path:
        spec_data["backbone_path"] = backbone_path
    spec = FeatureSpec.from_dict(spec_data)
    model = build_model(config, spec)
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith(FROZEN_PREFIX)]
    if missing or unexpected:
        raise InputError(f"{folder}/model.safetensors does not fit method {config.method!r} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the folder is damaged or from another version")
    model.eval()
    return SideModel(model, config, spec, payload)
