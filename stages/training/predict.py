"""Predictions on raw inputs: the frozen backbone and the side network, no cache needed."""
from __future__ import annotations

import numpy as np
import torch

from cache.errors import InputError

from ..backbones import load_backbone
from ..extraction.extract import preprocessor_sha256
from ..runtime import CPU, Runtime
from .side_model import SideModel


def load_matching_backbone(side: SideModel):
    key = side.info["cache_key"]
    backbone = load_backbone(side.spec.backbone_path, image_size=key.get("image_size"))
    if backbone.weights_sha256 != key["backbone_weights_sha256"] or preprocessor_sha256(backbone) != key["tokenizer_sha256"]:
        raise InputError(f"the backbone at {side.spec.backbone_path} is not the one this model was trained on "
                         "(weights or tokenizer differ); pass --backbone with the original folder")
    return backbone


@torch.no_grad()
def predict_texts(side: SideModel, backbone, texts: list[str], pairs: list[str] | None = None,
                  batch_size: int = 32, runtime: Runtime | None = None) -> np.ndarray:
    """Logits [N, C]. Features are rounded to the cache's dtype, as the side network saw them in training; the
    backbone runs in float32, as stage one ran it."""
    runtime = runtime or CPU
    dtype = torch.float16 if side.info["dtype"] == "float16" else torch.float32
    backbone.tokenizer.padding_side = "right"
    outputs = []
    side.model.eval().to(runtime.device)
    encoder = backbone.model.to(runtime.device)
    for first in range(0, len(texts), batch_size):
        batch = backbone.tokenizer(texts[first:first + batch_size], pairs[first:first + batch_size] if pairs else None,
                                   truncation=True, max_length=side.info["max_length"], padding=True, return_tensors="pt")
        batch = {name: runtime.to_device(tensor) for name, tensor in batch.items()}
        hidden = encoder(**batch, output_hidden_states=True).hidden_states
        features = torch.stack([hidden[i] for i in side.layers], 1).to(dtype).float()
        mask = batch["attention_mask"].bool()
        features = features * mask[:, None, :, None]  # padded positions are zeros, as in the cache reader
        with runtime.autocast():
            logits = side.model(features, mask)
        outputs.append(logits.float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, side.spec.num_labels), np.float32)


def logits_to_records(logits: np.ndarray, task: str, label_names: list[str]) -> list[dict]:
    if task == "regression":
        return [{"prediction": float(v)} for v in logits.reshape(-1)]
    probabilities = torch.softmax(torch.from_numpy(logits), -1).numpy()
    return [{"label": label_names[int(p.argmax())], "probabilities": dict(zip(label_names, map(float, p)))}
            for p in probabilities]
