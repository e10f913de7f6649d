"""`pipeline predict` on images: files, folders, or a table of paths, through the frozen image backbone and the
side network (no cache needed). The backbone runs at the image size the cache was made at (its key's `image_size`).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cache.errors import InputError
from cache.hidden_states import CachedHiddenStates

from ..extraction.extract import pixel_values
from ..runtime import CPU, Runtime
from .side_model import SideModel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_paths(images: list[str], table: str | None = None, column: str | None = None) -> list[Path]:
    """The images to predict: each --image file, every image file under each --image folder (sorted), and the
    `column` (default `image`) of a .csv/.tsv/.jsonl/.parquet table, relative to the table's folder.
    Raises InputError for a missing path, a folder without images, or a table without the column."""
    paths: list[Path] = []
    for name in images:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise InputError(f"--image {name}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
            paths += found
        elif path.exists():
            paths.append(path)
        else:
            raise InputError(f"--image {name}: no such file or folder")
    if table:
        from pipeline.data import _read_table

        if not Path(table).exists():
            raise InputError(f"--data {table}: file not found")
        frame, column = _read_table(Path(table)), column or "image"
        if column not in frame.columns:
            raise InputError(f"{table}: no column {column!r} of image paths; columns are: "
                             f"{', '.join(map(str, frame.columns))}; name it with --image-column")
        paths += [Path(table).parent / str(p) for p in frame[column]]
    return paths


@torch.no_grad()
def predict_images(side: SideModel, backbone, paths: list[Path], batch_size: int = 32,
                   runtime: Runtime | None = None) -> np.ndarray:
    """Logits [N, C] for N image files. Each image is decoded (InputError naming an undecodable file), processed
    as at extraction, run through the backbone in float32; features are rounded to the cache's dtype, as the side
    network saw them in training. Every token is real (mask all ones)."""
    from pipeline.data import Images

    runtime = runtime or CPU
    data = SimpleNamespace(images=Images(paths=[str(p) for p in paths]))
    side.model.eval().to(runtime.device)
    encoder = backbone.model.to(runtime.device)
    outputs = []
    for first in range(0, len(paths), batch_size):
        rows = np.arange(first, min(first + batch_size, len(paths)))
        hidden = encoder(pixel_values=runtime.to_device(pixel_values(backbone, data, rows)),
                         output_hidden_states=True).hidden_states
        features = torch.stack([hidden[i] for i in side.layers], 1)
        mask = torch.ones(features.shape[0], features.shape[2], dtype=torch.bool, device=features.device)
        states = CachedHiddenStates.encode(features, mask, side.info["dtype"])  # as text predict: the cache's rounding
        with runtime.autocast():
            logits = side.model(states, mask)
        outputs.append(logits.float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, side.spec.num_labels), np.float32)
