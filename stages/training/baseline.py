"""Baselines that train the backbone itself: LoRA (Hugging Face PEFT) and full fine-tuning.

Same data, split, subset, pooling, head, schedule and metrics.json format as `fit`, so reports
put them side by side. Not cached: the backbone runs forward and backward every step.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from cachetune.cache.errors import InputError
from cachetune.cache.reader import subset_positions

from ..atomic_folder import atomic_folder
from ..backbones import causal_position_ids, check_pooling, load_backbone
from ..families import family_facts
from ..extraction.extract import pixel_values
from ..extraction.tokenizing import single_prefix
from .checkpoint import Checkpoint
from .target_scale import TargetScale
from ..memory import current_rss_mb, limit_allocator_slack, reset_peak
from ..methods import pool
from ..runtime import Runtime
from ..metrics import task_metrics
from .training_loop import Learner, Schedule, TrainingRun, batch_elements, run_metrics, train_epochs


@dataclass
class BaselineSettings:
    method: str = "lora"  # lora | full
    epochs: int = 2
    batch_size: int = 32
    lr: float | None = None  # default: 5e-4 for lora, 5e-5 for full
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 0
    max_length: int = 128
    image_size: int | None = None  # image backbones: --image-size (stages/image_size.py)
    max_train_samples: int | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: list[str] | None = None  # default: the family's attention query and value projections
    pooling: str | None = None  # cls | mean | last; default: the backbone family's (last for a causal decoder)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str | None = None  # fp32 | bf16 | fp16; default bf16 on a GPU that has it, else fp32
    length_buckets: bool = False  # batches of similar length within windows of the shuffled order, as `fit`'s
    gradient_checkpointing: bool = False  # transformers' gradient_checkpointing_enable: layers recomputed in backward
    measure_step: bool = False  # no training: one step's memory on the first epoch's largest batch


BUCKET_WINDOW_BATCHES = 20  # a window of 20 batches (640 snippets at 32) is sorted by length, like fit's 2-block buffer


def training_order(rows: np.ndarray, lengths: np.ndarray | None, batch_size: int, seed: int) -> list[np.ndarray]:
    """One epoch's batches of `rows`: a seeded shuffle cut into batches; with `lengths` (tokens per row, aligned with
    rows), each window of BUCKET_WINDOW_BATCHES batches is sorted by length before it is cut, and the batches are
    served in shuffled order, so the backbone computes less padding (the same idea as the cache reader's by_length)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    if lengths is not None:
        window = batch_size * BUCKET_WINDOW_BATCHES
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(window, len(order), window))])
    batches = [rows[order[first:first + batch_size]] for first in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))] if lengths is not None else batches


class BackboneClassifier(torch.nn.Module):
    """The backbone, pooling and a linear head: [B, T] token batch -> logits [B, C]. A causal decoder gets position
    ids counted over real tokens, as in extraction."""

    def __init__(self, encoder, num_labels: int, pooling: str, causal: bool = False):
        super().__init__()
        self.encoder, self.pooling, self.causal = encoder, pooling, causal
        self.head = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, batch) -> torch.Tensor:
        if self.causal:
            batch = {**batch, "position_ids": causal_position_ids(batch["attention_mask"])}
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch.get("attention_mask")  # images: none, every token is real
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
        return self.head(pool(hidden, mask, self.pooling))


def enable_checkpointing(encoder) -> None:
    """transformers' gradient checkpointing (`activation_checkpointing_enable` from transformers 5, its old name
    before), non-reentrant, so gradients reach LoRA's weights although the embedding is frozen. The key/value cache
    is off (nothing is generated here; transformers would switch it off itself, with a log line)."""
    if getattr(encoder.config, "use_cache", False):
        encoder.config.use_cache = False
    if hasattr(encoder, "activation_checkpointing_enable"):
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _wrap_lora(encoder, settings: BaselineSettings):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InputError("the lora baseline needs PEFT: run `pip install -e \".[baseline]\"`") from None
    family = family_facts(encoder.config.model_type)  # its attention query and value projections (stages/families/)
    targets = settings.lora_targets or list(family.lora_targets)
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=targets, fan_in_fan_out=family.lora_fan_in_fan_out)
    try:
        with warnings.catch_warnings():  # PEFT asks transformers 5 the deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(encoder, config)
    except ValueError as error:
        raise InputError(f"LoRA targets {targets}: {str(error).splitlines()[0]}; "
                         "name modules of this backbone, e.g. --lora-targets query,value") from None


def _batches(backbone, dataset, rows: np.ndarray, settings: BaselineSettings, shuffle: bool, seed: int,
             runtime: Runtime, lengths: np.ndarray | None = None):
    chunks = (training_order(rows, lengths, settings.batch_size, seed) if shuffle else
              [rows[first:first + settings.batch_size] for first in range(0, len(rows), settings.batch_size)])
    for chunk in chunks:
        if backbone.modality == "image":  # decoded and processed per batch, as extraction does
            yield ({"pixel_values": runtime.to_device(pixel_values(backbone, dataset, chunk))},
                   runtime.to_device(torch.from_numpy(dataset.labels[chunk])))
            continue
        tokenizer = backbone.tokenizer
        texts, _ = single_prefix(tokenizer, [dataset.texts[i] for i in chunk])  # as extract tokenizes
        pairs = [dataset.pairs[i] for i in chunk] if dataset.pairs else None
        batch = tokenizer(texts, pairs, truncation=True, max_length=settings.max_length, padding=True, return_tensors="pt")
        yield ({name: runtime.to_device(tensor) for name, tensor in batch.items()},
               runtime.to_device(torch.from_numpy(dataset.labels[chunk])))


@torch.no_grad()
def _evaluate(model, backbone, dataset, rows, settings, task, num_labels, runtime: Runtime, scale: TargetScale) -> dict:
    model.eval()
    logits, labels = [], []
    for batch, y in _batches(backbone, dataset, rows, settings, False, 0, runtime):
        with runtime.autocast():
            logits.append(model(batch).float().cpu().numpy())
        labels.append(y.cpu().numpy())
    return task_metrics(scale.restore(np.concatenate(logits)), np.concatenate(labels), task, num_labels)


def train_baseline(backbone_name: str, dataset, settings: BaselineSettings, out_dir: Path, show_progress=True) -> dict:
    if settings.method not in ("lora", "full"):
        raise InputError(f"unknown baseline {settings.method!r}; choose lora or full")
    started = time.perf_counter()
    runtime = Runtime.resolve(settings.device, settings.precision)
    limit_allocator_slack()
    reset_peak()
    rss_at_start = current_rss_mb()
    torch.manual_seed(settings.seed)
    backbone = load_backbone(backbone_name, image_size=settings.image_size)
    if backbone.modality != dataset.modality:
        raise InputError(f"the data {dataset.name!r} is {dataset.modality} but the backbone at {backbone.path} is a "
                         f"{backbone.modality} model; pass a {dataset.modality} backbone")
    pooling = settings.pooling or backbone.pooling
    check_pooling(backbone, pooling)
    if backbone.tokenizer is not None:
        backbone.tokenizer.padding_side = "right"  # positions come from the mask either way; right is the cache's layout
    num_labels = len(dataset.label_names) if dataset.task == "classification" else 1
    encoder = backbone.model
    encoder.requires_grad_(settings.method == "full")
    if settings.gradient_checkpointing:  # non-reentrant: gradients reach LoRA's weights with a frozen embedding
        if not encoder.supports_gradient_checkpointing:
            raise InputError(f"the {encoder.config.model_type} backbone at {backbone.path} does not support gradient "
                             "checkpointing in transformers; leave out --gradient-checkpointing")
        enable_checkpointing(encoder)
    if settings.method == "lora":
        encoder = _wrap_lora(encoder, settings)
    model = BackboneClassifier(encoder, num_labels, pooling, backbone.causal).to(runtime.device)
    lr = settings.lr or (5e-4 if settings.method == "lora" else 5e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_rows = dataset.rows("train")[subset_positions(len(dataset.rows("train")), settings.max_train_samples)]
    scale = TargetScale.of_targets(dataset.task, dataset.labels[train_rows])
    lengths = None
    if settings.length_buckets and backbone.modality == "text":  # every image gives the same number of tokens
        pairs = [dataset.pairs[i] for i in train_rows] if dataset.pairs else None
        texts, _ = single_prefix(backbone.tokenizer, [dataset.texts[i] for i in train_rows])
        lengths = np.array([len(ids) for ids in backbone.tokenizer(texts, pairs,
                                                                   truncation=True, max_length=settings.max_length)["input_ids"]])
    schedule = Schedule(settings.epochs, settings.batch_size, lr, settings.weight_decay, settings.warmup_ratio, settings.seed)
    def evaluate(split):
        return _evaluate(model, backbone, dataset, dataset.rows(split), settings, dataset.task, num_labels, runtime,
                         scale)

    checkpoint = Checkpoint.beside(out_dir, {"baseline": asdict(settings), "lr": lr, "data": dataset.fingerprint(),
                                             "backbone_weights_sha256": backbone.weights_sha256})
    runtime.reset_peak_memory()  # resident weights stay counted; the peak covers training from here
    def batches(epoch):
        return _batches(backbone, dataset, train_rows, settings, True, settings.seed * 1000 + epoch, runtime, lengths)

    snapshot = lambda: {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    if settings.measure_step:
        run, test = measured_step(model, trainable, snapshot, batches, schedule, len(train_rows), dataset.task, runtime,
                                  scale), {}
    else:
        run = train_epochs(settings.method, model, trainable, model, batches, len(train_rows),
                           lambda: evaluate("validation"), snapshot, schedule, dataset.task, show_progress, runtime,
                           checkpoint, target_scale=scale)
        model.load_state_dict(run.best_state, strict=False)
        test = evaluate("test")
    metrics = run_metrics(settings.method, run, test, trainable, len(train_rows), dataset.task, rss_at_start,
                          "peak RSS of the run (Linux VmHWM, reset when it began) minus the RSS when it began "
                          "(after importing torch and zarr; the backbone loads later)",
                          {**asdict(settings), "lr": lr, "backbone": str(backbone.path)}, runtime,
                          runtime.peak_memory())
    metrics.update(baseline=True, wall_seconds=time.perf_counter() - started,  # backbone loaded, epochs, evaluation
                   gradient_checkpointing=settings.gradient_checkpointing, measured_step_only=settings.measure_step,
                   **scale.to_info())
    with atomic_folder(out_dir) as folder:
        (folder / "model.safetensors").write_bytes(save({n: t.contiguous() for n, t in run.best_state.items()}))
        (folder / "config.json").write_text(json.dumps({"baseline": settings.method, **metrics["settings"],
                                                        **scale.to_info()}, indent=2))
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    checkpoint.remove()
    return metrics


def measured_step(model, trainable, snapshot, batches, schedule: Schedule, train_size: int, task: str,
                  runtime: Runtime, scale: TargetScale) -> TrainingRun:
    """No training: the memory of one step on the first epoch's largest batch (most padded tokens), measured as a
    trained run measures its own (Learner.step_memory). For a setting whose arithmetic equals a trained run's (LoRA
    with gradient checkpointing computes what LoRA computes), so its accuracy is that run's."""
    largest = max(batches(0), key=lambda batch: batch_elements(batch[0]))
    learner = Learner(model, trainable, model, snapshot, schedule, train_size, task, runtime, target_scale=scale)
    return TrainingRun([], 0, None, {}, None, learner.step_memory(*largest))
