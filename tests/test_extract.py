"""Stage one: cached features, resume after a crash, refusal of changed settings, checksums."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from cachetune.cache.errors import InputError
from cachetune.cache.layout import layer_array_name
from cachetune.cache.reader import CacheReader
from cachetune.pipeline.cli import main
from cachetune.pipeline.data import load_dataset
from cachetune.stages.backbones import load_backbone
from cachetune.stages.extraction.extract import ExtractSettings, extract

SMALL = dict(block_tokens=128, chunk_tokens=32, batch_size=8, max_length=24, sort_tokens=256, dtype="float16")


def run_extract(model_folder, table, out, **overrides):
    settings = ExtractSettings(out=str(out), **{**SMALL, **overrides})
    return extract(load_backbone(str(model_folder)), load_dataset(str(table)), settings, log=lambda *_: None)


def direct_hidden_states(model_folder, texts, max_length):
    backbone = load_backbone(str(model_folder))
    batch = backbone.tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = backbone.model(**batch, output_hidden_states=True).hidden_states
    return torch.stack(hidden, 1), batch["attention_mask"].bool()


def store_arrays(path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {f"{split}/{name}": root[split][name][:] for split in root.group_keys() for name in root[split].array_keys()}


def assert_matches_direct(model_folder, table, store, max_length, atol):
    dataset = load_dataset(str(table))
    for split in ("train", "test"):
        reader = CacheReader(str(store), split)
        texts = [dataset.texts[i] for i in reader.group["row"][:]]
        expected, mask = direct_hidden_states(model_folder, texts, max_length)
        seen = 0
        for batch in reader.batches(batch_size=7):
            for row, sample in enumerate(batch.index):
                n = int(mask[sample].sum())
                assert batch.mask[row].sum() == n
                np.testing.assert_allclose(batch.features[row, :, :n], expected[sample, :, :n], atol=atol, rtol=1e-2)
                seen += 1
        assert seen == len(reader)
        np.testing.assert_array_equal(reader.labels, dataset.labels[reader.group["row"][:]])


def test_cached_features_equal_a_direct_forward(tiny_bert, tiny_table, tmp_path):
    assert run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr") == "written"
    assert_matches_direct(tiny_bert, tiny_table, tmp_path / "f.zarr", SMALL["max_length"], atol=5e-3)


def test_float32_store_is_exact(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr", dtype="float32")
    assert_matches_direct(tiny_bert, tiny_table, tmp_path / "f.zarr", SMALL["max_length"], atol=1e-5)


def test_rerun_is_a_no_op(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr")
    assert run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr") == "complete"


def crash_on_third_block(monkeypatch):
    """Make the third block's write stop after its first layer's shard (a kill between the shards of one block);
    returns a function that puts the real write back."""
    from cachetune.cache import writer

    original, calls = writer.SplitWriter.write_block, []

    def crashing(self, block, buffer):
        calls.append(block)
        if len(calls) == 3:
            self.arrays[0][block * self.plan.block_tokens:(block + 1) * self.plan.block_tokens] = buffer[0]
            raise KeyboardInterrupt("simulated kill between the shards of one block")
        original(self, block, buffer)

    monkeypatch.setattr(writer.SplitWriter, "write_block", crashing)
    return lambda: monkeypatch.setattr(writer.SplitWriter, "write_block", original)


def test_crash_then_rerun_gives_identical_contents(tiny_bert, tiny_table, tmp_path, monkeypatch):
    run_extract(tiny_bert, tiny_table, tmp_path / "clean.zarr")
    restore = crash_on_third_block(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_extract(tiny_bert, tiny_table, tmp_path / "crashed.zarr")
    assert zarr.open_group(str(tmp_path / "crashed.zarr")).attrs["status"] == "incomplete"
    with pytest.raises(InputError, match="incomplete"):
        CacheReader(str(tmp_path / "crashed.zarr"), "train")
    restore()
    assert run_extract(tiny_bert, tiny_table, tmp_path / "crashed.zarr") == "written"
    clean, resumed = store_arrays(tmp_path / "clean.zarr"), store_arrays(tmp_path / "crashed.zarr")
    assert clean.keys() == resumed.keys()
    for name in clean:
        np.testing.assert_array_equal(clean[name], resumed[name], err_msg=name)


def test_changed_setting_is_refused_unless_overwrite(tiny_bert, tiny_table, tmp_path):
    out = tmp_path / "f.zarr"
    run_extract(tiny_bert, tiny_table, out)
    with pytest.raises(InputError, match="max_length"):
        run_extract(tiny_bert, tiny_table, out, max_length=16)
    assert run_extract(tiny_bert, tiny_table, out, max_length=16, overwrite=True) == "written"


def test_flipped_byte_is_detected_and_names_the_array(tiny_bert, tiny_table, tmp_path):
    out = tmp_path / "f.zarr"
    run_extract(tiny_bert, tiny_table, out, layers="last:1")
    shard = sorted((out / "train" / layer_array_name(2) / "c").rglob("*"))
    shard = [p for p in shard if p.is_file()][0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = CacheReader(str(out), "train")
    with pytest.raises(InputError, match=f"train/{layer_array_name(2)}.*corrupt"):
        list(reader.batches(batch_size=16))


def test_zstd_round_trips_and_lossy_is_removed_with_its_replacement_named(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr", codec="zstd")
    assert_matches_direct(tiny_bert, tiny_table, tmp_path / "f.zarr", SMALL["max_length"], atol=5e-3)
    result = CliRunner().invoke(main, ["extract", "--lossy", "bitround:7", "--out", str(tmp_path / "l.zarr")])
    assert result.exit_code == 2 and "--dtype int8" in result.output and "Traceback" not in result.output


def test_reader_shuffles_by_seed_and_in_memory_matches_streaming(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr", layers="0,2")
    reader = CacheReader(str(tmp_path / "f.zarr"), "train", layers=[2])
    first = np.concatenate([b.index for b in reader.batches(8, shuffle=True, seed=1, buffer_bytes=1 << 20)])
    again = np.concatenate([b.index for b in reader.batches(8, shuffle=True, seed=1, buffer_bytes=1 << 20)])
    other = np.concatenate([b.index for b in reader.batches(8, shuffle=True, seed=2, buffer_bytes=1 << 20)])
    np.testing.assert_array_equal(first, again)
    assert sorted(first) == list(range(len(reader))) and not np.array_equal(first, other)
    memory = CacheReader(str(tmp_path / "f.zarr"), "train", layers=[2], in_memory=True)
    for streamed, loaded in zip(reader.batches(8), memory.batches(8)):
        assert torch.equal(streamed.features, loaded.features) and streamed.features.shape[1] == 1
    with pytest.raises(InputError, match="lacks layers"):
        CacheReader(str(tmp_path / "f.zarr"), "train", layers=[1])


def cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def assert_one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.output


@pytest.mark.parametrize("case, fragment", [
    ("missing_file", "not found"),
    ("missing_column", "no column 'text'"),
    ("empty", "empty"),
    ("unknown_label_column", "no column 'stars'"),
    ("layer_out_of_range", "out of range"),
    ("unreadable_model", "cannot load the backbone"),
])
def test_bad_input_exits_2_with_one_line_and_no_complete_store(case, fragment, tiny_bert, tiny_table, tmp_path):
    out = tmp_path / "f.zarr"
    args = ["extract", "--backbone", tiny_bert, "--data", tiny_table, "--out", out, "--block-tokens", 128, "--chunk-tokens", 32]
    if case == "missing_file":
        args[4] = tmp_path / "nope.csv"
    elif case == "missing_column":
        args[4] = tmp_path / "other.csv"
        args[4].write_text("sentence,label\nhi,1\n")
    elif case == "empty":
        args[4] = tmp_path / "empty.csv"
        args[4].write_text("text,label\n")
    elif case == "unknown_label_column":
        args += ["--label-column", "stars"]
    elif case == "layer_out_of_range":
        args += ["--layers", "0,7"]
    elif case == "unreadable_model":
        broken = tmp_path / "broken-model"
        broken.mkdir()
        (broken / "config.json").write_text("{not json")
        args[2] = broken
    assert_one_line_error(cli(*args), fragment)
    assert not out.exists() or zarr.open_group(str(out)).attrs.get("status") != "complete"


def test_block_buffers_beyond_free_memory_are_refused_with_the_fix(tiny_bert, tiny_table, tmp_path, monkeypatch):
    from cachetune.stages.extraction import host_memory

    # defaults on a CPU: sort groups of 4 blocks, two groups in flight plus one writer thread = 9 buffers ...
    assert host_memory.buffer_count(ExtractSettings(out="x"), "cpu") == 9
    assert host_memory.block_buffer_bytes(ExtractSettings(out="x", dtype="fp8"), 3, 32) == 3 * 8192 * 32 * 2  # bfloat16
    assert host_memory.block_buffer_bytes(ExtractSettings(out="x", dtype="int8"), 3, 32) == 3 * 8192 * 32 * 4
    # ... but a group never spans more blocks than the largest split can fill
    assert host_memory.buffer_count(ExtractSettings(out="x"), "cpu", split_tokens=6144) == 3
    # tiny_table's 96 training rows x 24 tokens fill at most 10 blocks of 256: 21 buffers of [3, 256, 32] float16, 1008 KiB
    monkeypatch.setattr(host_memory, "available_memory", lambda: 600 * 2**10)
    out = tmp_path / "f.zarr"
    args = ["extract", "--backbone", tiny_bert, "--data", tiny_table, "--out", out, "--block-tokens", 256,
            "--chunk-tokens", 32, "--max-length", 24]
    assert_one_line_error(cli(*args), "lower --sort-tokens to 512 (now 32768")
    assert not list(tmp_path.glob("f.zarr*"))  # refused before the store or its lock file is made
    assert cli(*args, "--sort-tokens", 512).exit_code == 0  # 5 buffers, 240 KiB: the value it named runs
    monkeypatch.setattr(host_memory, "available_memory", lambda: 100 * 2**10)  # under two buffers
    assert_one_line_error(cli(*args, "--out", tmp_path / "g.zarr"), "cache fewer layers (--layers every:4")


def test_local_dask_workers_beyond_free_memory_are_refused_with_the_fix(tiny_bert, tiny_table, tmp_path, monkeypatch):
    from cachetune.stages.extraction import host_memory

    settings = ExtractSettings(out="x", block_tokens=256, max_length=24)
    # each worker: its own process, its own copy of the weights and one sort group (at most 10 blocks: tiny_table's
    # 96 training rows x 24 tokens) of [3, 256, 32] float16 buffers
    per_worker = (host_memory.group_blocks(settings, 96 * 24) * host_memory.block_buffer_bytes(settings, 3, 32)
                  + host_memory.weight_bytes(load_backbone(tiny_bert)) + host_memory.WORKER_PROCESS_BYTES)
    monkeypatch.setattr(host_memory, "available_memory", lambda: int(2.5 * per_worker))
    args = ["extract", "--backbone", tiny_bert, "--data", tiny_table, "--out", tmp_path / "f.zarr", "--block-tokens",
            256, "--chunk-tokens", 32, "--max-length", 24]
    assert_one_line_error(cli(*args, "--workers", 3), "lower --workers to 1")  # before any worker process starts
    assert not list(tmp_path.glob("f.zarr*"))
    monkeypatch.setattr(host_memory, "available_memory", lambda: per_worker // 2)
    assert_one_line_error(cli(*args, "--workers", 1), "run without --workers")
    # memory to spare, but dask would give each of 10,000 workers less than one needs (it would pause or kill them)
    monkeypatch.setattr(host_memory, "available_memory", lambda: 10**5 * per_worker)
    assert_one_line_error(cli(*args, "--workers", 10**4), "dask pauses each of 10000 workers")


def test_info_reports_size_against_padded_float32(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr")
    result = cli("info", tmp_path / "f.zarr")
    assert result.exit_code == 0, result.output
    assert "[complete]" in result.output and "padded float32" in result.output
    assert "splits     seeded and stratified where the data gave none (--split-seed 0)" in result.output  # no split column
    assert_one_line_error(cli("info", tmp_path / "missing.zarr"), "no cache")


@pytest.mark.real
def test_real_minilm_on_movie_snippets_matches_a_direct_forward(tmp_path):
    from cachetune.pipeline.data import load_movies
    from tests.conftest import write_table

    texts, labels, names = load_movies()
    table = write_table(tmp_path / "movies.csv", [(t, names[y]) for t, y in zip(texts[:48], labels[:48])])
    from cachetune.stages.backbones import resolve_backbone

    run_extract(resolve_backbone("minilm"), table, tmp_path / "f.zarr", max_length=64, block_tokens=1024, chunk_tokens=256)
    assert_matches_direct(resolve_backbone("minilm"), table, tmp_path / "f.zarr", 64, atol=2e-2)


def test_kill_9_mid_extraction_then_rerun_equals_a_clean_run(tiny_bert, tmp_path):
    """A real SIGKILL of the `pipeline extract` process, once some blocks are flagged done."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import sentiment_rows, write_table

    table = write_table(tmp_path / "data.csv", sentiment_rows(1500))
    args = [sys.executable, "-m", "cachetune.pipeline.cli", "extract", "--backbone", str(tiny_bert), "--data", str(table),
            "--block-tokens", "128", "--chunk-tokens", "32", "--batch-size", "8", "--max-length", "24", "--sort-tokens", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--out", str(tmp_path / "clean.zarr")], check=True, capture_output=True, env=env)
    victim = subprocess.Popen(args + ["--out", str(tmp_path / "killed.zarr")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    done_flags = tmp_path / "killed.zarr" / "train" / "done" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if done_flags.exists() and len(list(done_flags.iterdir())) >= 3:
            break
        time.sleep(0.005)
    assert victim.poll() is None, "extraction finished before it could be killed; use more data"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert zarr.open_group(str(tmp_path / "killed.zarr")).attrs["status"] == "incomplete"
    rerun = subprocess.run(args + ["--out", str(tmp_path / "killed.zarr")], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0 and "resuming" in rerun.stdout + rerun.stderr
    clean, resumed = store_arrays(tmp_path / "clean.zarr"), store_arrays(tmp_path / "killed.zarr")
    assert clean.keys() == resumed.keys()
    for name in clean:
        np.testing.assert_array_equal(clean[name], resumed[name], err_msg=name)


def test_unpacked_model_folder_is_the_shallowest_config(tmp_path):
    """A zip that nests the model one level down, with a sentence-transformers 1_Pooling/config.json beside it."""
    from cachetune.stages.backbones import _model_folder

    model = tmp_path / "all-mpnet-base-v2"
    (model / "1_Pooling").mkdir(parents=True)
    (model / "1_Pooling" / "config.json").write_text("{}")
    (model / "config.json").write_text('{"model_type": "mpnet"}')
    assert _model_folder(tmp_path) == model


def test_token_table_batches_equal_tokenizer_pad(tiny_bert):
    from cachetune.stages.extraction.token_table import TokenTable

    tokenizer = load_backbone(str(tiny_bert)).tokenizer
    texts = ["good movie", "the plot was very boring and the actor was not quite fine", "a", "awful film"]
    pairs = ["great", "bad", "the scene", "dull plot is dull"]
    encoded = tokenizer(texts, pairs, truncation=True, max_length=12)
    table = TokenTable.from_encoded(encoded, tokenizer)
    for samples in ([1, 3, 0], [2], [3, 1]):
        inputs, lengths = table.batch(np.array(samples))
        expected = tokenizer.pad([{k: v[i] for k, v in encoded.items()} for i in samples], return_tensors="pt")
        assert inputs.keys() == expected.keys()
        for name in expected:
            assert torch.equal(inputs[name], expected[name]), name
        assert list(lengths) == [len(encoded["input_ids"][i]) for i in samples]
    part = table.subset([3, 1])  # what one distributed task ships: positions keep their meaning
    for name, values in part.batch(np.array([1, 3]))[0].items():
        assert torch.equal(values, table.batch(np.array([1, 3]))[0][name]), name


def test_precision_goes_into_the_key_and_bf16_features_are_close(tiny_bert, tiny_table, tmp_path):
    out = tmp_path / "f.zarr"
    run_extract(tiny_bert, tiny_table, out)
    assert "precision" not in zarr.open_group(str(out)).attrs["key"]  # fp32: stores made before the option stay valid
    with pytest.raises(InputError, match="precision"):
        run_extract(tiny_bert, tiny_table, out, precision="bf16")
    assert run_extract(tiny_bert, tiny_table, tmp_path / "bf16.zarr", precision="bf16") == "written"
    assert zarr.open_group(str(tmp_path / "bf16.zarr")).attrs["key"]["precision"] == "bf16"
    assert_matches_direct(tiny_bert, tiny_table, tmp_path / "bf16.zarr", SMALL["max_length"], atol=0.1)
    fp32, bf16 = store_arrays(out), store_arrays(tmp_path / "bf16.zarr")
    assert not np.array_equal(fp32["train/layer_02"], bf16["train/layer_02"])


def test_sort_groups_give_the_same_features_as_sorting_each_block(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "block.zarr", sort_tokens=128, dtype="float32")
    run_extract(tiny_bert, tiny_table, tmp_path / "group.zarr", sort_tokens=100_000, dtype="float32")
    block, group = store_arrays(tmp_path / "block.zarr"), store_arrays(tmp_path / "group.zarr")
    assert block.keys() == group.keys()
    for name in block:
        np.testing.assert_allclose(block[name], group[name], atol=1e-5, err_msg=name)


def test_inf_or_nan_features_raise_one_input_error():
    from cachetune.stages.extraction.extract import block_buffer, start_group

    def forward(samples):
        hidden = torch.ones(len(samples), 3, 4)
        hidden[0, 1, 2] = 1e6  # beyond float16
        return (hidden, hidden), np.full(len(samples), 3), np.zeros(len(samples), np.int64)

    lengths = np.full(4, 3)
    buffers = [block_buffer(2, 16, 4, "float16", "cpu")]
    [pending] = start_group(forward, [np.arange(4)], lengths, [0, 1], buffers, batch_size=2)
    with pytest.raises(InputError, match="overflow float16"):
        pending.result()
    buffers = [block_buffer(2, 16, 4, "float32", "cpu")]
    [pending] = start_group(forward, [np.arange(4)], lengths, [0, 1], buffers, batch_size=2)
    assert pending.result()[0, :12].max() == 1e6 and not pending.result()[:, 12:].any()
    buffers = [block_buffer(2, 16, 4, "fp8", "cpu")]  # bfloat16: float32's range in half its bytes
    [pending] = start_group(forward, [np.arange(4)], lengths, [0, 1], buffers, batch_size=2)
    features = pending.result()
    assert features.dtype == ml_dtypes.bfloat16 and features.nbytes == 2 * 16 * 4 * 2
    assert float(features[0, :12].max()) == pytest.approx(1e6, rel=2 ** -8) and not features[:, 12:].any()


def test_several_writer_threads_write_everything_and_raise_the_first_error():
    from cachetune.cache.writer import BackgroundWriter

    done = []
    background = BackgroundWriter(threads=3)
    for i in range(20):
        background.submit(done.append, i)
    background.close()
    assert sorted(done) == list(range(20))

    def fail(i):
        raise OSError(f"disk full at {i}")

    background = BackgroundWriter(threads=2)
    with pytest.raises(OSError, match="disk full"):
        for i in range(20):
            background.submit(fail, i)
        background.wait_for(__import__("queue").Queue())  # a buffer that a failed write never gives back
    with pytest.raises(OSError, match="disk full"):
        background.close()


def test_bad_device_or_precision_exits_2(tiny_bert, tiny_table, tmp_path):
    args = ["extract", "--backbone", tiny_bert, "--data", tiny_table, "--out", tmp_path / "f.zarr"]
    if not torch.cuda.is_available():
        assert_one_line_error(cli(*args, "--device", "cuda"), "no CUDA GPU")
    assert_one_line_error(cli(*args, "--device", "tpu9"), "--device tpu9")
    assert cli(*args, "--precision", "fp8").exit_code == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_extraction_matches_the_cpu(tiny_bert, tiny_table, tmp_path, precision):
    run_extract(tiny_bert, tiny_table, tmp_path / "cpu.zarr")
    run_extract(tiny_bert, tiny_table, tmp_path / "gpu.zarr", device="cuda", precision=precision)
    cpu, gpu = store_arrays(tmp_path / "cpu.zarr"), store_arrays(tmp_path / "gpu.zarr")
    for name in cpu:
        np.testing.assert_allclose(cpu[name].astype(np.float32), gpu[name].astype(np.float32),
                                   atol=5e-3 if precision == "fp32" else 0.1, err_msg=name)
