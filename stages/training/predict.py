"""Predictions on raw inputs: the frozen backbone and the side network, no cache needed."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from cachetune.cache.errors import InputError
from cachetune.cache.hidden_states import CachedHiddenStates

from ..backbones import causal_position_ids, load_backbone
from ..extraction.extract import pixel_values, preprocessor_sha256
from ..extraction.tokenizing import single_prefix, trained_length_note
from ..images import Images
from ..runtime import CPU, Runtime
from .side_model import SideModel
from .target_scale import TargetScale


def load_matching_backbone(side: SideModel):
    key = side.info["cache_key"]
    if key.get("reduce"):  # the basis lives in the store, not in the model folder
        raise InputError(f"this side network was trained on a projected cache ({key['reduce']}); predict does not "
                         "project raw features yet: predict with a model trained on a float16, int8 or fp8 cache")
    backbone = load_backbone(side.spec.backbone_path, image_size=key.get("image_size"))
    trained_type, given_type = key.get("model_type"), backbone.model.config.model_type
    if trained_type and trained_type != given_type:
        raise InputError(f"{side.spec.backbone_path} is a {given_type} model, but this side network was trained on "
                         f"features of a {trained_type} backbone; pass --backbone with the folder the cache was extracted with")
    if backbone.weights_sha256 != key["backbone_weights_sha256"] or preprocessor_sha256(backbone) != key["tokenizer_sha256"]:
        raise InputError(f"the backbone at {side.spec.backbone_path} is not the one this model was trained on "
                         "(weights or tokenizer differ); pass --backbone with the original folder")
    return backbone


@torch.no_grad()
def predict_logits(side: SideModel, backbone, inputs: list, pairs: list[str] | None = None, batch_size: int = 32,
                   runtime: Runtime | None = None, log=None) -> np.ndarray:
    """Logits [N, C] for N raw inputs: texts (with optional second texts `pairs`) for a text model, image file paths
    for an image model. One path for both: the backbone runs at the precision stage one ran it in (the store key's
    `precision`: fp32 unless extracted in bf16 or fp16), at the cache's max length or image size, and its hidden
    states reach the side network in the cache's encoding (CachedHiddenStates.encode: the rounding it was trained on).
    Image files decode as at extraction (Images.load); `log` gets one note per decode correction they needed, or
    one on texts cut at the max length the model was trained at.
    InputError when this device cannot run that precision (fp16 on a CPU) or an image cannot be read."""
    runtime = runtime or CPU
    precision = side.info["cache_key"].get("precision", "fp32")
    try:
        stage_one = Runtime.resolve(str(runtime.device), precision)
    except InputError as error:
        raise InputError(f"this model's cache was extracted in {precision}, which {runtime.device} cannot run ({error}); "
                         "predict with --device cuda") from None
    side.model.eval().to(runtime.device)
    encoder = backbone.model.to(runtime.device)
    images = Images(paths=[str(p) for p in inputs]) if backbone.modality == "image" else None
    if images is None and log is not None:
        note = trained_length_note(backbone.tokenizer, list(inputs), list(pairs) if pairs else None,
                                   side.info["max_length"])
        if note:
            log(note)
    outputs = []
    for first in range(0, len(inputs), batch_size):
        chunk = slice(first, first + batch_size)
        with stage_one.autocast():
            if images is not None:
                hidden, mask = _image_forward(encoder, backbone, images, range(len(inputs))[chunk], runtime)
            else:
                hidden, mask = _text_forward(encoder, backbone, inputs[chunk], pairs[chunk] if pairs else None, side,
                                             runtime)
        states = CachedHiddenStates.encode(torch.stack([hidden[i] for i in side.layers], 1), mask, side.info["dtype"])
        with runtime.autocast():
            outputs.append(side.model(states, mask).float())
    if images is not None and log is not None:
        for note in images.notes("predict"):
            log(note)
    return torch.cat(outputs).cpu().numpy() if outputs else np.zeros((0, side.spec.num_labels), np.float32)


def _text_forward(encoder, backbone, texts, pairs, side: SideModel, runtime: Runtime):
    """(hidden_states, mask [B, T]) of texts, tokenized as at extraction (right padding, the cache's max length)."""
    backbone.tokenizer.padding_side = "right"
    texts, _ = single_prefix(backbone.tokenizer, texts)  # a leading BOS/CLS string given once, as at extraction
    batch = backbone.tokenizer(texts, list(pairs) if pairs else None, truncation=True,
                               max_length=side.info["max_length"], padding=True, return_tensors="pt")
    if backbone.causal:  # positions over real tokens, as in extraction
        batch["position_ids"] = causal_position_ids(batch["attention_mask"])
    batch = {name: runtime.to_device(tensor) for name, tensor in batch.items()}
    return encoder(**batch, output_hidden_states=True).hidden_states, batch["attention_mask"].bool()


def _image_forward(encoder, backbone, images: Images, rows, runtime: Runtime):
    """(hidden_states, mask [B, T]) of images `rows`, processed as at extraction; every token is real."""
    hidden = encoder(pixel_values=runtime.to_device(pixel_values(backbone, SimpleNamespace(images=images), rows)),
                     output_hidden_states=True).hidden_states
    return hidden, torch.ones(hidden[0].shape[:2], dtype=torch.bool, device=hidden[0].device)


def predict_texts(side: SideModel, backbone, texts: list[str], pairs: list[str] | None = None,
                  batch_size: int = 32, runtime: Runtime | None = None, log=None) -> np.ndarray:
    """Logits [N, C] for N texts (predict_logits; `log` gets a note on texts cut at the trained max length)."""
    return predict_logits(side, backbone, texts, pairs, batch_size, runtime, log)


def predict_images(side: SideModel, backbone, paths: list, batch_size: int = 32,
                   runtime: Runtime | None = None, log=None) -> np.ndarray:
    """Logits [N, C] for N image files (predict_logits; `log` gets its decode notes)."""
    return predict_logits(side, backbone, paths, None, batch_size, runtime, log)


def logits_to_records(logits: np.ndarray, info: dict) -> list[dict]:
    """One record per row of logits [N, C] from a model whose info (SideModel.info) gives its task, label names and
    target scale: {"prediction"} in the data's units for regression, {"label", "probabilities"} for classes."""
    task, label_names = info["task"], info["label_names"]
    if task == "regression":
        return [{"prediction": float(v)} for v in TargetScale.of_info(info).restore(logits).reshape(-1)]
    probabilities = torch.softmax(torch.from_numpy(logits), -1).numpy()
    return [{"label": label_names[int(p.argmax())], "probabilities": dict(zip(label_names, map(float, p)))}
            for p in probabilities]
