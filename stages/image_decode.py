"""One image file to the PIL image a model gets, as an image viewer shows it (Pillow's defaults alone do not):

- upright: the EXIF orientation tag applied (Pillow's ImageOps.exif_transpose), so a phone photo stored sideways
  reaches the model the way every viewer shows it;
- 16-bit: pixels of modes I;16, I;16B, ... scaled to 8 bits by value / 257 (their 0..65535 range), where
  `.convert` clips them at 255 and a typical 16-bit PNG or TIFF comes out flat white;
- wide: 32-bit integer (I) and float (F) pixels have no range worth trusting, so floats within 0..1 are scaled
  by x 255 (the float convention) and anything else from the image's own min..max to 0..255;
- transparent: images with transparent pixels (RGBA, LA, PA, or a transparent palette entry or colour) are
  composited onto white (BACKGROUND, as a page shows them), so the colour a file keeps under alpha 0 never counts;
- reduced: a JPEG over Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is decoded at 1/2, 1/4 or 1/8
  scale (Image.draft: the full-size pixels are never in memory; the model sees it resized anyway); any other
  format that large is an InputError naming the fix.

`decode_image` returns which of these it did, so that callers count them and say so once (`correction_notes`).
"""
from __future__ import annotations

import warnings

import numpy as np

from cachetune.cache.errors import InputError

UPRIGHT, SIXTEEN_BIT, WIDE, TRANSPARENT, REDUCED = "upright", "16-bit", "wide", "transparent", "reduced"
BACKGROUND = (255, 255, 255)  # white, behind transparent pixels
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def open_image(path) -> tuple[object, bool]:
    """(the opened PIL image: header read, pixels not yet; whether it will decode reduced). Pillow's Image.open,
    except that a JPEG over the decompression-bomb limit gets a draft scale that brings it under the limit.
    Raises InputError for a missing or unreadable file, and for any other image over the limit."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # up to twice the limit Pillow decodes the image in full and only warns
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path), False
    except Image.DecompressionBombError as error:
        return _reduced_jpeg(path, error), True
    except Exception as error:  # missing, not an image
        raise InputError(unreadable(path, error)) from None


def _reduced_jpeg(path, error: Exception):
    from PIL import Image, JpegImagePlugin

    limit = Image.MAX_IMAGE_PIXELS
    try:
        image = JpegImagePlugin.JpegImageFile(path)  # Image.open refuses before the draft could shrink it
    except Exception:
        raise InputError(f"image {path} is too large to decode safely ({first_line(error).rstrip('.')}); shrink it (the model "
                         "sees it resized anyway) or save it as JPEG, which decodes at a reduced scale") from None
    width, height = image.size
    for scale in (2, 4, 8):
        if -(-width // scale) * -(-height // scale) <= limit:
            image.draft(image.mode, (width // scale, height // scale))
            return image
    image.close()
    raise InputError(f"image {path} is {width}x{height} pixels, over Pillow's decompression-bomb limit of {limit} "
                     "pixels even at 1/8 scale; shrink it")


def unreadable(path, error: BaseException) -> str:
    return f"cannot read image {path}: {first_line(error)}; replace or remove the file"


def decode_image(path, mode: str = "RGB") -> tuple[object, set[str]]:
    """(image `path` decoded as a viewer shows it (see the module) in PIL `mode`, "RGB" or "L"; the corrections made:
    a subset of UPRIGHT, SIXTEEN_BIT, WIDE, TRANSPARENT, REDUCED). Raises InputError for a file that cannot be read
    (missing, truncated, not an image) or is too large to decode safely."""
    opened, reduced = open_image(path)
    done = {REDUCED} if reduced else set()
    try:
        with opened:
            return as_shown(opened, done).convert(mode), done
    except InputError:
        raise
    except Exception as error:  # truncated, corrupt
        raise InputError(unreadable(path, error)) from None


def as_shown(image, done: set[str]):
    """The loaded image upright, in 8 bits and without transparency; adds the corrections made to `done`."""
    from PIL import ExifTags, Image, ImageOps

    image.load()
    if image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):  # the tags exif_transpose acts on
        done.add(UPRIGHT)
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        done.add(SIXTEEN_BIT)
        return eight_bit(np.asarray(image) / 257.0)
    if image.mode in ("I", "F"):
        done.add(WIDE)
        return eight_bit(stretched(np.asarray(image, dtype=np.float64), image.mode == "F"))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        image = image.convert("RGBA")
        if image.getextrema()[3][0] < 255:
            done.add(TRANSPARENT)
            image = Image.alpha_composite(Image.new("RGBA", image.size, BACKGROUND + (255,)), image)
        return image.convert("RGB")
    return image


def stretched(values: np.ndarray, is_float: bool) -> np.ndarray:
    """32-bit integer or float pixels on 0..255: floats within 0..1 x 255, else the finite min..max to 0..255
    (a constant image gives 0; nan counts as the min, +-inf as the max or min)."""
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if is_float and low >= 0.0 and high <= 1.0:
        return values * 255.0
    return (values - low) * (255.0 / (high - low) if high > low else 0.0)


def eight_bit(values: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


NOTES = {
    UPRIGHT: "{n} image{s} carried an EXIF orientation tag: turned upright, as viewers show them",
    SIXTEEN_BIT: "{n} 16-bit image{s} scaled to 8 bits (value / 257) rather than clipped at 255",
    WIDE: "{n} 32-bit integer or float image{s} scaled to 8 bits (floats within 0..1: x 255; otherwise each "
          "image's own min..max to 0..255)",
    TRANSPARENT: "{n} image{s} with transparent pixels composited onto white",
    REDUCED: "{n} JPEG image{s} over Pillow's decompression-bomb limit decoded at 1/2, 1/4 or 1/8 scale",
}


def correction_notes(counts: dict[str, int], where: str) -> list[str]:
    """One 'note: WHERE: ...' line per correction made to one or more images (counts: correction -> images)."""
    return [f"note: {where}: " + NOTES[kind].format(n=counts[kind], s="" if counts[kind] == 1 else "s")
            for kind in NOTES if counts.get(kind)]
