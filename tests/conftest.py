"""Shared fixtures: a tiny randomly initialised BERT folder and small labelled tables."""
from __future__ import annotations

import csv
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("good great fine fun love best nice bad awful poor dull hate worst boring the a movie film plot "
         "actor scene was is very not quite").split()


def write_tiny_bert(folder, layers=2, hidden=32, seed=0, mean_pooling=True):
    """A random BERT; with mean_pooling it is laid out like a sentence-transformers folder (as MiniLM is)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    if mean_pooling:
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder


def write_table(path, rows, columns=("text", "label")):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def sentiment_rows(count, seed=0):
    """Short texts whose label follows from their words, so a side network can learn it."""
    import random

    rng = random.Random(seed)
    positive, negative, neutral = WORDS[:7], WORDS[7:14], WORDS[14:]
    rows = []
    for i in range(count):
        label = i % 2
        words = rng.sample(positive if label else negative, 2) + rng.sample(neutral, rng.randint(1, 8))
        rng.shuffle(words)
        rows.append((" ".join(words), "pos" if label else "neg"))
    return rows


@pytest.fixture(scope="session", autouse=True)
def auto_is_the_cpu():
    """`--device auto` (the default of extract, fit, sweep, evaluate, predict, baseline) means the CPU in tests, so a
    CPU test stays a CPU fp32 run on a machine with a GPU; GPU tests ask for `cuda` by name. `real_auto` undoes it."""
    import cachetune.stages.runtime  # noqa: F401  (binds the submodule)
    from cachetune import stages

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages.runtime, "auto_device", lambda: torch.device("cpu"))
        yield


@pytest.fixture()
def real_auto(monkeypatch):
    import cachetune.stages.runtime  # noqa: F401  (binds the submodule)
    from cachetune import stages

    monkeypatch.setattr(stages.runtime, "auto_device", REAL_AUTO_DEVICE)


def _real_auto_device():
    import cachetune.stages.runtime  # noqa: F401  (binds the submodule)
    from cachetune import stages

    return stages.runtime.auto_device


REAL_AUTO_DEVICE = _real_auto_device()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and spares the CPU when other work shares it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def tiny_table(tmp_path):
    return write_table(tmp_path / "data.csv", sentiment_rows(120))
