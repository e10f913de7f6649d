"""Texts, labels and targets that used to be read wrong without a word (issue: real users' long texts): texts cut
at --max-length, special-token strings in the data and a second BOS, labels that differ only in invisible
characters or Unicode form, and regression targets written with a decimal comma or thousands separators."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from cachetune.cache.errors import InputError
from cachetune.pipeline.data import load_dataset
from cachetune.stages.extraction.tokenizing import encode
from transformers import AutoTokenizer

from tests.conftest import WORDS, sentiment_rows, write_table
from tests.decoder_folders import write_tiny_decoder
from tests.test_decoders import _features
from tests.test_extract import assert_one_line_error
from tests.test_input_faults import cli, extract_args, lines_logged


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A tiny decoder whose tokenizer puts '<bos>' before every text."""
    return write_tiny_decoder(tmp_path_factory.mktemp("gemma") / "gemma", "gemma3_text")


def test_extract_says_how_many_texts_max_length_cut_and_info_prints_it(tiny_bert, tmp_path):
    rows = sentiment_rows(40)
    for i in range(0, 40, 8):  # five long reviews whose verdict comes last
        rows[i] = (" ".join(["the movie"] * (8 + 2 * i)) + " " + rows[i][0], rows[i][1])
    table = write_table(tmp_path / "long.csv", rows)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    full = [len(tokenizer(text)["input_ids"]) for text, _ in rows]
    cut, longest = sum(n > 24 for n in full), max(full)
    assert cut == 5 and longest > 64  # the position table of the tiny BERT holds 64

    result = cli(*extract_args(tiny_bert, table, tmp_path / "f.zarr"))  # --max-length 24
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "were cut" in line]
    assert said == [(f"warning: {cut} of 40 texts were cut at --max-length 24 tokens (longest {longest} tokens; the "
                     "backbone allows 64): their ends are not in the store; --max-length 64 keeps as much as the "
                     "backbone takes")]
    root = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")
    stored = {int(r): int(n) for s in ("train", "validation", "test") for r, n in zip(root[s]["row"][:], root[s]["length"][:])}
    assert stored == {row: min(n, 24) for row, n in enumerate(full)}
    info = cli("info", tmp_path / "f.zarr")
    assert f"truncated  {cut} of 40 texts at 24 tokens (longest {longest} tokens; backbone allows 64)" in info.output


def test_encode_cuts_as_the_tokenizer_does_and_counts_the_tokens_before_the_cut(tiny_bert):
    """Pairs keep the tokenizer's own truncation (longest first, closing [SEP]); a text is tokenized once unless cut."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    texts = ["good movie", " ".join(WORDS), "bad plot " * 10, "fun"]
    pairs = ["the film", "awful", " ".join(WORDS), "nice " * 30]
    encoded, full = encode(tokenizer, texts, pairs, 16)
    assert dict(encoded) == dict(tokenizer(texts, pairs, truncation=True, max_length=16))
    assert full.tolist() == [len(ids) for ids in tokenizer(texts, pairs)["input_ids"]]


def test_a_text_that_starts_with_the_tokenizers_bos_or_cls_string_gets_it_once(tiny_gemma, tiny_bert, tmp_path):
    """A chat-templated '<bos>...' (or a '[CLS] ...' dump) is tokenized as the same text without it, in extract and
    predict, and each is said once; other special-token strings are named in a note."""
    for folder, prefix in ((tiny_gemma, "<bos>"), (tiny_bert, "[CLS]")):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        ids = encode(tokenizer, [prefix + "good movie", "good movie"], None, 24)[0]["input_ids"]
        assert ids[0] == ids[1] and ids[0].count(tokenizer.convert_tokens_to_ids(prefix)) == 1

    rows = sentiment_rows(40)
    rows += [("<bos>" + rows[i][0], rows[i][1]) for i in (1, 2, 3)] + [("good <eos> movie", "pos")]
    table = write_table(tmp_path / "chat.csv", rows)
    result = cli(*extract_args(tiny_gemma, table, tmp_path / "f.zarr"))
    assert result.exit_code == 0, result.output
    assert "note: 3 texts already begin with '<bos>', which the tokenizer puts first itself" in result.output
    assert "chat.csv lines 42, 43, 44" in result.output
    assert f"note: 1 text holds special-token strings such as '<eos>' ({table} line 45)" in result.output
    assert "were cut" not in result.output
    features = {row: f for split in ("train", "validation", "test") for row, f in _features(tmp_path / "f.zarr", split).items()}
    for copy, original in zip((40, 41, 42), (1, 2, 3)):
        np.testing.assert_allclose(features[copy], features[original], rtol=1e-3, atol=1e-3)

    assert cli("fit", "--method", "linear", "--cache", tmp_path / "f.zarr", "--epochs", 1, "--out", tmp_path / "m").exit_code == 0
    predicted = cli("predict", tmp_path / "m", "--text", "<bos>good great movie", "--text", "good great movie")
    assert predicted.exit_code == 0, predicted.output
    assert "note: 1 text already begins with '<bos>'" in predicted.output
    records = [json.loads(line) for line in predicted.output.splitlines() if line.startswith("{")]
    assert records[0]["probabilities"] == pytest.approx(records[1]["probabilities"], abs=1e-5)


def test_labels_that_differ_only_in_invisible_characters_or_unicode_form_are_one_class_and_said(tmp_path):
    lookalikes = {"pos": ["positive", "positive\u200b", "\ufeffpositive"], "neg": ["caf\u00e9", "cafe\u0301"]}
    rows = [(text, lookalikes[label][(i // 2) % len(lookalikes[label])]) for i, (text, label) in enumerate(sentiment_rows(40))]
    logged, log = lines_logged()
    dataset = load_dataset(str(write_table(tmp_path / "labels.csv", rows)), log=log)
    assert dataset.label_names == ["caf\u00e9", "positive"]
    assert [dataset.label_names[c] for c in dataset.labels] == [
        "positive" if "positive" in label else "caf\u00e9" for _, label in rows]
    changed = sum(label not in ("positive", "caf\u00e9") for _, label in rows)
    said = [line for line in logged if "labels normalised" in line]
    assert len(said) == 1 and said[0].startswith(f"note: {tmp_path / 'labels.csv'}: {changed} labels normalised"), logged
    assert "'positive\\u200b' -> 'positive'" in said[0] and "'cafe\\u0301' -> 'café'" in said[0]


def test_a_label_with_a_no_break_space_inside_is_the_label_with_a_space(tmp_path):
    rows = [(text, "very good" if label == "pos" else ("very\u00a0bad" if i % 4 else "very bad"))
            for i, (text, label) in enumerate(sentiment_rows(40))]
    assert load_dataset(str(write_table(tmp_path / "nbsp.csv", rows)), log=lambda _: None).label_names == [
        "very bad", "very good"]


def _regression_table(path, targets):
    return write_table(path, [(text, targets[i % len(targets)]) for i, (text, _) in enumerate(sentiment_rows(40))])


@pytest.mark.parametrize("targets, mark, values", [
    (["4,25", "1.197,45", "3", "-0,5"], ",", [4.25, 1197.45, 3.0, -0.5]),
    (["1,197.45", "2.5", "1 000 000.5", "7"], ".", [1197.45, 2.5, 1000000.5, 7.0]),
])
def test_targets_with_a_decimal_comma_or_thousands_separators_name_the_option_that_reads_them(tmp_path, targets,
                                                                                                 mark, values):
    table = _regression_table(tmp_path / "scores.csv", targets)
    with pytest.raises(InputError, match=f"--decimal-mark '{mark}' reads") as error:
        load_dataset(str(table), task="regression", log=lambda _: None)
    assert "--task classification" not in str(error.value)
    assert_one_line_error(cli(*extract_args("x", table, tmp_path / "f.zarr", "--task", "regression")),
                          f"--decimal-mark '{mark}' reads {targets[0]!r} as")

    logged, log = lines_logged()
    dataset = load_dataset(str(table), task="regression", log=log, decimal_mark=mark)
    np.testing.assert_allclose(dataset.labels, np.resize(np.float32(values), 40))
    assert any(f"with {mark!r} as the decimal mark" in line for line in logged), logged


def test_an_ambiguous_thousands_separator_is_never_guessed(tmp_path):
    table = _regression_table(tmp_path / "scores.csv", ["1,197", "2"])
    with pytest.raises(InputError, match=r"--decimal-mark '\.' reads '1,197' as 1197 or --decimal-mark ',' reads "
                                         r"'1,197' as 1\.197"):
        load_dataset(str(table), task="regression", log=lambda _: None)
    assert load_dataset(str(table), task="regression", log=lambda _: None, decimal_mark=",").labels[0] == np.float32(1.197)
    with pytest.raises(InputError, match=r"is not numeric \('good'.*\(or use --task classification\)"):
        load_dataset(str(_regression_table(tmp_path / "words.csv", ["good", "2"])), task="regression", log=lambda _: None)


def test_extract_reads_decimal_commas_with_the_option(tiny_bert, tmp_path):
    table = _regression_table(tmp_path / "scores.csv", ["4,25", "1.197,45"])
    result = cli(*extract_args(tiny_bert, table, tmp_path / "f.zarr", "--task", "regression", "--decimal-mark", ","))
    assert result.exit_code == 0, result.output
    root = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")
    targets = {int(r): float(y) for s in ("train", "validation", "test") for r, y in zip(root[s]["row"][:], root[s]["label"][:])}
    assert targets == {row: pytest.approx(4.25 if row % 2 == 0 else 1197.45) for row in range(40)}
    assert_one_line_error(cli(*extract_args(tiny_bert, table, tmp_path / "g.zarr", "--decimal-mark", ",")),
                          "--decimal-mark says how regression targets are written")
