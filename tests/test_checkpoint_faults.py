"""Backbone checkpoints taken on trust used to give a complete store of random features (tensors under a wrapper's
key prefix, renamed or missing), run half-precision forward passes under an fp32 key (a bf16 or fp16 save), or send
the user to options they never set (a folder holding a .gguf, --max-length beyond a block). Each is now one line
naming the fix (exit 2), or the checkpoint is read as float32; a legitimately headless load stays silent."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from cachetune.cache.errors import InputError
from cachetune.stages.backbones import load_backbone, resolve_backbone
from tests.test_extract import assert_one_line_error, cli, run_extract

SMALL = ["--block-tokens", 128, "--chunk-tokens", 32, "--batch-size", 8, "--max-length", 24]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resave(source, target, rename=lambda key: key, keep=lambda key: True, dtype=None):
    """A copy of the model folder `source` whose weights are re-saved with keys renamed, some left out, or cast."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors", "pytorch_model.bin"))
    state = load_file(os.path.join(source, "model.safetensors"))
    state = {rename(key): tensor if dtype is None else tensor.to(dtype) for key, tensor in state.items() if keep(key)}
    save_file(state, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return target


def extract_args(backbone, data, out, *extra):
    return ["extract", "--backbone", backbone, "--data", data, "--out", out, *SMALL, *extra]


def looks_complete(store) -> bool:
    return os.path.exists(store) and zarr.open_group(str(store), mode="r").attrs.get("status") == "complete"


def with_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


MISFITS = {
    "DataParallel prefix": (dict(rename=lambda key: "module." + key), "prefix 'module.' (e.g. module.embeddings."),
    "Lightning wrapper prefix": (dict(rename=lambda key: "model.bert." + key), "prefix 'model.' (e.g. model.bert.embeddings."),
    "a layer left out": (dict(keep=lambda key: not key.startswith("encoder.layer.1.")), "lacks 16 tensors the model uses (e.g. encoder.layer.1."),
    "renamed tensors": (dict(rename=lambda key: key.replace("attention.self.", "attn.")),
                        "12 tensors missing (e.g. encoder.layer.0.attention.self.key.bias), which would be random "
                        "weights, and it has 12 the model does not use (e.g. encoder.layer.0.attn.key.bias)"),
    "another width": (dict(), "of another shape (e.g. encoder.layer.0.intermediate.dense.bias: (64,) in the checkpoint, (80,)"),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_checkpoint_that_does_not_fit_its_architecture_is_one_line_and_no_store(case, tiny_bert, tiny_table, tmp_path):
    changes, fragment = MISFITS[case]
    folder = resave(tiny_bert, tmp_path / "model", **changes)
    if case == "another width":
        with_config(folder, intermediate_size=80)
    out = tmp_path / "f.zarr"
    result = cli(*extract_args(folder, tiny_table, out))
    assert_one_line_error(result, fragment)
    assert "LOAD REPORT" not in result.output
    assert not looks_complete(out)


def test_a_refused_checkpoint_prints_only_our_line(tiny_bert, tiny_table, tmp_path):
    """In a real process, where transformers' own load report would go to stderr beside the error."""
    folder = resave(tiny_bert, tmp_path / "model", rename=lambda key: "module." + key)
    result = subprocess.run([sys.executable, "-m", "cachetune.pipeline.cli", *map(str, extract_args(folder, tiny_table, tmp_path / "f.zarr"))],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.splitlines() if "prefix 'module.'" in line]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture()
def transformers_log():
    """What transformers logs at warning level or above while the test runs."""
    records, logger = Records(), logging.getLogger("transformers")
    logger.addHandler(records)
    yield records.messages
    logger.removeHandler(records)


def hidden_states(backbone, texts=("a good film", "the plot was dull")):
    batch = backbone.tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.inference_mode():
        return torch.stack(backbone.model(**batch, output_hidden_states=True).hidden_states)


@pytest.mark.parametrize("case", ["without the pooler", "with a classification head"])
def test_headless_real_minilm_loads_silently_with_the_same_features(case, tmp_path, transformers_log):
    """Keys the hidden states never use may be missing (a pooler) or unexpected (a task head); MiniLM is real."""
    minilm = resolve_backbone("minilm")
    original = load_backbone(str(minilm))
    if case == "without the pooler":
        folder = resave(minilm, tmp_path / "headless", keep=lambda key: not key.startswith("pooler."))
    else:
        folder = resave(minilm, tmp_path / "classifier", rename=lambda key: "bert." + key)
        state = load_file(folder / "model.safetensors")
        state |= {"classifier.weight": torch.zeros(2, 384), "classifier.bias": torch.zeros(2)}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = load_backbone(str(folder))
    assert transformers_log == []
    assert torch.equal(hidden_states(loaded), hidden_states(original))


def test_real_minilm_under_a_wrapper_prefix_is_refused(tmp_path, transformers_log):
    folder = resave(resolve_backbone("minilm"), tmp_path / "wrapped", rename=lambda key: "module." + key)
    with pytest.raises(InputError, match=r"^the checkpoint at .* 101 tensors missing .* prefix 'module.'"):
        load_backbone(str(folder))
    assert transformers_log == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_is_read_as_float32(dtype, tiny_bert, tiny_table, tmp_path):
    from transformers import AutoModel

    from cachetune.cache.reader import CacheReader
    from cachetune.pipeline.data import load_dataset

    folder = resave(tiny_bert, tmp_path / "half", dtype=dtype)
    with_config(folder, dtype=str(dtype).removeprefix("torch."))  # as save_pretrained of a half model writes it
    assert AutoModel.from_pretrained(folder).dtype == dtype  # what transformers alone makes of it
    out = tmp_path / "f.zarr"
    assert run_extract(folder, tiny_table, out, dtype="float32") == "written"
    assert "precision" not in zarr.open_group(str(out)).attrs["key"]
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()  # the half weights, computed in float32
    dataset, reader = load_dataset(str(tiny_table)), CacheReader(str(out), "train")
    texts = [dataset.texts[i] for i in reader.group["row"][:]]
    batch = load_backbone(str(folder)).tokenizer(texts, truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = torch.stack(model(**batch, output_hidden_states=True).hidden_states, 1)
    for stored in reader.batches(batch_size=16):
        for row, sample in enumerate(stored.index):
            n = int(batch["attention_mask"][sample].sum())
            np.testing.assert_allclose(stored.features[row, :, :n], expected[sample, :, :n], atol=1e-5, rtol=1e-4)


def test_baseline_runs_on_a_bfloat16_checkpoint(tiny_bert, tiny_table, tmp_path):
    folder = with_config(resave(tiny_bert, tmp_path / "bf16", dtype=torch.bfloat16), dtype="bfloat16")
    result = cli("baseline", "--method", "full", "--backbone", folder, "--data", tiny_table, "--epochs", 1,
                 "--out", tmp_path / "full")
    assert result.exit_code == 0, result.output
    assert "accuracy" in json.loads((tmp_path / "full" / "metrics.json").read_text())["test"]


def test_folder_holding_only_a_gguf_names_it(tiny_table, tmp_path):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "SmolLM2-135M.Q4_1.gguf").write_bytes(b"GGUF")
    out = tmp_path / "f.zarr"
    result = cli(*extract_args(folder, tiny_table, out))
    assert_one_line_error(result, f"{folder} holds no config.json but has SmolLM2-135M.Q4_1.gguf: "
                                  f"pass --backbone {folder / 'SmolLM2-135M.Q4_1.gguf'}")
    assert not out.exists()


@pytest.mark.parametrize("options, fragment", [
    (["--max-length", 48, "--block-tokens", 32, "--chunk-tokens", 32],
     "--max-length 48 does not fit a block of --block-tokens 32 tokens; pass --block-tokens 64"),
    (["--max-length", 200, "--block-tokens", 128, "--chunk-tokens", 32],  # the tiny BERT has 64 positions
     "--max-length 200 is more than the backbone at"),
    (["--block-tokens", 100, "--chunk-tokens", 32],
     "--block-tokens 100 is not a multiple of --chunk-tokens 32; use --block-tokens 128"),
])
def test_max_length_beyond_a_block_or_the_backbone_names_the_option_to_change(options, fragment, tiny_bert, tiny_table, tmp_path):
    out = tmp_path / "f.zarr"
    result = cli("extract", "--backbone", tiny_bert, "--data", tiny_table, "--out", out, *options)
    assert_one_line_error(result, fragment)
    if "200" in fragment:
        assert "(its position table: 64 tokens) and than --block-tokens 128; use --max-length 64 or less" in result.output
    assert not out.exists()


def test_library_extract_refuses_max_length_beyond_a_block_with_the_fix(tiny_bert, tiny_table, tmp_path):
    with pytest.raises(InputError, match="pass --block-tokens 64"):
        run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr", max_length=48, block_tokens=32, chunk_tokens=32)
