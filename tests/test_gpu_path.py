"""The GPU path checked on the CPU where the logic allows (device policy, memory accounting, host syncs, static
shapes, compile), and on a GPU when there is one (skipped otherwise; every CUDA step runs under
`torch.cuda.set_sync_debug_mode("error")`, so a host sync inside a step fails the test)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cachetune.cache.errors import InputError
from cachetune.cache.hidden_states import CachedHiddenStates
from cachetune.cache.reader import CacheReader, open_store
from cachetune.stages import runtime as runtime_module
from cachetune.stages.methods import build_model, config_from_options
from cachetune.stages.runtime import DeviceMemory, Runtime, resolve_device, spread_device
from cachetune.stages.training.fit import FitSettings, device_batches, fit, spec_from_store
from cachetune.stages.training.static_shapes import bucket_length, pad_batch
from cachetune.stages.training.training_loop import Learner, Schedule
from tests.sync_count import HostSyncs
from tests.test_extract import assert_one_line_error, cli
from tests.test_fit import METHOD_OPTIONS, tiny_cache  # noqa: F401  (the module fixture)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_compiler = pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on the CPU needs g++")


@pytest.fixture()
def two_gpus(monkeypatch):
    """torch sees two CUDA GPUs: cuda:0 computes bf16 natively (8.0), cuda:1 is a T4 (7.5, emulated bf16 only)."""
    capability = {0: (8, 0), 1: (7, 5)}
    index = lambda device: torch.device(device).index or 0  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[index(device)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: ["A100", "Tesla T4"][index(device)])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what torch says of a T4: emulated


def test_bf16_is_asked_of_the_chosen_gpu_and_emulation_does_not_count(two_gpus):
    assert Runtime.resolve("cuda:0", None).precision == "bf16"
    assert Runtime.resolve("cuda:1", None).precision == "fp32"  # auto never picks emulated bf16
    with pytest.raises(InputError, match=r"Tesla T4 \(cuda:1\) has no native bf16.*7\.5"):
        Runtime.resolve("cuda:1", "bf16")
    assert Runtime.resolve("cuda:1", "fp16").precision == "fp16"


def test_a_gpu_the_machine_lacks_is_one_line(two_gpus, tiny_bert, tiny_table, tmp_path):
    with pytest.raises(InputError, match="2 GPU"):
        resolve_device("cuda:7")
    result = cli("extract", "--backbone", tiny_bert, "--data", tiny_table, "--out", tmp_path / "f.zarr",
                 "--device", "cuda:7")
    assert_one_line_error(result, "this machine has 2 GPU(s)")


def test_workers_spread_over_the_gpus(two_gpus):
    from cachetune.stages.extraction.distributed_extract import worker_device

    assert [spread_device("cuda", rank) for rank in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert spread_device("cuda:1", 0) == "cuda:1" and spread_device("cpu", 3) == "cpu"
    assert worker_device("cuda") == "cuda"  # not on a dask worker: as given


def test_extract_and_fit_default_to_auto():
    from cachetune.pipeline.cli import main
    from cachetune.stages.extraction.extract import ExtractSettings

    defaults = {command: {p.name: p.default for p in main.commands[command].params} for command in ("extract", "fit")}
    assert defaults["extract"]["device"] == defaults["fit"]["device"] == "auto"
    assert ExtractSettings(out="x").device == FitSettings().device == "auto"


def test_tests_pin_auto_to_the_cpu_and_real_auto_asks_torch(real_auto):
    assert runtime_module.auto_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_checkpoint_from_a_machine_with_more_gpus_resumes(monkeypatch):
    from cachetune.stages.training import checkpoint

    states = checkpoint.random_states()
    states["cuda"] = [torch.zeros(16, dtype=torch.uint8) + i for i in range(4)]  # saved on a 4-GPU machine
    set_on = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_on.append((int(state[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("sets all four"))
    checkpoint.set_random_states(states)
    assert set_on == [(0, 0), (1, 1)]


class FakeAllocator:
    """torch.cuda's allocator counters, driven by hand."""

    def __init__(self, monkeypatch):
        self.allocated = self.peak = 0
        for name, value in {"memory_allocated": lambda d=None: self.allocated,
                            "max_memory_allocated": lambda d=None: self.peak,
                            "memory_reserved": lambda d=None: self.allocated,
                            "max_memory_reserved": lambda d=None: self.peak,
                            "reset_peak_memory_stats": lambda d=None: setattr(self, "peak", self.allocated)}.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def use(self, nbytes):
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)


def test_step_windows_keep_the_invocation_peak_whole_and_the_cache_apart(monkeypatch):
    allocator = FakeAllocator(monkeypatch)
    memory = DeviceMemory(torch.device("cuda", 0))
    memory.start()
    allocator.use(300 * 2**20)  # a resident cache
    first, second = [0], [0]
    with memory.window(first):  # network one's step: 500 MB of activations, freed
        allocator.use(500 * 2**20)
        allocator.use(-500 * 2**20)
    with memory.window(second):  # network two's step, smaller; its reset must not lose network one's peak
        allocator.use(100 * 2**20)
        allocator.use(-100 * 2**20)
    assert (first[0], second[0]) == (500 * 2**20, 100 * 2**20)
    report = memory.report(resident_bytes=300 * 2**20)
    assert report["peak_gpu_allocated_mb"] == 500 and report["resident_cache_gpu_mb"] == 300


def test_cpu_runs_report_no_gpu_memory(tiny_cache, tmp_path):  # noqa: F811
    metrics = fit(str(tiny_cache[0]), config_from_options("linear", {}), FitSettings(epochs=1, batch_size=16,
                  in_memory=True, device="cpu"), tmp_path / "m", show_progress=False)
    assert not any(key.startswith(("peak_gpu", "resident")) for key in metrics) and metrics["data_path"] == "in RAM"


def test_buckets_and_padding_rows():
    assert [bucket_length(n, 128) for n in (1, 32, 33, 97, 128)] == [32, 32, 64, 128, 128]
    features, mask = torch.randn(3, 2, 5, 4), torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [1] * 4 + [0]]).bool()
    features = features * mask[:, None, :, None]
    states, labels, rows = pad_batch(CachedHiddenStates(features, mask), torch.tensor([0, 1, 0]), 8, max_length=16)
    padded, pmask = states.codes, states.mask
    assert padded.shape == (8, 2, 8, 4) and pmask.shape == (8, 8) and rows == 3 and labels.tolist()[3:] == [0] * 5
    assert torch.equal(padded[:3, :, :5], features) and not padded[:, :, 5:].any() and not pmask[:, 5:].any()
    assert torch.equal(padded[3:], features[:1].expand(5, -1, -1, -1).new_zeros(5, 2, 8, 4) + padded[:1])


def small_fit(cache, out, method="linear", **settings):
    options = {**METHOD_OPTIONS[method], **({"dropout": "0"} if method in ("lst", "sherl", "synqt") else {})}
    base = dict(epochs=2, batch_size=24, lr=1e-2, warmup_ratio=0.0, device="cpu")  # 128 / 24: a short last batch
    return fit(str(cache), config_from_options(method, options), FitSettings(**{**base, **settings}), out,
               show_progress=False)


@pytest.mark.parametrize("method", ["linear", "lst"])
def test_static_shapes_train_as_the_plain_batches_do(method, tiny_cache, tmp_path):  # noqa: F811
    plain = small_fit(tiny_cache[0], tmp_path / "plain", method)
    static = small_fit(tiny_cache[0], tmp_path / "static", method, static_shapes=True)
    for key in ("train_loss", "validation_accuracy"):
        assert [e[key] for e in static["history"]] == pytest.approx([e[key] for e in plain["history"]], rel=1e-4, abs=1e-5)


@needs_compiler
def test_a_compiled_fit_equals_the_eager_fit(tiny_cache, tmp_path):  # noqa: F811
    torch._dynamo.reset()
    eager = small_fit(tiny_cache[0], tmp_path / "eager", static_shapes=True, epochs=1)
    compiled = small_fit(tiny_cache[0], tmp_path / "compiled", static_shapes=True, compile=True, epochs=1)
    for key in ("train_loss", "validation_accuracy"):
        assert [e[key] for e in compiled["history"]] == pytest.approx([e[key] for e in eager["history"]], rel=1e-4, abs=1e-5)
    assert compiled["test"] == pytest.approx(eager["test"], abs=1e-6)


def learner_and_batches(cache, method, runtime, in_memory, static_shapes=False):
    root = open_store(str(cache))
    spec = spec_from_store(root)
    config = config_from_options(method, METHOD_OPTIONS[method])
    layers = build_model(config, spec).required_layers(config, spec)
    torch.manual_seed(0)
    model = build_model(config, spec).to(runtime.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    settings = FitSettings(batch_size=16, in_memory=in_memory, static_shapes=static_shapes)
    reader = CacheReader(str(cache), "train", layers, in_memory, device=runtime.device)
    learner = Learner(lambda inputs: model(*inputs), trainable, model, lambda: {}, Schedule(1, 16, 1e-3, 0.01, 0.1, 0),
                      len(reader), root.attrs["task"], runtime)
    return learner, device_batches(reader, settings, 0, runtime, root.attrs["max_length"])


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_no_host_sync_in_a_training_step(method, in_memory, tiny_cache):  # noqa: F811
    learner, batches = learner_and_batches(tiny_cache[0], method, Runtime.resolve("cpu", "fp32"), in_memory)
    learner.start_epoch()
    seen = []
    for _ in range(3):
        # Streaming batches are collated on the host by design (pinned, then one non-blocking copy); a resident
        # cache's batches are gathered on the device, so making them counts too.
        if in_memory:
            with HostSyncs() as syncs:
                inputs, labels, rows = next(batches)
            seen += syncs.seen
        else:
            inputs, labels, rows = next(batches)
        with HostSyncs() as syncs:
            learner.step(inputs, labels, rows)
        seen += syncs.seen
    assert seen == []


def test_no_host_sync_in_the_extraction_loop():
    from cachetune.stages.extraction.extract import block_buffer, start_group

    def forward(samples):
        hidden = torch.randn(len(samples), 5, 4)
        return (hidden, hidden * 2), np.full(len(samples), 5), np.zeros(len(samples), np.int64)

    buffers = [block_buffer(2, 64, 4, "float16", "cpu") for _ in range(2)]
    with HostSyncs() as syncs:
        pending = start_group(forward, [np.arange(6), np.arange(6, 10)], np.full(10, 5), [0, 1], buffers, batch_size=4)
    assert syncs.seen == []
    assert all(p.result().shape == (2, 64, 4) for p in pending)


def test_evaluation_copies_logits_once(tiny_cache):  # noqa: F811
    from cachetune.stages.training.evaluate import predict_split_many

    reader = CacheReader(str(tiny_cache[0]), "validation", [0, 1, 2])
    spec = spec_from_store(open_store(str(tiny_cache[0])))
    models = [build_model(config_from_options("linear", {}), spec), build_model(config_from_options("unipt", {"r": "2"}), spec)]
    with HostSyncs() as syncs:
        predict_split_many(models, reader, batch_size=8, subsets=[(2,), None])
    ours = [name.split()[0] for name in syncs.seen if "evaluate.py" in name]  # (the reader collates on the host)
    assert ours == ["cpu", "numpy"] * 2  # one copy per model, after the split


def test_layer_subsets_gather_without_host_indices():
    from cachetune.stages.training.evaluate import layer_subsets

    features = torch.randn(2, 4, 3, 5)
    states = CachedHiddenStates(features, torch.ones(2, 3, dtype=torch.bool))
    layer_subsets(states, [(0, 3)])  # the index tensor is made (and copied to the device) once
    with HostSyncs() as syncs:
        every, run, spread = layer_subsets(states, [None, (1, 2), (0, 3)])
    assert syncs.seen == [] and every is states and run.codes._base is features
    assert torch.equal(spread.codes, features[:, [0, 3]]) and torch.equal(run.codes, features[:, 1:3])
    assert spread.positions == (0, 3) and run.positions == (1, 2)


# ---------------------------------------------------------------- on a GPU only

@needs_gpu
@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_cuda_steps_never_sync(method, precision, in_memory, tiny_cache):  # noqa: F811
    runtime = Runtime.resolve("cuda", precision) if precision != "bf16" or runtime_module.native_bf16(
        torch.device("cuda")) else pytest.skip("no native bf16")
    learner, batches = learner_and_batches(tiny_cache[0], method, runtime, in_memory, static_shapes=True)
    learner.start_epoch()
    inputs, labels, rows = next(batches)
    learner.step(inputs, labels, rows)  # the first step allocates optimizer state (and fused AdamW's checks)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            inputs, labels, rows = next(batches)
            learner.step(inputs, labels, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert learner.gpu_memory()["peak_gpu_network_mb"] > 0


@needs_gpu
def test_cuda_extraction_copies_overlap_and_never_sync(tiny_bert, tiny_table, tmp_path):
    from cachetune.stages.extraction.extract import block_buffer, start_group, text_forward, tokenize
    from cachetune.stages.backbones import load_backbone
    from cachetune.stages.extraction.token_table import TokenTable
    from cachetune.pipeline.data import load_dataset

    backbone, dataset = load_backbone(str(tiny_bert)), load_dataset(str(tiny_table))
    runtime = Runtime.resolve("cuda:0", "fp32")
    model = backbone.model.to(runtime.device)
    rows = dataset.rows("train")
    table = TokenTable.from_encoded(tokenize(backbone.tokenizer, dataset, rows, 32), backbone.tokenizer)
    lengths = table.lengths.astype(np.int64)
    forward = text_forward(model, table, runtime)
    buffers = [block_buffer(2, int(lengths.sum()), backbone.hidden_size, "float16", runtime.device)]
    layout = [np.argsort(-lengths, kind="stable")]  # a block's samples, longest first (as cache.layout plans them)
    start_group(forward, layout, lengths, [0, 2], buffers, batch_size=8)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with _no_sync_warnings():
            [pending] = start_group(forward, layout, lengths, [0, 2], buffers, batch_size=8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    features = pending.result()
    cpu = start_group(text_forward(backbone.model.cpu(), table, Runtime.resolve("cpu", "fp32")), layout, lengths,
                      [0, 2], [block_buffer(2, int(lengths.sum()), backbone.hidden_size, "float16", "cpu")], 8)[0]
    np.testing.assert_allclose(features.astype(np.float32), cpu.result().astype(np.float32), atol=5e-3)


class _no_sync_warnings:
    """Fails if torch warns of a synchronizing CUDA call inside (set_sync_debug_mode("warn")), except transformers'
    own mask check in the backbone's forward (one per batch; see the report in BENCHMARKS.md)."""

    def __enter__(self):
        import warnings

        self.catcher = warnings.catch_warnings(record=True)
        self.caught = self.catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self.catcher.__exit__(*exc)
        ours = [w for w in self.caught if "synchroniz" in str(w.message) and "masking_utils" not in w.filename
                and "transformers" not in w.filename]
        assert not ours, [f"{w.filename}:{w.lineno}" for w in ours]


def test_predict_runs_the_backbone_at_the_stores_precision_and_evaluate_checks_it(tiny_bert, tiny_cache, tmp_path):  # noqa: F811
    from cachetune.pipeline.data import load_dataset
    from cachetune.stages.training.evaluate import predict_split
    from cachetune.stages.training.predict import load_matching_backbone, predict_texts
    from cachetune.stages.training.side_model import load_side_model
    from tests.test_extract import run_extract

    cache, table = tiny_cache
    run_extract(tiny_bert, table, tmp_path / "bf16.zarr", precision="bf16")
    small_fit(tmp_path / "bf16.zarr", tmp_path / "model", "sherl", epochs=1)
    side = load_side_model(tmp_path / "model")
    reader = CacheReader(str(tmp_path / "bf16.zarr"), "test", side.layers)
    cached, _ = predict_split(side.model, reader)
    dataset = load_dataset(str(table))
    texts = [dataset.texts[row] for row in reader.group["row"][:]]
    backbone = load_matching_backbone(side)
    same = np.abs(predict_texts(side, backbone, texts, batch_size=5) - cached).max()
    side.info["cache_key"].pop("precision")  # as predict ran before: an fp32 backbone under a bf16-trained network
    other = np.abs(predict_texts(side, backbone, texts, batch_size=5) - cached).max()
    assert same < 1e-5 < other

    assert_one_line_error(cli("evaluate", tmp_path / "model", "--cache", cache), "another precision")


def test_the_cache_is_resident_by_default_on_a_gpu_when_it_fits(tiny_cache, monkeypatch):  # noqa: F811
    from cachetune.stages.training.fit import resident_fits, run_identity

    root = open_store(str(tiny_cache[0]))
    needed = sum(root[split][f"layer_{i:02d}"].nbytes for split in ("train", "validation", "test") for i in (0, 2))
    gpu = Runtime(torch.device("cuda", 0), "fp32")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * needed, 10 * needed))
    assert resident_fits(root, [0, 2], gpu) and not resident_fits(root, [0, 1, 2], gpu)
    assert not resident_fits(root, [0, 2], Runtime.resolve("cpu", "fp32"))  # the CPU streams unless asked
    config = config_from_options("linear", {})
    assert run_identity(config, FitSettings(), "k") == run_identity(config, FitSettings(in_memory=False), "k")
