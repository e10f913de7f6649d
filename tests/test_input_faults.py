"""Inputs from real users that used to end in a traceback, in a meaningless store, or in silently changed data
(issue 18). Each case is a small made-up input; the expectation is the right behaviour: one line naming the
problem and the fix (exit 2), or the data read exactly as written with every dropped row named.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from cachetune.cache.errors import InputError
from cachetune.pipeline.cli import main
from cachetune.pipeline.data import load_dataset
from tests.conftest import WORDS, sentiment_rows, write_table, write_tiny_bert
from tests.test_extract import assert_one_line_error

SMALL = ["--block-tokens", 128, "--chunk-tokens", 32, "--batch-size", 8, "--max-length", 24]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def extract_args(backbone, data, out, *extra):
    return ["extract", "--backbone", backbone, "--data", data, "--out", out, *SMALL, *extra]


def complete(store) -> bool:
    return os.path.exists(store) and zarr.open_group(str(store), mode="r").attrs.get("status") == "complete"


def write_rows(path, rows, columns=("text", "label"), delimiter=","):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def lines_logged():
    logged = []
    return logged, logged.append


@pytest.fixture(scope="module")
def tiny_electra(tmp_path_factory):
    """A random ELECTRA (a model type extract accepts and no frozen-layer family rebuilds), word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import ElectraConfig, ElectraModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-electra")
    vocab = {word: i for i, word in enumerate(["<unk>", "<pad>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)
    torch.manual_seed(0)
    config = ElectraConfig(vocab_size=len(vocab), embedding_size=32, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, pad_token_id=1)
    ElectraModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def electra_cache(tiny_electra, tmp_path_factory):
    folder = tmp_path_factory.mktemp("electra-cache")
    table = write_table(folder / "data.csv", sentiment_rows(80))
    result = cli(*extract_args(tiny_electra, table, folder / "f.zarr"))
    assert result.exit_code == 0, result.output
    assert "cannot run on electra caches" in result.stderr  # said once, at extract
    return folder / "f.zarr"


# 1. Errors the model, tokenizer or layer loader raised reach the user as one line, found before the forward pass.

def test_max_length_beyond_the_position_table_is_refused_before_the_forward_pass(tiny_bert, tmp_path):
    rows = sentiment_rows(40)
    rows[7] = (" ".join(WORDS[i % len(WORDS)] for i in range(90)), "pos")  # 92 tokens; the model has 64 positions
    table = write_table(tmp_path / "long.csv", rows)
    args = extract_args(tiny_bert, table, tmp_path / "f.zarr")
    args[args.index("--max-length") + 1] = 100
    assert_one_line_error(cli(*args), "--max-length 100 is more than the 64 positions")
    assert "long.csv line 9" in cli(*args).output and "use --max-length 64 or less" in cli(*args).output
    assert not (tmp_path / "f.zarr").exists()  # refused before the store was made
    short = write_table(tmp_path / "short.csv", sentiment_rows(40))  # no text reaches 64 tokens: nothing to refuse
    args[args.index("--data") + 1] = short
    assert cli(*args).exit_code == 0


def test_a_bert_tokenizer_on_a_one_token_type_roberta_with_pairs_is_refused(tiny_bert, tmp_path):
    from transformers import RobertaConfig, RobertaModel

    folder = tmp_path / "roberta-with-bert-tokenizer"
    folder.mkdir()
    for name in os.listdir(tiny_bert):  # BERT's tokenizer files
        if name.startswith(("tokenizer", "vocab", "special")):
            (folder / name).write_bytes((tiny_bert / name).read_bytes())
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=66, type_vocab_size=1)).save_pretrained(folder)
    table = write_rows(tmp_path / "pairs.csv", [(t, t.split()[0], y) for t, y in sentiment_rows(40)],
                       ("text", "other", "label"))
    result = cli(*extract_args(folder, table, tmp_path / "f.zarr", "--text-pair-column", "other"))
    assert_one_line_error(result, "type_vocab_size 1")
    assert "--text-pair-column" in result.output
    assert cli(*extract_args(folder, table, tmp_path / "g.zarr")).exit_code == 0  # no pairs: type id 0 only


def test_position_limits_follow_each_family_s_table():
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2Model, MPNetConfig, MPNetModel, RobertaConfig,
                              RobertaModel)

    from cachetune.stages.extraction.preflight import position_limit

    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=40,
                 max_position_embeddings=66)
    assert position_limit(BertModel(BertConfig(**shape))) == 66
    assert position_limit(RobertaModel(RobertaConfig(**shape))) == 64  # positions start after padding_idx 1
    assert position_limit(MPNetModel(MPNetConfig(**shape))) == 64
    assert position_limit(GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=40, n_positions=50))) == 50


@pytest.mark.parametrize("method", ["lst", "sherl", "synqt"])
def test_fit_with_a_method_that_cannot_rebuild_the_model_type_is_one_line_before_training(method, electra_cache, tiny_electra,
                                                                                          tmp_path):
    from cachetune.stages.methods.support import unsupported_reason

    if unsupported_reason(method, str(tiny_electra)) is None:  # lst sizes its side blocks from any BERT-like config
        pytest.skip(f"{method} runs on electra caches")
    out = tmp_path / method
    result = cli("fit", "--method", method, "--cache", electra_cache, "--epochs", 1, "--out", out)
    assert_one_line_error(result, f"method {method!r} cannot run on this cache's backbone")
    assert "electra" in result.output and "linear" in result.output  # names the cause and a method that can
    assert not out.exists() and not (tmp_path / f"{method}.checkpoint.pt").exists()  # nothing was trained


def test_methods_that_need_no_backbone_run_on_the_same_cache_and_auto_leaves_the_others_out(electra_cache, tiny_electra,
                                                                                           tmp_path):
    result = cli("fit", "--method", "linear", "--cache", electra_cache, "--epochs", 1, "--out", tmp_path / "linear")
    assert result.exit_code == 0, result.output
    from cachetune.stages.methods import method_names
    from cachetune.stages.methods.support import split_supported, universal_methods

    runnable, reasons = split_supported(method_names(), str(tiny_electra))  # today: sherl and synqt cannot
    assert set(universal_methods()) <= set(runnable) and set(runnable) | set(reasons) == set(method_names())
    result = cli("sweep", "--cache", electra_cache, "--epochs", 1, "--out", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    assert (f"leaving out {', '.join(reasons)}" in result.stderr) == bool(reasons)
    ran = {row["method"] for row in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]}
    assert ran == set(runnable)


def test_support_comes_from_the_frozen_layer_families_and_the_layer_config(tiny_bert, tmp_path):
    from transformers import CanineConfig

    from cachetune.stages.backbone_layers import SUPPORTED_MODEL_TYPES
    from cachetune.stages.methods.support import needs_frozen_layers, needs_layer_shape

    assert needs_frozen_layers(str(tiny_bert)) is None and needs_layer_shape(str(tiny_bert)) is None
    folder = tmp_path / "canine"
    CanineConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(folder)
    assert "canine" not in SUPPORTED_MODEL_TYPES  # a character-level encoder no family table holds
    assert "canine layers are not among the families" in needs_frozen_layers(str(folder))
    assert needs_layer_shape(str(folder)) is None  # its config names intermediate_size and heads: lst can size itself
    assert "no config.json" in needs_frozen_layers(str(tmp_path / "moved"))
    assert needs_layer_shape(str(tmp_path / "moved")) is None  # lst has defaults without a folder


def test_a_library_error_in_the_forward_pass_is_one_line_and_fit_does_not_send_the_user_back(tiny_bert, tmp_path,
                                                                                              monkeypatch):
    from cachetune.stages.extraction import extract as extract_module

    def broken(*args, **kwargs):
        def forward(samples):
            raise IndexError("index out of range in self")
        return forward

    monkeypatch.setattr(extract_module, "split_forward", broken)
    table = write_table(tmp_path / "data.csv", sentiment_rows(40))
    result = cli(*extract_args(tiny_bert, table, tmp_path / "f.zarr"))
    assert_one_line_error(result, "extract (tokenizing and forward passes) failed inside the model code")
    assert str(tiny_bert) in result.output and "IndexError: index out of range in self" in result.output
    assert "rerun" not in result.output
    after = cli("fit", "--method", "linear", "--cache", tmp_path / "f.zarr", "--epochs", 1, "--out", tmp_path / "m")
    assert_one_line_error(after, "stopped with")
    assert "rerun the same" not in after.output and "IndexError" in after.output


# 2. A tokenizer that does not belong to the model.

def test_a_model_folder_without_tokenizer_files_is_refused(tiny_bert, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_bert / name).read_bytes())
    table = write_table(tmp_path / "data.csv", sentiment_rows(40))
    result = cli(*extract_args(folder, table, tmp_path / "f.zarr"))
    assert_one_line_error(result, "knows 5 tokens but the model's embedding matrix has")
    assert not complete(tmp_path / "f.zarr")


def _with_tokenizer(tiny_bert, folder, vocab):
    from transformers import BertTokenizerFast

    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_bert / name).read_bytes())
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(folder)
    return folder


def test_a_tokenizer_that_makes_nearly_every_token_unknown_is_refused(tiny_bert, tmp_path):
    foreign = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"wort{i}" for i in range(len(WORDS))]  # same size
    folder = _with_tokenizer(tiny_bert, tmp_path / "foreign", foreign)
    table = write_table(tmp_path / "data.csv", sentiment_rows(40))
    assert_one_line_error(cli(*extract_args(folder, table, tmp_path / "f.zarr")), "100% of the tokens")


def test_a_tokenizer_with_ids_beyond_the_embedding_matrix_is_refused(tiny_bert, tmp_path):
    larger = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS) + [f"extra{i}" for i in range(20)]
    folder = _with_tokenizer(tiny_bert, tmp_path / "larger", larger)
    table = write_table(tmp_path / "data.csv", sentiment_rows(40))
    assert_one_line_error(cli(*extract_args(folder, table, tmp_path / "f.zarr")), f"token ids up to {len(larger) - 1}")


# 3. Tables read as written; nothing dropped or changed without a word.

MISSING_LOOKING = ["NA", "N/A", "None", "null", "NaN", "nan", "NULL", "#N/A", "-NaN", "n/a", "<NA>"]
NUMBER_LOOKING = ["0070", "3.100", "1002", "1e5", "-0"]


def _table_rows():
    texts = MISSING_LOOKING + NUMBER_LOOKING
    return [(text, "NA" if i % 2 else "None") for i, text in enumerate(texts * 2)]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_values_on_pandas_missing_list_and_numeric_texts_are_kept_as_written(suffix, tmp_path):
    rows = _table_rows()
    path = tmp_path / f"data{suffix}"
    if suffix in (".csv", ".tsv"):
        write_rows(path, rows, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        write_jsonl(path, [{"text": t, "label": y} for t, y in rows])
    elif suffix == ".json":
        path.write_text(json.dumps([{"text": t, "label": y} for t, y in rows]))
    else:
        import pandas as pd

        pd.DataFrame({"text": [t for t, _ in rows], "label": [y for _, y in rows]}).to_parquet(path)
    logged, log = lines_logged()
    dataset = load_dataset(str(path), log=log)
    assert len(dataset) == len(rows) and not any("dropped" in line for line in logged)
    assert dataset.texts == [t for t, _ in rows]  # "0070" stays "0070", "NA" stays "NA"
    assert dataset.label_names == ["NA", "None"]


def test_jsonl_numbers_keep_their_digits_and_csv_and_jsonl_give_the_same_samples(tmp_path):
    (tmp_path / "numbers.jsonl").write_text('{"text": 3.100, "label": 1}\n{"text": 1002, "label": 0}\n'
                                            '{"text": "0070", "label": 1}\n{"text": "ok", "label": 0}\n')
    assert load_dataset(str(tmp_path / "numbers.jsonl"), log=lambda _: None).texts == ["3.100", "1002", "0070", "ok"]
    rows = [(t, y) for t, y in sentiment_rows(30)] + [("NA", "pos"), ("null", "neg"), ("0070", "pos")]
    as_csv = load_dataset(str(write_rows(tmp_path / "a.csv", rows)), log=lambda _: None)
    as_jsonl = load_dataset(str(write_jsonl(tmp_path / "a.jsonl", [{"text": t, "label": y} for t, y in rows])),
                            log=lambda _: None)
    assert as_csv.texts == as_jsonl.texts and len(as_csv) == len(rows)
    np.testing.assert_array_equal(as_csv.labels, as_jsonl.labels)
    np.testing.assert_array_equal(as_csv.split, as_jsonl.split)


def test_empty_texts_and_labels_are_dropped_and_every_one_is_named(tiny_bert, tmp_path):
    rows = sentiment_rows(30)
    rows[2] = ("", "pos")  # line 4
    rows[5] = ("   ", "neg")  # line 7: only spaces
    rows[9] = ("good film", "")  # line 11
    path = write_rows(tmp_path / "data.csv", rows)
    logged, log = lines_logged()
    dataset = load_dataset(str(path), log=log)
    assert len(dataset) == 27
    [line] = [line for line in logged if "dropped" in line]
    assert "dropped 3 of 30 rows" in line and "2 with an empty 'text'" in line and "1 with an empty 'label'" in line
    assert "lines 4, 7, 11" in line
    result = cli("extract", "--backbone", tiny_bert, "--data", path, "--out", tmp_path / "f.zarr")
    assert result.exit_code == 0, result.output
    # on the command line: on stderr, once extract's checks have passed and before the forward passes
    notes = result.stderr.splitlines()
    assert any("dropped 3 of 30 rows" in note for note in notes[:3]), result.stderr
    refused = cli("extract", "--backbone", "nowhere", "--data", path, "--out", tmp_path / "g.zarr")
    assert refused.exit_code == 2 and "dropped" not in refused.stderr  # a refused run prints its one error line


def test_json_nulls_and_missing_keys_count_as_empty_and_are_named(tmp_path):
    records = [{"text": t, "label": y} for t, y in sentiment_rows(20)]
    records[3]["label"] = None
    del records[6]["text"]
    logged, log = lines_logged()
    dataset = load_dataset(str(write_jsonl(tmp_path / "data.jsonl", records)), log=log)
    assert len(dataset) == 18 and any("lines 4, 7" in line for line in logged)


def test_labels_that_differ_only_by_surrounding_spaces_are_one_class(tmp_path):
    rows = [(t, {"pos": "positive ", "neg": " negative"}[y] if i % 3 else {"pos": "positive", "neg": "negative"}[y])
            for i, (t, y) in enumerate(sentiment_rows(30))]
    dataset = load_dataset(str(write_rows(tmp_path / "data.csv", rows)), log=lambda _: None)
    assert dataset.label_names == ["negative", "positive"]


def test_regression_with_an_empty_target_drops_and_names_it(tmp_path):
    rows = [(t, str(i / 10)) for i, (t, _) in enumerate(sentiment_rows(30))]
    rows[4] = (rows[4][0], "")
    logged, log = lines_logged()
    dataset = load_dataset(str(write_rows(tmp_path / "data.csv", rows)), task="regression", log=log)
    assert len(dataset) == 29 and any("line 6" in line for line in logged)


# 4. Data that makes a run meaningless is refused at extract, or carved into shape and said so.

@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "NaN", "1e39"])
def test_non_finite_regression_targets_are_refused_at_extract(value, tiny_bert, tmp_path):
    rows = [(t, str(i / 10)) for i, (t, _) in enumerate(sentiment_rows(30))]
    rows[12] = (rows[12][0], value)
    table = write_rows(tmp_path / "data.csv", rows)
    result = cli(*extract_args(tiny_bert, table, tmp_path / "f.zarr", "--task", "regression"))
    assert_one_line_error(result, "non-finite targets")
    assert "data.csv line 14" in result.output and not (tmp_path / "f.zarr").exists()


def test_train_and_test_files_without_validation_get_a_carved_validation_split_and_fit_runs(tiny_bert, tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    write_table(folder / "train.csv", sentiment_rows(60))
    write_table(folder / "test.csv", sentiment_rows(20, seed=1))
    store = tmp_path / "f.zarr"
    result = cli(*extract_args(tiny_bert, folder, store))
    assert result.exit_code == 0, result.output
    assert "no validation rows (the given splits have none)" in result.stderr and "made 6 of the 60" in result.stderr
    root = zarr.open_group(str(store), mode="r")
    assert root["validation"]["row"].shape[0] == 6 and root["train"]["row"].shape[0] == 54
    assert root.attrs["key"]["split_seed"] == 0  # the carve is seeded, and the seed is in the key
    fit = cli("fit", "--method", "linear", "--cache", store, "--epochs", 1, "--out", tmp_path / "m")
    assert fit.exit_code == 0, fit.output


@pytest.mark.parametrize("per_class", [2, 3, 4])
def test_small_classes_get_validation_rows_from_the_default_split(per_class, tmp_path):
    rows = sentiment_rows(2 * per_class)
    logged, log = lines_logged()
    dataset = load_dataset(str(write_table(tmp_path / "data.csv", rows)), log=log)
    validation = dataset.rows("validation")
    assert sorted(dataset.labels[validation]) == [0, 1]  # stratified: one per class
    assert all(np.sum(dataset.labels[dataset.rows("train")] == c) >= 1 for c in (0, 1))
    assert any("no validation rows" in line for line in logged)
    again = load_dataset(str(tmp_path / "data.csv"), log=lambda _: None)
    np.testing.assert_array_equal(dataset.split, again.split)  # seeded


def test_a_split_that_already_has_validation_is_unchanged(tmp_path):
    from cachetune.pipeline.data import stratified_split

    dataset = load_dataset(str(write_table(tmp_path / "data.csv", sentiment_rows(120))), log=lambda _: None)
    np.testing.assert_array_equal(dataset.split, stratified_split(dataset.labels, 0))


def test_a_class_with_no_training_rows_is_refused(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    write_table(folder / "train.csv", sentiment_rows(20))
    write_table(folder / "validation.csv", sentiment_rows(6, seed=1))
    write_table(folder / "test.csv", sentiment_rows(6, seed=2) + [("what a plot", "mixed")])
    with pytest.raises(InputError, match=r"class 'mixed' has no training rows \(only test: test.csv line 8\)"):
        load_dataset(str(folder), log=lambda _: None)


def test_the_same_text_in_train_and_test_is_a_loud_warning(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    train = sentiment_rows(20)
    write_table(folder / "train.csv", train)
    write_table(folder / "validation.csv", sentiment_rows(6, seed=1))
    write_table(folder / "test.csv", sentiment_rows(6, seed=2) + [train[3], train[8]])
    logged, log = lines_logged()
    load_dataset(str(folder), log=log)
    [line] = [line for line in logged if "repeat a training text" in line]
    assert line.startswith("warning:") and "2 of 8 test rows" in line and "test.csv lines 8, 9" in line


# 5. Messages that name the right fix.

def test_nan_from_the_checkpoint_in_a_float32_store_names_the_layer_not_float16(tmp_path):
    from transformers import BertModel

    folder = write_tiny_bert(tmp_path / "nan-bert")
    model = BertModel.from_pretrained(folder)
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] = float("nan")  # the second layer's output is nan
    model.save_pretrained(folder)
    table = write_table(tmp_path / "data.csv", sentiment_rows(40))
    result = cli(*extract_args(folder, table, tmp_path / "f.zarr", "--dtype", "float32"))
    assert_one_line_error(result, "the backbone itself gives inf or nan at layer 2")
    assert "float16" not in result.output and "--dtype float32" not in result.output


def test_float16_overflow_names_the_layer():
    from cachetune.stages.extraction.extract import check_finite

    bounds = torch.tensor([[-1.0, 2.0], [-3.0, 1e6], [0.0, 1.0]])
    with pytest.raises(InputError, match=r"layer 6's features overflow float16 \(max \|x\| 1e\+06"):
        check_finite(bounds, torch.float16, (0, 6, 7))
    check_finite(bounds, torch.float32, (0, 6, 7))  # fits a float32 store


def test_a_semicolon_delimited_file_is_read_and_says_so(tmp_path):
    rows = [(t.replace(" ", ", ", 1), y) for t, y in sentiment_rows(30)]  # commas inside the texts
    path = write_rows(tmp_path / "data.csv", rows, delimiter=";")
    logged, log = lines_logged()
    dataset = load_dataset(str(path), log=log)
    assert dataset.texts == [t for t, _ in rows]
    assert any("semicolon-delimited" in line for line in logged)
    explicit = load_dataset(str(path), delimiter=";", log=lambda _: None)
    assert explicit.texts == dataset.texts


def test_a_row_with_more_fields_than_the_header_names_the_line_and_the_delimiter_option(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\ngood film,pos\nbad, awful film,neg\n")
    with pytest.raises(InputError, match=r"data.csv line 3 has 3 fields but the header \(line 1\) has 2; quote"):
        load_dataset(str(path), log=lambda _: None)
    path.write_text("text;label\ngood film;pos\nbad film;neg;extra\n")
    with pytest.raises(InputError, match=r"line 3 has 3 fields"):
        load_dataset(str(path), log=lambda _: None)
    result = cli("extract", "--data", path, "--delimiter", ";;", "--out", tmp_path / "f.zarr")
    assert_one_line_error(result, "--delimiter ';;': give one character")


def test_a_jsonl_error_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n{"text": "dull", "label": }\n')
    with pytest.raises(InputError, match=r"data.jsonl line 4 is not valid JSON"):
        load_dataset(str(path), log=lambda _: None)
    path.write_text('{"text": "good", "label": "pos"}\n["bad", "neg"]\n')
    with pytest.raises(InputError, match=r"line 2 is a JSON list, not an object"):
        load_dataset(str(path), log=lambda _: None)


def test_a_closed_stdout_is_a_quiet_exit(tiny_bert, tmp_path):
    store = tmp_path / "f.zarr"
    assert cli(*extract_args(tiny_bert, write_table(tmp_path / "data.csv", sentiment_rows(40)), store)).exit_code == 0
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    for command in (["info", store], ["methods"]):
        process = subprocess.Popen([sys.executable, "-m", "cachetune.pipeline.cli", *map(str, command)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env)
        process.stdout.close()  # the reader quit before the first line, as `| head -0` would
        stderr = process.stderr.read().decode()
        assert process.wait() == 0 and stderr == "", (command, stderr)
