"""`--image-size S`: run an image backbone at S x S pixels instead of its processor's default.

The patch grid is (S / patch)^2 tokens plus CLS, so the cache costs (S / patch)^2 + 1 tokens x layers x width per
image: DINOv2-S/14 at 224 px is 257 tokens x 13 layers x 384 x 2 bytes (float16) = 2.6 MB before compression; at
112 px, 65 tokens (0.65 MB). Only DINOv2 is allowed: its embeddings always interpolate the position embeddings to
the grid (bicubic, as the model does at any size); other families here would need `interpolate_pos_encoding`.

The processor keeps its own resize-then-crop ratio: DINOv2's "shortest edge 256, crop 224" becomes "shortest edge
round(S * 256 / 224), crop S". The size lands in the cache key (`image_size`), and changes the processor hash and
the per-image token count (`max_length`), so a store made at one size is never read as another.
"""
from __future__ import annotations

from cachetune.cache.errors import InputError

from .families import family_facts



def patch_size(config) -> int:
    size = getattr(config, "patch_size", None)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def nearest_valid(size: int, patch: int) -> list[int]:
    """The multiples of `patch` either side of `size` (one if it is below the first)."""
    below, above = (size // patch) * patch, (size // patch + 1) * patch
    return [s for s in (below, above) if s >= patch]


def apply_image_size(backbone, size: int) -> None:
    """Set `backbone`'s image processor to produce `size` x `size` pixels and record it as `backbone.image_size`.

    Raises InputError for a text backbone, a family that cannot interpolate position embeddings, or a size that
    is not a positive multiple of the patch size (naming the nearest valid sizes).
    """
    if backbone.modality != "image":
        raise InputError(f"--image-size applies to image backbones; {backbone.path} is a text model: drop --image-size")
    config = backbone.model.config
    if not family_facts(config.model_type).interpolates_positions:  # stages/families/: DINOv2's record
        raise InputError(f"--image-size needs a backbone that interpolates its position embeddings (DINOv2); "
                         f"{config.model_type} runs at its own size only: drop --image-size")
    patch = patch_size(config)
    if size < patch or size % patch:
        nearest = " or ".join(str(s) for s in nearest_valid(size, patch))
        raise InputError(f"--image-size {size} is not a multiple of the patch size {patch}; use {nearest}")
    processor = backbone.image_processor
    crop = getattr(processor, "crop_size", None)
    shortest = (getattr(processor, "size", None) or {}).get("shortest_edge")
    if getattr(processor, "do_center_crop", False) and crop and shortest:
        processor.size = {"shortest_edge": round(size * shortest / crop["height"])}
        processor.crop_size = {"height": size, "width": size}
    else:
        processor.size = {"height": size, "width": size}
    backbone.image_size = size


def tokens_per_image(size: int, patch: int, extra_tokens: int = 1) -> int:
    """(size / patch)^2 patch tokens plus CLS (extra_tokens)."""
    return (size // patch) ** 2 + extra_tokens
