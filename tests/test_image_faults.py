"""Real users' image files decode as a viewer shows them (stages/image_decode.py), in stage one and in predict:
the EXIF orientation applied, 16-bit and float pixels scaled to 8 bits by their range, transparent pixels on white,
an image over Pillow's decompression-bomb limit reduced (JPEG) or refused in one line; each correction said once."""
from __future__ import annotations

import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from cachetune.cache.errors import InputError
from cachetune.cache.layout import key_sha256
from cachetune.stages.image_decode import REDUCED, SIXTEEN_BIT, TRANSPARENT, UPRIGHT, WIDE, decode_image
from cachetune.stages.images import Images
from tests.test_extract import assert_one_line_error, cli
from tests.test_vision import make_backbone, train, write_pngs

T = Image.Transpose
# EXIF orientation -> how the upright picture is stored, so that a viewer's turn (exif_transpose) undoes it
STORED = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
          7: T.TRANSVERSE, 8: T.ROTATE_270}


def upright(width=12, height=8, seed=0) -> Image.Image:
    """An asymmetric RGB picture: every turn or flip of it differs from it."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def save_turned(picture: Image.Image, path, orientation: int, **options):
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    picture.transpose(STORED[orientation]).save(path, exif=exif, **options)
    return path


def pixels(path, mode="RGB") -> np.ndarray:
    return np.asarray(decode_image(path, mode)[0], dtype=np.int16)


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_an_exif_orientation_decodes_upright(orientation, tmp_path):
    picture = upright()
    image, done = decode_image(save_turned(picture, tmp_path / "photo.png", orientation))
    assert image.size == picture.size and done == {UPRIGHT}
    np.testing.assert_array_equal(np.asarray(image), np.asarray(picture))


def test_a_phone_jpeg_tagged_6_decodes_like_its_upright_jpeg(tmp_path):
    smooth = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    smooth[:8, :8] = 0  # a dark corner: sideways it would sit elsewhere
    picture = Image.fromarray(smooth)
    picture.save(tmp_path / "upright.jpg", quality=95)
    turned = save_turned(picture, tmp_path / "turned.jpg", 6, quality=95)
    assert Image.open(turned).size == (48, 64)  # stored sideways
    difference = np.abs(pixels(turned) - pixels(tmp_path / "upright.jpg"))
    assert difference.mean() < 3, difference.mean()


# ---------------------------------------------------------------- 16-bit and float pixels


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_16_bit_gradient_decodes_to_an_8_bit_gradient(suffix, tmp_path):
    values = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    path = tmp_path / f"scan{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    image, done = decode_image(path, "L")
    assert done == {SIXTEEN_BIT}
    decoded = np.asarray(image, dtype=np.int16)
    assert len(np.unique(decoded)) > 200  # not flat white
    assert np.abs(decoded - values / 257).max() <= 1
    rgb = pixels(path)
    assert (rgb == decoded[..., None]).all()


def test_a_big_endian_16_bit_image_decodes_by_its_values():
    from cachetune.stages.image_decode import as_shown

    values = np.arange(0, 65535, 257 * 3, dtype=np.uint16).reshape(5, -1)
    image = Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())
    done = set()
    assert (np.asarray(as_shown(image, done)) == values // 257).all() and done == {SIXTEEN_BIT}


def test_float_and_32_bit_images_scale_by_their_range(tmp_path):
    unit = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(30, 40)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    image, done = decode_image(tmp_path / "unit.tif", "L")
    assert done == {WIDE} and np.abs(np.asarray(image, dtype=np.float64) - unit * 255).max() <= 0.5
    counts = (1000 + 4000 * unit).astype(np.int32)  # a 32-bit integer image: its own min..max to 0..255
    Image.fromarray(counts).save(tmp_path / "counts.tif")
    decoded = pixels(tmp_path / "counts.tif", "L")
    assert decoded.min() == 0 and decoded.max() == 255
    assert np.abs(decoded - (counts - 1000) / 4000 * 255).max() <= 1


# ---------------------------------------------------------------- transparency


def two_transparent(mode: str, folder):
    """The same 12 x 8 picture twice in `mode` (RGBA, LA, or P with a transparent palette entry), its left 4 columns
    fully transparent, differing only in the colour those transparent pixels keep."""
    rng = np.random.default_rng(0)
    rgb, index, colours = upright(), rng.integers(0, 255, (8, 12)).astype(np.uint8), rng.integers(0, 256, 255 * 3)
    index[:, :4] = 255
    paths = []
    for hidden in (0, 200):
        if mode == "P":
            image = Image.frombytes("P", (12, 8), index.tobytes())
            image.putpalette(colours.tolist() + [hidden] * 3)
            options = {"transparency": 255}
        else:
            pixels = np.asarray(rgb).copy()
            pixels[:, :4] = hidden
            alpha = np.full((8, 12), 255, np.uint8)
            alpha[:, :4] = 0
            image, options = Image.fromarray(np.dstack([pixels, alpha])).convert(mode), {}
        image.save(folder / f"{mode}-{hidden}.png", **options)
        paths.append(folder / f"{mode}-{hidden}.png")
    return paths


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
@pytest.mark.parametrize("target", ["RGB", "L"])
def test_fully_transparent_pixels_decode_white_whatever_colour_they_keep(mode, target, tmp_path):
    first, second = two_transparent(mode, tmp_path)
    assert Image.open(first).mode == mode
    a, done = decode_image(first, target)
    b, _ = decode_image(second, target)
    assert done == {TRANSPARENT}
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a)[:, :4] == 255).all()  # the background: white


def test_an_opaque_rgba_image_is_not_counted_as_composited(tmp_path):
    Image.fromarray(np.dstack([np.asarray(upright()), np.full((8, 12), 255, np.uint8)])).save(tmp_path / "a.png")
    image, done = decode_image(tmp_path / "a.png")
    assert done == set() and (np.asarray(image) == np.asarray(upright())).all()


# ---------------------------------------------------------------- decompression-bomb limit


def test_a_jpeg_over_the_bomb_limit_decodes_reduced(monkeypatch, tmp_path):
    upright(64, 48).save(tmp_path / "big.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 64 x 48 is over twice that: Image.open refuses it
    image, done = decode_image(tmp_path / "big.jpg")
    assert done == {REDUCED} and image.size == (16, 12) and image.size[0] * image.size[1] <= 400


def test_an_image_under_twice_the_limit_decodes_in_full_without_a_warning(monkeypatch, tmp_path):
    upright(40, 30).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,200 pixels: Pillow decodes it and warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image, done = decode_image(tmp_path / "a.png")
    assert image.size == (40, 30) and done == set()


def test_a_png_over_the_bomb_limit_is_one_line_naming_file_size_and_fix(monkeypatch, tmp_path):
    upright(40, 30).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InputError) as error:
        decode_image(tmp_path / "huge.png")
    message = str(error.value)
    assert "\n" not in message and "huge.png" in message and "1200 pixels" in message and "shrink it" in message


# ---------------------------------------------------------------- through the CLI: extract and predict


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    torch.manual_seed(0)
    model, processor = make_backbone("dinov2")
    folder = tmp_path_factory.mktemp("dinov2")
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def extract_args(backbone, data, out):
    return ["extract", "--backbone", backbone, "--data", data, "--out", out, "--block-tokens", 128,
            "--chunk-tokens", 32, "--layers", "last:1"]


def add_faulty_images(folder):
    """Into folder/cat: 2 sideways photos, 1 16-bit scan, 3 transparent pictures (one of them also sideways)."""
    save_turned(upright(seed=1), folder / "cat" / "turned-6.png", 6)
    save_turned(upright(seed=2), folder / "cat" / "turned-8.png", 8)
    Image.fromarray(np.linspace(0, 65535, 20 * 20).reshape(20, 20).astype(np.uint16)).save(folder / "cat" / "scan.png")
    for i, path in enumerate(two_transparent("RGBA", folder / "cat")):
        path.rename(folder / "cat" / f"clear-{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.open(folder / "cat" / "clear-0.png").save(folder / "cat" / "clear-turned.png", exif=exif)


def notes(output: str, fragment: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("note:") and fragment in line]


@pytest.mark.parametrize("cluster", [[], ["--workers", 1]], ids=["one process", "dask worker"])
def test_extract_of_an_image_folder_says_each_correction_once_with_its_count(cluster, dinov2, tmp_path):
    """On a cluster the workers decode the images (the first one aside) and send their counts back."""
    write_pngs(tmp_path / "pets", per_class=4)
    add_faulty_images(tmp_path / "pets")
    result = cli(*extract_args(dinov2, tmp_path / "pets", tmp_path / "f.zarr"), *cluster)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert notes(result.output, "pets: 3 images carried an EXIF orientation tag"), result.output
    assert notes(result.output, "pets: 1 16-bit image scaled to 8 bits"), result.output
    assert notes(result.output, "pets: 3 images with transparent pixels composited onto white"), result.output
    assert len([line for line in result.output.splitlines() if line.startswith("note:")]) == 3, result.output


def test_extract_refuses_an_image_over_the_bomb_limit_in_one_line(dinov2, monkeypatch, tmp_path):
    write_pngs(tmp_path / "pets", per_class=4)
    upright(200, 150).save(tmp_path / "pets" / "dog" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the 40 x 40 pets pass, the 200 x 150 one does not
    assert_one_line_error(cli(*extract_args(dinov2, tmp_path / "pets", tmp_path / "f.zarr")), "huge.png is too large")


def test_extract_decodes_a_jpeg_over_the_bomb_limit_reduced_and_says_so(dinov2, monkeypatch, tmp_path):
    write_pngs(tmp_path / "pets", per_class=4)
    upright(200, 150).save(tmp_path / "pets" / "dog" / "huge.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    result = cli(*extract_args(dinov2, tmp_path / "pets", tmp_path / "f.zarr"))
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert notes(result.output, "1 JPEG image over Pillow's decompression-bomb limit decoded at"), result.output


def test_predict_decodes_image_files_as_extract_does(dinov2, tmp_path):
    write_pngs(tmp_path / "pets", per_class=4)
    cli(*extract_args(dinov2, tmp_path / "pets", tmp_path / "f.zarr"))
    train(tmp_path / "f.zarr", "linear", tmp_path / "linear")
    picture = upright(40, 30, seed=3)
    picture.save(tmp_path / "upright.png")
    save_turned(picture, tmp_path / "turned.png", 8)
    eight = np.linspace(0, 255, 40 * 30).reshape(30, 40).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    result = cli("predict", tmp_path / "linear", "--image", tmp_path / "upright.png", "--image", tmp_path / "turned.png",
                 "--image", tmp_path / "eight.png", "--image", tmp_path / "sixteen.png")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert records[0]["probabilities"] == pytest.approx(records[1]["probabilities"], abs=1e-6)
    assert records[2]["probabilities"] == pytest.approx(records[3]["probabilities"], abs=1e-6)
    assert notes(result.output, "predict: 1 image carried an EXIF orientation tag"), result.output
    assert notes(result.output, "predict: 1 16-bit image scaled to 8 bits"), result.output


def test_images_count_an_image_decoded_twice_once(tmp_path):
    images = Images(paths=[save_turned(upright(), tmp_path / "a.png", 6)])
    images.load(0)
    images.load(0)
    assert images.notes("x") == ["note: x: 1 image carried an EXIF orientation tag: turned upright, as viewers show them"]


def test_a_store_of_image_files_decoded_before_the_fix_is_not_taken_as_up_to_date(dinov2, tmp_path):
    """The key digests file bytes, which the decode change leaves equal: `image_decode` in the key tells the stores
    apart, so a store of Pillow's raw decode (sideways, clipped 16-bit) is refused, not silently reused."""
    write_pngs(tmp_path / "pets", per_class=4)
    args = extract_args(dinov2, tmp_path / "pets", tmp_path / "f.zarr")
    assert cli(*args).exit_code == 0
    root = zarr.open_group(str(tmp_path / "f.zarr"), mode="r+")
    key = dict(root.attrs["key"])
    assert key.pop("image_decode") == "as viewers show them"
    root.attrs["key"] = key  # as a store written before the decode fix
    root.attrs["key_sha256"] = key_sha256(key)
    result = cli(*args)
    assert result.exit_code == 2 and "image_decode" in result.output, result.output
