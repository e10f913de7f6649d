"""Stage two: train a side network on cached features, keep the best epoch, report test metrics."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cachetune.cache.errors import InputError
from cachetune.cache.layout import key_sha256, layer_array_name
from cachetune.cache.reader import CacheReader, open_store

from ..atomic_folder import atomic_folder
from .checkpoint import Checkpoint
from .evaluate import evaluate_split, side_inputs
from ..memory import current_rss_mb, limit_allocator_slack, reset_peak
from ..methods import FeatureSpec, MethodConfig, build_model, get_method
from ..methods.support import require_support
from ..runtime import PRECISIONS, Runtime
from .side_model import SideModel, save_side_model, trainable_state
from .static_shapes import pad_batch
from .target_scale import TargetScale
from .training_loop import Schedule, run_metrics, train_epochs


@dataclass
class FitSettings:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 0
    buffer_mb: float | None = None  # served cache rows the reader holds (buffer + read-ahead): more = more random;
    # None: CacheReader.default_buffer_bytes
    in_memory: bool | None = None  # pack the needed layers on the device once; None: on a GPU when they fit (resident_fits)
    max_train_samples: int | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str | None = None  # fp32 | bf16 | fp16; default bf16 on a GPU that has it, else fp32
    length_buckets: bool = False  # batches of similar length within the shuffle buffer, in shuffled order
    static_shapes: bool = False  # every batch batch_size rows (the last padded) and a few lengths: see static_shapes.py
    compile: bool = False  # torch.compile the network (reduce-overhead mode, CUDA graphs, on a GPU)


def spec_from_store(root, backbone_path: str | None = None) -> FeatureSpec:
    attrs = root.attrs
    num_labels = len(attrs["label_names"]) if attrs["task"] == "classification" else 1
    return FeatureSpec(hidden_size=attrs["hidden_size"], num_layers=attrs["num_layers"], num_labels=num_labels,
                       pooling=attrs["pooling"], backbone_path=backbone_path or attrs["backbone_path"],
                       cached_layers=tuple(attrs["layers"]), model_type=attrs.get("model_type", ""))


def missing_layers(config: MethodConfig, spec: FeatureSpec) -> tuple[list[int], list[int]]:
    """(the hidden_states indices the method reads, those of them the cache lacks)."""
    layers = get_method(config.method).model_class.required_layers(config, spec)
    return layers, [i for i in layers if i not in spec.cached_layers]


def required_layers(config: MethodConfig, spec: FeatureSpec, cache_path: str) -> list[int]:
    require_support(config.method, spec.backbone_path)  # before anything is built: one line naming the fix
    layers, missing = missing_layers(config, spec)
    if missing:
        raise InputError(f"method {config.method!r} needs layers {layers} but the cache at {cache_path} lacks {missing} "
                         f"(it has {list(spec.cached_layers)}); re-extract with --layers for:{config.method} "
                         f"(= {','.join(map(str, layers))}) or --layers all")
    return layers


def require_training_splits(root, cache_path: str) -> None:
    missing = [split for split in ("train", "validation") if split not in root]
    if missing:
        raise InputError(f"the cache at {cache_path} needs train and validation splits to train side networks; "
                         f"it lacks {', '.join(missing)}")


RESIDENT_SHARE = 0.5  # of the GPU's free memory a resident cache may take by default (the rest: networks, activations)


def resident_fits(root, layers: list[int], runtime: Runtime, share: float = RESIDENT_SHARE) -> bool:
    """On a GPU, do the needed layers of every split fit in `share` of its free memory? (The MiniLM movies cache,
    every layer, is about 1.5 GB; MPNet's 5.6 GB.) Never on the CPU: there streaming bounds memory."""
    if not runtime.is_cuda:
        return False
    needed = sum(int(np.prod(root[split][layer_array_name(i)].shape)) * root[split][layer_array_name(i)].dtype.itemsize
                 for split in ("train", "validation", "test") if split in root for i in layers)
    free, _ = torch.cuda.mem_get_info(runtime.device)
    return needed <= share * free


def open_readers(cache_path: str, root, layers: list[int], settings: FitSettings, runtime: Runtime) -> dict:
    """A reader of `layers` per split the cache has (train limited to max_train_samples); train and validation
    are required. The data path: resident on the device with in_memory, streaming without; by default (None)
    resident on a GPU when `resident_fits`, else streaming."""
    require_training_splits(root, cache_path)
    in_memory = settings.in_memory if settings.in_memory is not None else resident_fits(root, layers, runtime)
    return {split: CacheReader(cache_path, split, layers, in_memory,
                               settings.max_train_samples if split == "train" else None, runtime.device)
            for split in ("train", "validation", "test") if split in root}


def train_batches(reader: CacheReader, settings: FitSettings, epoch: int, runtime: Runtime):
    """One epoch's training batches, in the order the seed and epoch fix: `fit` and `sweep` both read them here."""
    return reader.batches(settings.batch_size, shuffle=True, seed=settings.seed * 1000 + epoch,
                          buffer_bytes=int(settings.buffer_mb * 2**20) if settings.buffer_mb else None,
                          pin_memory=runtime.pin_memory,
                          by_length=settings.length_buckets)


def device_batches(reader: CacheReader, settings: FitSettings, epoch: int, runtime: Runtime, max_length: int):
    """One epoch's training batches on the device: ((hidden states [B, K, T, W] in the store's encoding, mask
    [B, T]), labels [B], real rows), padded to static shapes with --static-shapes. `fit` and `sweep` both train
    on these."""
    for batch in train_batches(reader, settings, epoch, runtime):
        states, mask = side_inputs(batch, runtime)
        labels = runtime.to_device(batch.labels)
        rows = len(labels)
        if settings.static_shapes:
            states, labels, rows = pad_batch(states, labels, settings.batch_size, max_length)
            mask = states.mask
        yield (states, mask), labels, rows


def hold_frozen_layers(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """When training runs in bf16 or fp16 (autocast; a GPU's default, `--precision bf16` on a CPU), a side network's
    frozen backbone layers (SHERL's late layers, SynQT's) are held in that precision: half the bytes, and autocast
    casts their weights to it per op anyway. In fp32 (the CPU's default) they stay float32."""
    if runtime.precision != "fp32":
        from ..backbone_layers import FrozenLayers

        for module in model.modules():
            if isinstance(module, FrozenLayers):
                module.hold_in(PRECISIONS[runtime.precision])
    return model


def network_forward(model: torch.nn.Module, settings: FitSettings, runtime: Runtime):
    """(forward(inputs) = model(*inputs), whether it replays CUDA graphs). With --compile the module is compiled
    (torch.compile: fused kernels; on a GPU mode="reduce-overhead" captures CUDA graphs, which pays with
    --static-shapes, one graph per shape); the weights stay the model's own, so snapshots and checkpoints see them."""
    if not settings.compile:
        return (lambda inputs: model(*inputs)), False
    compiled = torch.compile(model, mode="reduce-overhead" if runtime.is_cuda else None,
                             dynamic=False if settings.static_shapes else None)
    return (lambda inputs: compiled(*inputs)), runtime.is_cuda


def resident_bytes(readers: dict) -> int:
    """GPU bytes of the --in-memory caches the readers hold on the device (counted apart from training memory)."""
    return sum(r.memory.nbytes for r in readers.values() if r.memory is not None and r.memory.is_cuda)


def gpu_memory_figures(runtime: Runtime, learner, resident: int, alone: bool) -> dict:
    """The GPU memory a run reports: `peak_gpu_allocated_mb` is the invocation's peak without the resident cache
    (alone: a fit) or the network's own peak (a sweep member, beside others on the device; see Learner.gpu_memory)."""
    if not runtime.is_cuda:
        return {}
    figures = {**runtime.peak_memory(resident), **learner.gpu_memory()}
    if not alone:
        figures["peak_gpu_invocation_mb"] = figures["peak_gpu_allocated_mb"]
        figures["peak_gpu_allocated_mb"] = figures["peak_gpu_network_mb"]
    figures["peak_gpu_measured_as"] = (
        "torch.cuda peak allocated over the fit, less the --in-memory cache (resident_cache_gpu_mb)" if alone else
        "this network's weights, gradients, optimizer state, largest batch and largest step transient (the device "
        "also held the sweep's other networks; their sum is peak_gpu_invocation_mb), less the --in-memory cache")
    return figures
def reader_buffer_mb(reader: CacheReader) -> float:
    """MB of cache rows a training reader held at most (numpy, outside torch's tracking): the layers packed in
    memory (--in-memory), or the served rows of the buffer served plus the one read ahead (at most --buffer-mb)."""
    if reader.memory is not None:
        return reader.memory.numel() * reader.memory.element_size() / 2**20
    return reader.buffer_peak_bytes / 2**20


def run_identity(config: MethodConfig, settings: FitSettings, cache_key_sha256: str) -> dict:
    """What two runs must share to give the same model: a checkpoint or a finished folder is reused only on a match.
    (static_shapes and compile are left out while off, so runs made before those options keep their identity; the
    default data path, None, counts as streaming.)"""
    fields = {k: v for k, v in asdict(settings).items() if not (k in ("static_shapes", "compile") and not v)}
    fields["in_memory"] = bool(fields["in_memory"])  # the data path: the same batches either way
    return {"fit": config.to_dict(), "settings": fields, "cache_key_sha256": cache_key_sha256}


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
    runtime.reset_peak_memory()  # from here: the --in-memory cache is measured, then counted apart
    readers = open_readers(cache_path, root, layers, settings, runtime)
    scale = training_scale(readers["train"], task)
    model = hold_frozen_layers(build_model(config, spec).to(runtime.device), runtime)
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = Schedule(settings.epochs, settings.batch_size, settings.lr, settings.weight_decay,
                        settings.warmup_ratio, settings.seed)

    identity = run_identity(config, settings, attrs["key_sha256"])
    checkpoint = Checkpoint.beside(out_dir, identity)

    def batches(epoch):
        return device_batches(readers["train"], settings, epoch, runtime, attrs["max_length"])

    def evaluate(split):
        # batches of the training size: evaluation never needs more memory than a training step
        return evaluate_split(model, readers[split], task, spec.num_labels, settings.batch_size, runtime, scale=scale)

    forward, cuda_graphs = network_forward(model, settings, runtime)
    learners = []
    run = train_epochs(config.method, forward, trainable, model, batches,
                       len(readers["train"]), lambda: evaluate("validation"), lambda: trainable_state(model),
                       schedule, task, show_progress, runtime, checkpoint, cuda_graphs, learners, scale)
    model.load_state_dict(run.best_state, strict=False)
    test = evaluate("test") if "test" in readers else {}
    metrics = run_metrics(config.method, run, test, trainable, len(readers["train"]), task, rss_at_start,
                          "peak RSS of the fit (Linux VmHWM, reset when fit began) minus the RSS when fit began "
                          "(after importing torch and zarr; the cache, model and frozen layers load later)",
                          asdict(settings), runtime,
                          gpu_memory_figures(runtime, learners[0], resident_bytes(readers), alone=True),
                          reader_buffer_mb(readers["train"]))
    metrics.update(data_path=data_path(readers["train"]), identity_sha256=key_sha256(identity), **scale.to_info())
    # wall seconds of this fit (the cache opened, every epoch, validation, test), and of the extraction that wrote
    # the cache: the report's amortised cost
    metrics.update(wall_seconds=time.perf_counter() - started, extract_seconds=attrs.get("extract_seconds"))
    write_model_folder(out_dir, SideModel(model, config, spec, model_info(attrs, cache_path, scale)), run.best_state,
                       metrics)
    checkpoint.remove()
    return metrics


def training_scale(reader: CacheReader, task: str) -> TargetScale:
    """The target scale of the rows the reader serves for training (after --max-train-samples)."""
    return TargetScale.of_targets(task, reader.labels[reader.samples])


def data_path(reader: CacheReader) -> str:
    """Which training data path ran: the cache resident on the device, in RAM, or streamed from the store."""
    if reader.memory is None:
        return "streaming"
    return "resident on the GPU" if reader.memory.is_cuda else "in RAM"


def model_info(attrs: dict, cache_path: str, scale: TargetScale = TargetScale()) -> dict:
    """The facts of the cache a model folder records (see stages/training/side_model.py); cache_path is where that
    cache was (made absolute when local: `pipeline evaluate MODEL` reads it by default); scale: the regression
    targets' standardisation the network learnt (recorded unless the identity)."""
    local = "://" not in cache_path
    return {"cache_path": os.path.abspath(cache_path) if local else cache_path, "task": attrs["task"], "label_names": attrs["label_names"], "cache_key": attrs["key"],
            "cache_key_sha256": attrs["key_sha256"], "max_length": attrs["max_length"], "dtype": attrs["dtype"],
            "model_type": attrs["model_type"], **scale.to_info()}


def write_model_folder(out_dir: Path, side: SideModel, best_state: dict, metrics: dict) -> None:
    with atomic_folder(out_dir) as folder:
        save_side_model(side, folder, best_state)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
