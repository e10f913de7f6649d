"""Stage two's device and precision: one-line refusals, CPU bf16 autocast, float16 batches, and (with a GPU
only) a fit on the GPU that agrees with the same fit on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cachetune.cache.reader import CacheReader
from cachetune.stages.training.fit import FitSettings, fit
from cachetune.stages.methods import config_from_options
from cachetune.stages.runtime import Runtime
from tests.test_extract import assert_one_line_error, cli
from tests.test_fit import tiny_cache  # noqa: F401  (the module fixture)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fit_once(cache, out, method="lst", options=None, **settings):
    config = config_from_options(method, {**({"r": "4"} if method in ("lst", "sherl") else {}), **(options or {})})
    return fit(str(cache), config, FitSettings(epochs=2, batch_size=16, lr=1e-2, warmup_ratio=0.0, **settings), out,
               show_progress=False)


@pytest.mark.parametrize("args, fragment", [
    (["--device", "mps"], "only cpu and cuda"),
    (["--device", "tpu"], "is not a device"),
    (["--device", "nonsense:x"], "is not a device"),
    (["--device", "cpu", "--precision", "fp16"], "needs a GPU"),
])
@pytest.mark.parametrize("command", ["fit", "evaluate", "baseline"])
def test_bad_device_or_precision_is_one_line(command, args, fragment, tiny_cache, tmp_path):  # noqa: F811
    cache, _ = tiny_cache
    target = {"fit": ["--cache", cache], "evaluate": [tmp_path, "--cache", cache], "baseline": []}[command]
    assert_one_line_error(cli(command, *target, *args), fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(tiny_cache):  # noqa: F811
    cache, _ = tiny_cache
    assert_one_line_error(cli("fit", "--cache", cache, "--device", "cuda"), "no CUDA GPU")


def test_auto_is_the_cpu_in_fp32_without_a_gpu():
    runtime = Runtime.resolve("auto", None)
    if not torch.cuda.is_available():
        assert (runtime.device.type, runtime.precision, runtime.name) == ("cpu", "fp32", "cpu")
    else:
        assert runtime.device.type == "cuda" and runtime.precision in ("bf16", "fp32")


def test_batches_stay_in_the_cache_dtype(tiny_cache):  # noqa: F811
    cache, _ = tiny_cache
    batch = next(CacheReader(str(cache), "train", [0, 1]).batches(8))
    assert batch.features.dtype == torch.float16
    assert not batch.features[~batch.mask[:, None, :, None].expand_as(batch.features)].any()  # padding is zeros


def test_bf16_autocast_on_the_cpu_trains_and_is_recorded(tiny_cache, tmp_path):  # noqa: F811
    cache, _ = tiny_cache
    metrics = fit_once(cache, tmp_path / "m", device="cpu", precision="bf16")
    assert (metrics["device"], metrics["device_name"], metrics["precision"]) == ("cpu", "cpu", "bf16")
    assert all(torch.isfinite(torch.tensor(epoch["train_loss"])) for epoch in metrics["history"])
    assert "peak_gpu_allocated_mb" not in metrics and metrics["peak_memory_mb"] >= 0


@needs_gpu
@pytest.mark.parametrize("method", ["lst", "sherl"])
def test_a_gpu_fit_agrees_with_the_cpu_fit(method, tiny_cache, tmp_path):  # noqa: F811
    cache, _ = tiny_cache
    # No dropout: the two devices draw different masks (another dropout stream alone moved LST's last loss by
    # 0.028 on the CPU), so only the deterministic computation is compared.
    cpu = fit_once(cache, tmp_path / "cpu", method, {"dropout": "0"}, device="cpu", precision="fp32")
    gpu = fit_once(cache, tmp_path / "gpu", method, {"dropout": "0"}, device="cuda", precision="fp32")
    assert gpu["peak_gpu_allocated_mb"] > 0 and gpu["device"].startswith("cuda")
    assert abs(gpu["history"][-1]["train_loss"] - cpu["history"][-1]["train_loss"]) < 1e-3


def test_in_memory_batches_equal_streamed_ones_in_order_and_content(tiny_cache):  # noqa: F811
    cache, _ = tiny_cache
    streamed = CacheReader(str(cache), "train", [0, 2])
    packed = CacheReader(str(cache), "train", [0, 2], in_memory=True)
    assert packed.memory.dtype == torch.float16 and packed.memory.shape[0] == 2
    for a, b in zip(streamed.batches(16, shuffle=True, seed=3), packed.batches(16, shuffle=True, seed=3), strict=True):
        assert (a.index == b.index).all() and torch.equal(a.mask, b.mask) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.features, b.features)


def test_in_memory_fit_equals_the_streaming_fit(tiny_cache, tmp_path):  # noqa: F811
    cache, _ = tiny_cache
    streamed = fit_once(cache, tmp_path / "s", device="cpu")
    packed = fit_once(cache, tmp_path / "m", device="cpu", in_memory=True)
    for key in ("train_loss", "validation_accuracy"):
        assert [e[key] for e in packed["history"]] == pytest.approx([e[key] for e in streamed["history"]], rel=1e-5)
    assert packed["test"] == pytest.approx(streamed["test"])


@needs_gpu
def test_in_memory_on_the_gpu_gathers_there(tiny_cache):  # noqa: F811
    cache, _ = tiny_cache
    packed = CacheReader(str(cache), "train", [0, 2], in_memory=True, device="cuda")
    batch = next(packed.batches(8))
    assert packed.memory.is_cuda and batch.features.is_cuda and batch.mask.is_cuda


def test_length_buckets_pad_less_and_still_cover_every_sample_once(tiny_cache):  # noqa: F811
    cache, _ = tiny_cache
    reader = CacheReader(str(cache), "train", [0])
    plain = list(reader.batches(8, shuffle=True, seed=1))
    bucketed = list(reader.batches(8, shuffle=True, seed=1, by_length=True))
    assert sorted(np.concatenate([b.index for b in bucketed])) == list(range(len(reader)))
    padded = lambda batches: sum(b.mask.numel() - int(b.mask.sum()) for b in batches)  # noqa: E731
    assert padded(bucketed) < padded(plain)
    again = list(reader.batches(8, shuffle=True, seed=1, by_length=True))
    assert all((a.index == b.index).all() for a, b in zip(bucketed, again))
