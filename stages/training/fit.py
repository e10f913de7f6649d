"""Stage two: train a side network on cached features, keep the best epoch, report test metrics."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cache.errors import InputError
from cache.layout import key_sha256
from cache.reader import CacheReader, open_store

from ..atomic_folder import atomic_folder
from .checkpoint import Checkpoint
from .evaluate import evaluate_split, side_inputs
from ..memory import current_rss_mb, limit_allocator_slack, reset_peak
from ..methods import FeatureSpec, MethodConfig, build_model, get_method
from ..runtime import Runtime
from .side_model import SideModel, save_side_model, trainable_state
from .training_loop import Schedule, run_metrics, train_epochs


@dataclass
class FitSettings:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 0
    buffer_blocks: int = 2  # blocks in the shuffle buffer: more = more random, more memory
    in_memory: bool = False  # load the selected layers into RAM once (small caches only)
    max_train_samples: int | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str | None = None  # fp32 | bf16 | fp16; default bf16 on a GPU that has it, else fp32
    length_buckets: bool = False  # batches of similar length within the shuffle buffer, in shuffled order


def spec_from_store(root, backbone_path: str | None = None) -> FeatureSpec:
    attrs = root.attrs
    num_labels = len(attrs["label_names"]) if attrs["task"] == "classification" else 1
    return FeatureSpec(hidden_size=attrs["hidden_size"], num_layers=attrs["num_layers"], num_labels=num_labels,
                       pooling=attrs["pooling"], backbone_path=backbone_path or attrs["backbone_path"],
                       cached_layers=tuple(attrs["layers"]))


def required_layers(config: MethodConfig, spec: FeatureSpec, cache_path: str) -> list[int]:
    layers = get_method(config.method).model_class.required_layers(config, spec)
    missing = [i for i in layers if i not in spec.cached_layers]
    if missing:
        raise InputError(f"method {config.method!r} needs layers {layers} but the cache at {cache_path} lacks {missing} "
                         f"(it has {list(spec.cached_layers)}); re-extract with --layers all")
    return layers


def require_training_splits(root, cache_path: str) -> None:
    missing = [split for split in ("train", "validation") if split not in root]
    if missing:
        raise InputError(f"the cache at {cache_path} needs train and validation splits to train side networks; "
                         f"it lacks {', '.join(missing)}")


def open_readers(cache_path: str, root, layers: list[int], settings: FitSettings, runtime: Runtime) -> dict:
    """A reader of `layers` per split the cache has (train limited to max_train_samples); train and validation
    are required."""
    require_training_splits(root, cache_path)
    return {split: CacheReader(cache_path, split, layers, settings.in_memory,
                               settings.max_train_samples if split == "train" else None, runtime.device)
            for split in ("train", "validation", "test") if split in root}


def train_batches(reader: CacheReader, settings: FitSettings, epoch: int, runtime: Runtime):
    """One epoch's training batches, in the order the seed and epoch fix: `fit` and `sweep` both read them here."""
    return reader.batches(settings.batch_size, shuffle=True, seed=settings.seed * 1000 + epoch,
                          buffer_blocks=settings.buffer_blocks, pin_memory=runtime.pin_memory,
                          by_length=settings.length_buckets)


def reader_buffer_mb(reader: CacheReader, settings: FitSettings) -> float:
    """MB of decoded cache a training reader holds at most (numpy, outside torch's tracking): the layers packed in
    memory (--in-memory), or two groups of `buffer_blocks` blocks (the one served and the one read ahead), each
    block `block_tokens` x layers read x hidden size in the cache's dtype."""
    if reader.memory is not None:
        return reader.memory.numel() * reader.memory.element_size() / 2**20
    array = reader.arrays[0]
    return 2 * settings.buffer_blocks * reader.block_tokens * len(reader.arrays) * array.shape[1] * array.dtype.itemsize / 2**20


def run_identity(config: MethodConfig, settings: FitSettings, cache_key_sha256: str) -> dict:
    """What two runs must share to give the same model: a checkpoint or a finished folder is reused only on a match."""
    return {"fit": config.to_dict(), "settings": asdict(settings), "cache_key_sha256": cache_key_sha256}


def fit(cache_path: str, config: MethodConfig, settings: FitSettings, out_dir: Path,
        backbone_path: str | None = None, show_progress: bool = True) -> dict:
    started = time.perf_counter()
    runtime = Runtime.resolve(settings.device, settings.precision)
    limit_allocator_slack()
    reset_peak()
    rss_at_start = current_rss_mb()
    torch.manual_seed(settings.seed)
    root = open_store(cache_path)
    spec = spec_from_store(root, backbone_path)
    task, attrs = root.attrs["task"], dict(root.attrs)
    layers = required_layers(config, spec, cache_path)
    readers = open_readers(cache_path, root, layers, settings, runtime)
    model = build_model(config, spec).to(runtime.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = Schedule(settings.epochs, settings.batch_size, settings.lr, settings.weight_decay,
                        settings.warmup_ratio, settings.seed)

    identity = run_identity(config, settings, attrs["key_sha256"])
    checkpoint = Checkpoint.beside(out_dir, identity)

    def batches(epoch):
        for batch in train_batches(readers["train"], settings, epoch, runtime):
            yield side_inputs(batch, runtime), runtime.to_device(batch.labels)

    def evaluate(split):
        return evaluate_split(model, readers[split], task, spec.num_labels, runtime=runtime)

    runtime.reset_peak_memory()  # resident weights stay counted; the peak covers training from here
    run = train_epochs(config.method, lambda inputs: model(*inputs), trainable, model, batches,
                       len(readers["train"]), lambda: evaluate("validation"), lambda: trainable_state(model),
                       schedule, task, show_progress, runtime, checkpoint)
    model.load_state_dict(run.best_state, strict=False)
    test = evaluate("test") if "test" in readers else {}
    metrics = run_metrics(config.method, run, test, trainable, len(readers["train"]), task, rss_at_start,
                          "peak RSS of the fit (Linux VmHWM, reset when fit began) minus the RSS when fit began "
                          "(after importing torch and zarr; the cache, model and frozen layers load later)",
                          asdict(settings), runtime, reader_buffer_mb(readers["train"], settings))
    metrics["identity_sha256"] = key_sha256(identity)
    # wall seconds of this fit (the cache opened, every epoch, validation, test), and of the extraction that wrote
    # the cache: the report's amortised cost
    metrics.update(wall_seconds=time.perf_counter() - started, extract_seconds=attrs.get("extract_seconds"))
    write_model_folder(out_dir, SideModel(model, config, spec, model_info(attrs)), run.best_state, metrics)
    checkpoint.remove()
    return metrics


def model_info(attrs: dict) -> dict:
    """The facts of the cache a model folder records (see stages/training/side_model.py)."""
    return {"task": attrs["task"], "label_names": attrs["label_names"], "cache_key": attrs["key"],
            "cache_key_sha256": attrs["key_sha256"], "max_length": attrs["max_length"], "dtype": attrs["dtype"],
            "model_type": attrs["model_type"]}


def write_model_folder(out_dir: Path, side: SideModel, best_state: dict, metrics: dict) -> None:
    with atomic_folder(out_dir) as folder:
        save_side_model(side, folder, best_state)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
