"""Faults a new-user trial met after issue 18: silent outcomes that now say what happened, and option values that
failed deep inside a run and are now one line before it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cachetune.cache.errors import InputError
from cachetune.pipeline.data import load_dataset
from tests.conftest import sentiment_rows, write_table
from tests.test_extract import assert_one_line_error, cli, run_extract
from tests.test_input_faults import REPO, lines_logged, write_jsonl


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """A tiny store outside the default path, and a linear probe fitted on it."""
    folder = tmp_path_factory.mktemp("user-faults")
    run_extract(tiny_bert, write_table(folder / "data.csv", sentiment_rows(80)), folder / "f.zarr")
    fit = cli("fit", "--method", "linear", "--cache", folder / "f.zarr", "--epochs", 1, "--out", folder / "m")
    assert fit.exit_code == 0, fit.output
    return folder


def test_a_tiny_table_says_it_has_no_test_split(tmp_path):
    logged, log = lines_logged()
    load_dataset(str(write_table(tmp_path / "data.csv", sentiment_rows(4))), log=log)
    [line] = [line for line in logged if "no test rows" in line]
    assert line.startswith("warning:") and "80/10/10" in line


def test_a_class_too_small_for_the_held_out_splits_is_named(tmp_path):
    rows = sentiment_rows(60) + [("an odd little film", "mixed")] * 2
    logged, log = lines_logged()
    load_dataset(str(write_table(tmp_path / "data.csv", rows)), log=log)
    assert any("'mixed'" in line and "no test row" in line for line in logged), logged


def test_a_well_split_table_gets_no_such_warning(tmp_path):
    logged, log = lines_logged()
    load_dataset(str(write_table(tmp_path / "data.csv", sentiment_rows(120))), log=log)
    assert not [line for line in logged if line.startswith("warning:")]


def test_a_table_with_a_split_column_keeps_its_splits_and_a_table_without_one_is_told_of_the_seeded_split(tiny_bert, tmp_path):
    rows = sentiment_rows(60)
    names = ["train"] * 40 + ["validation"] * 10 + ["test"] * 10
    table = tmp_path / "data.csv"
    table.write_text("text,label,split\n" + "".join(f"{text},{label},{name}\n" for (text, label), name in zip(rows, names)))
    logged, log = lines_logged()
    dataset = load_dataset(str(table), log=log)
    assert [len(dataset.rows(split)) for split in ("train", "validation", "test")] == [40, 10, 10]
    assert dataset.split_seed is None and any("splits from its column 'split'" in line for line in logged), logged
    run_extract(tiny_bert, table, tmp_path / "given.zarr")
    assert "splits     as the data gave them" in cli("info", tmp_path / "given.zarr").output
    logged, log = lines_logged()
    dataset = load_dataset(str(write_table(tmp_path / "plain.csv", rows)), log=log)
    assert dataset.split_seed == 0 and any("seeded stratified 80/10/10 split is made" in line for line in logged), logged


def test_a_bad_split_value_or_a_missing_split_column_is_one_line_naming_the_fix(tiny_bert, tmp_path):
    table = tmp_path / "data.csv"
    table.write_text("text,label,split\n" + "".join(f"{text},{label},{'holdout' if i == 5 else 'train'}\n"
                                                    for i, (text, label) in enumerate(sentiment_rows(40))))
    args = ("extract", "--backbone", tiny_bert, "--data", table, "--out", tmp_path / "f.zarr")
    for result, fragment in [(cli(*args), "split column 'split' has values ['holdout'] ("),
                             (cli(*args, "--split-column", "part"), "no column 'part'; columns are: text, label, split (set --split-column)")]:
        assert_one_line_error(result, fragment)
        assert len(result.output.strip().splitlines()) == 1, result.output  # no info line before the error


def test_a_run_refused_after_the_data_is_read_prints_its_error_line_only(tiny_bert, tmp_path):
    table = tmp_path / "data.csv"  # no split column: reading it says a seeded split is made
    table.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in sentiment_rows(40)))
    result = cli("extract", "--backbone", tiny_bert, "--data", table, "--out", tmp_path / "f.zarr", "--layers", "0,,1")
    assert_one_line_error(result, "--layers '0,,1': use all")
    assert len(result.output.strip().splitlines()) == 1, result.output  # the split note waits for the checks
    ok = cli("extract", "--backbone", tiny_bert, "--data", table, "--out", tmp_path / "f.zarr", "--layers", "0,1")
    assert ok.exit_code == 0 and "seeded stratified 80/10/10 split" in ok.output, ok.output


def test_a_label_written_as_1_and_as_1_0_is_refused_not_made_two_classes(tmp_path):
    records = [{"text": text, "label": 1 if label == "pos" else 0} for text, label in sentiment_rows(30)]
    records[7]["label"] = 1.0
    with pytest.raises(InputError, match=r"labels '1' and '1.0'.*data.jsonl line 8.*write each class one way"):
        load_dataset(str(write_jsonl(tmp_path / "data.jsonl", records)), log=lambda _: None)


def test_distinct_numeric_labels_stay_classes(tmp_path):
    rows = [(text, "1" if label == "pos" else "2.5") for text, label in sentiment_rows(30)]
    assert load_dataset(str(write_table(tmp_path / "data.csv", rows)), log=lambda _: None).label_names == ["1", "2.5"]


@pytest.mark.parametrize("option, message", [("r=0", "r=0 for method 'lst' must be at least 1"),
                                             ("dropout=1.5", "dropout=1.5 for method 'lst' must be in [0, 1)")])
def test_a_bad_method_option_is_one_line_before_training(option, message, trained, tmp_path):
    result = cli("fit", "--method", "lst", "--cache", trained / "f.zarr", "--set", option, "--out", tmp_path / "m")
    assert_one_line_error(result, message)
    assert not (tmp_path / "m").exists()


def test_evaluate_without_cache_scores_the_model_s_own_cache(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no artifacts/features.zarr here: the old default would fail
    result = cli("evaluate", trained / "m")
    assert result.exit_code == 0, result.output
    assert str(trained / "f.zarr") in result.stderr
    saved = json.loads((trained / "m" / "metrics.json").read_text())
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(saved["test"]["accuracy"])


def test_predict_on_a_table_skips_empty_texts_names_them_and_keeps_line_numbers(trained, tmp_path):
    table = write_table(tmp_path / "new.csv", [("good great film", "x"), ("", "x"), ("   ", "x"), ("dull plot", "x")])
    result = cli("predict", trained / "m", "--data", table)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in records] == [2, 5] and [r["text"] for r in records] == ["good great film", "dull plot"]
    assert "2 of 4 rows not scored" in result.stderr and "new.csv lines 3, 4" in result.stderr
    assert_one_line_error(cli("predict", trained / "m", "--text", " "), "--text is empty")


def test_pooling_last_on_an_encoder_is_said(tiny_bert, tmp_path):
    from cachetune.stages.backbones import check_pooling, load_backbone

    logged, log = lines_logged()
    check_pooling(load_backbone(tiny_bert), "last", log)
    assert logged and "closing token" in logged[0] and "its default is --pooling mean" in logged[0]


def test_the_profiler_s_allocator_line_no_longer_reaches_stderr():
    """c10 logs 'Memory block of unknown size' (C++, once a process) when a block made before profiling is freed
    during it: the first process shows the premise holds, the second that peak_allocated_mb keeps it off stderr."""
    work = "import torch; held = [torch.ones(1 << 20)]\n"
    raw = work + ("from torch.profiler import profile, ProfilerActivity\n"
                  "with profile(activities=[ProfilerActivity.CPU], profile_memory=True):\n    held.clear()\n")
    ours = work + "from stages.memory import peak_allocated_mb\nprint(peak_allocated_mb(held.clear) <= 0)\n"
    env = {"KINETO_LOG_LEVEL": "6", "PATH": "/usr/bin:/bin"}
    premise = subprocess.run([sys.executable, "-c", raw], capture_output=True, text=True, env=env)
    assert "Memory block of unknown size" in premise.stderr
    done = subprocess.run([sys.executable, "-c", ours], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "Memory block of unknown size" not in done.stderr and done.stdout.strip() == "True"


def test_the_disk_room_estimate_counts_one_byte_a_value_for_8_bit_stores(tiny_bert, tmp_path):
    from cachetune.stages.backbones import load_backbone
    from cachetune.stages.extraction.extract import ExtractSettings
    from cachetune.stages.extraction.store_room import bytes_still_needed

    backbone = load_backbone(tiny_bert)
    dataset = load_dataset(str(write_table(tmp_path / "data.csv", sentiment_rows(400))), log=lambda _: None)
    needed = {dtype: bytes_still_needed(backbone, dataset, ExtractSettings(out=str(tmp_path / dtype), dtype=dtype,
                                                                           block_tokens=4096, chunk_tokens=1024))[0]
              for dtype in ("float32", "float16", "int8")}
    assert needed["float16"] / needed["float32"] == pytest.approx(0.5, abs=0.05)
    assert needed["int8"] / needed["float16"] == pytest.approx(0.5 + 1 / 64, abs=0.1)  # + a scale per 64, + fixed costs


def test_the_new_option_help_is_there():
    from click.testing import CliRunner

    from cachetune.pipeline.cli import main

    for command, option in [("extract", "--split-seed"), ("extract", "--label-column"), ("fit", "--lr"),
                            ("fit", "--epochs"), ("compact", "--codec"), ("baseline", "--lora-r")]:
        text = CliRunner().invoke(main, [command, "--help"]).output
        block = text[text.index(option):].split("\n  --")[0]
        assert len(" ".join(block.split()[2:])) > 20, (command, option, block)
