"""Faults a new user's trial met: a moved backbone folder under a SHERL model (a Hugging Face repo-id error, exit
3), predict --out writing JSONL under any suffix or failing on a file in the path with exit 3, a checkpoint lacking
a tensor blamed on another architecture, and texts or image files that predict and extract cut, skipped or split
without a word. Each is now one line naming the fix (exit 2), or handled with a one-line note."""
from __future__ import annotations

import shutil

import pytest
from PIL import Image

from cachetune.cache.errors import InputError
from cachetune.pipeline.data import load_dataset
from cachetune.stages.backbones import load_backbone
from cachetune.stages.images import image_paths
from tests.conftest import WORDS, sentiment_rows, write_table
from tests.test_checkpoint_faults import resave
from tests.test_extract import assert_one_line_error, cli, run_extract
from tests.test_fit import train
from tests.test_input_faults import lines_logged


@pytest.fixture(scope="module")
def sherl_model(tiny_bert, tmp_path_factory):
    """(a SHERL model folder, its cache, the backbone folder the cache records): the backbone is a copy of its own,
    free to be moved."""
    folder = tmp_path_factory.mktemp("trial")
    backbone = shutil.copytree(tiny_bert, folder / "bert")
    table = write_table(folder / "data.csv", sentiment_rows(80))
    run_extract(backbone, table, folder / "f.zarr")
    train(folder / "f.zarr", "sherl", folder / "sherl", epochs=1)
    return folder / "sherl", folder / "f.zarr", backbone


def test_a_moved_backbone_under_a_sherl_model_names_backbone_and_the_option_works(sherl_model):
    model, cache, backbone = sherl_model
    moved = backbone.with_name("bert_mv")
    backbone.rename(moved)
    try:
        for command in (["predict", model, "--text", "great"], ["evaluate", model, "--cache", cache]):
            assert_one_line_error(cli(*command), "pass --backbone DIR if the folder moved")
            result = cli(*command, "--backbone", moved)
            assert result.exit_code == 0, result.output
    finally:
        moved.rename(backbone)


@pytest.mark.parametrize("name", ["p.parquet", "p.tsv", "p.json", "p.txt", "p"])
def test_predict_refuses_an_out_it_cannot_write_before_anything_runs(name, sherl_model, tmp_path):
    model, _, _ = sherl_model
    result = cli("predict", model, "--text", "great", "--out", tmp_path / name)
    assert_one_line_error(result, "predict writes .jsonl or .csv")
    assert not (tmp_path / name).exists()


def test_a_file_where_out_needs_a_folder_is_bad_input_naming_it(sherl_model, tmp_path):
    model, cache, _ = sherl_model
    plain = tmp_path / "FILE"
    plain.write_text("")
    result = cli("predict", model, "--text", "great", "--out", plain / "p.jsonl")
    assert_one_line_error(result, f"{plain} is a file, not a folder")
    result = cli("fit", "--method", "linear", "--cache", cache, "--epochs", 1, "--out", plain / "sub" / "m")
    assert_one_line_error(result, f"{plain} is a file, not a folder")


def test_a_checkpoint_lacking_one_tensor_says_so_not_another_architecture(tiny_bert, tmp_path):
    gone = "encoder.layer.0.attention.self.key.weight"
    folder = resave(tiny_bert, tmp_path / "model", keep=lambda key: key != gone)
    with pytest.raises(InputError) as refused:
        load_backbone(str(folder))
    message = str(refused.value)
    assert f"lacks 1 tensor the model uses (e.g. {gone})" in message and "re-download" in message
    assert "another architecture" not in message


def test_predict_says_how_many_texts_were_cut_at_the_trained_length(sherl_model):
    model, _, _ = sherl_model
    long = " ".join(WORDS[i % len(WORDS)] for i in range(200))
    result = cli("predict", model, "--text", long, "--text", "great film")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "cut at" in line]
    assert len(notes) == 1, result.stderr
    assert notes[0] == ("note: 1 of 2 texts was cut at 24 tokens, the max length the model was trained at (longest "
                        "202 tokens): only its first 24 tokens were scored"), notes[0]
    assert len(result.stdout.splitlines()) == 2


def image_folder(root, splits=False):
    """Two classes of ten tiny PNGs, under train/ test/ when `splits`; a phone photo, a README, a file without a
    suffix and a .DS_Store beside them."""
    for label in ("cat", "dog"):
        for i in range(10):
            split = ("test" if i < 2 else "train") if splits else ""
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (30 * i, 0, 255 if label == "cat" else 0)).save(folder / f"{i}.png")
    cats = root / ("train" if splits else "") / "cat"
    for name in ("IMG_0002.heic", "README.txt", "LICENSE", ".DS_Store"):
        (cats / name).write_bytes(b"not an image")
    return root


def test_image_folder_names_skipped_files_and_its_seeded_split(tmp_path):
    logged, log = lines_logged()
    load_dataset(str(image_folder(tmp_path / "pets")), log=log)
    assert [line for line in logged if "skipped" in line] == [
        f"note: {tmp_path / 'pets'}: skipped 3 files that are not images (.heic 1, no suffix 1, .txt 1): cachetune reads "
        ".png .jpg .jpeg .bmp .gif .webp .tif .tiff; convert the others (e.g. HEIC to JPEG) to use them"]
    assert any("no split folders, so a seeded stratified 80/10/10 split is made (--split-seed)" in line
               for line in logged), logged


def test_image_folder_with_split_folders_says_so(tmp_path):
    logged, log = lines_logged()
    load_dataset(str(image_folder(tmp_path / "pets", splits=True)), log=log)
    assert any("splits from its train, test folders" in line for line in logged), logged
    assert sum("skipped 3 files" in line for line in logged) == 1, logged


def test_predict_image_folder_names_skipped_files(tmp_path):
    logged, log = lines_logged()
    paths = image_paths([str(image_folder(tmp_path / "pets"))], log)
    assert len(paths) == 20
    assert len(logged) == 1 and "skipped 3 files that are not images (.heic 1" in logged[0], logged
