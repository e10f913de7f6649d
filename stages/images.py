"""Images as stage one and predict read them: lazily, by index, from files or one uint8 array."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from cachetune.cache.errors import InputError

from .image_decode import correction_notes, decode_image


class Images:
    """A lazy, indexable image collection: file paths, or one uint8 array [N, H, W] or [N, H, W, C].

    `load(i, mode)` decodes image i as a PIL image in `mode` ("RGB", or "L" for one-channel models), so
    grayscale images reach processors that expect three channels as RGB. Files decode as a viewer shows them
    (stages/image_decode.py: upright, 8 bits, transparency on white); `corrected` records which images needed
    which correction, and `notes` says so in one line per correction.
    """

    def __init__(self, paths: list[str] | None = None, array: np.ndarray | None = None):
        if (paths is None) == (array is None):
            raise ValueError("give either paths or an array")
        self.paths = [str(p) for p in paths] if paths is not None else None
        self.array = np.ascontiguousarray(array, dtype=np.uint8) if array is not None else None
        self.corrected: dict[str, set[int]] = {}  # correction (image_decode) -> indices of the images it changed

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.array)

    def take(self, rows) -> "Images":
        """The images at positions `rows`, in that order."""
        if self.array is not None:
            return Images(array=self.array[rows])
        return Images(paths=[self.paths[i] for i in rows])

    def load(self, index: int, mode: str = "RGB"):
        from PIL import Image

        if self.array is not None:
            return Image.fromarray(self.array[index]).convert(mode)
        image, corrections = decode_image(self.paths[index], mode)
        self.record({kind: [index] for kind in corrections})
        return image

    def record(self, corrected: dict[str, list[int]]) -> None:
        """Adds images (by index) to those each correction changed; an image decoded twice counts once."""
        for kind, indices in corrected.items():
            self.corrected.setdefault(kind, set()).update(indices)

    def notes(self, where: str) -> list[str]:
        """One 'note: WHERE: ...' line per correction the images decoded so far needed (image_decode)."""
        return correction_notes({kind: len(indices) for kind, indices in self.corrected.items()}, where)

    def update_digest(self, digest) -> None:
        """Pixel bytes (array) or file bytes (paths), in order: the same images give the same fingerprint."""
        if self.array is not None:
            digest.update(json.dumps(["array", list(self.array.shape)]).encode())
            digest.update(self.array.tobytes())
            return
        for path in self.paths:
            try:
                data = Path(path).read_bytes()
            except OSError as error:
                raise InputError(f"cannot read image {path}: {error.strerror or error}") from None
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what a folder is searched for


def image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(the image files under `folder`, the other files there); hidden ones (.DS_Store, .git/) are in neither."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES], [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]


def skipped_files_note(source, skipped: list[Path]) -> str:
    """'note: SOURCE: skipped 3 files that are not images (.heic 2, no suffix 1): ...', suffixes most frequent first."""
    counts = Counter(p.suffix.lower() or "no suffix" for p in skipped)
    kinds = ", ".join(f"{suffix} {count}" for suffix, count in counts.most_common())
    files = f"{len(skipped)} files that are not images" if len(skipped) > 1 else "1 file that is not an image"
    return (f"note: {source}: skipped {files} ({kinds}): cachetune reads {' '.join(IMAGE_SUFFIXES)}; convert the "
            "others (e.g. HEIC to JPEG) to use them")


def image_paths(images: list[str], log=None) -> list[Path]:
    """The images to predict: each file, and every image file under each folder (sorted; `log` gets a note on the
    folder's other files, skipped). Raises InputError for a missing path or a folder without images."""
    paths: list[Path] = []
    for name in images:
        path = Path(name)
        if path.is_dir():
            found, others = image_files(path)
            if not found:
                raise InputError(f"--image {name}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
            if others and log is not None:
                log(skipped_files_note(path, others))
            paths += found
        elif path.exists():
            paths.append(path)
        else:
            raise InputError(f"--image {name}: no such file or folder")
    return paths
