"""Stage two: train a side network on cached features, keep the best epoch, report test metrics."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cache.errors import InputError
from cache.reader import CacheReader, open_store

from .evaluate import evaluate_split
from .memory import current_rss_mb, peak_rss_mb, reset_peak
from .methods import FeatureSpec, MethodConfig, build_model, get_method
from .metrics import primary_metric
from .progress import progress_bar
from .side_model import SideModel, save_side_model, trainable_state


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


def loss_of(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    if task == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def warmup_then_linear_decay(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))
    return lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def fit(cache_path: str, config: MethodConfig, settings: FitSettings, out_dir: Path,
        backbone_path: str | None = None, show_progress: bool = True) -> dict:
    reset_peak()
    rss_at_start = current_rss_mb()
    torch.manual_seed(settings.seed)
    root = open_store(cache_path)
    spec = spec_from_store(root, backbone_path)
    task, attrs = root.attrs["task"], dict(root.attrs)
    layers = required_layers(config, spec, cache_path)
    readers = {split: CacheReader(cache_path, split, layers, settings.in_memory,
                                  settings.max_train_samples if split == "train" else None)
               for split in ("train", "validation", "test") if split in root}
    if "train" not in readers or "validation" not in readers:
        raise InputError(f"the cache at {cache_path} needs train and validation splits to fit; it has {sorted(readers)}")
    model = build_model(config, spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * math.ceil(len(readers["train"]) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay(steps, settings.warmup_ratio))
    metric, _ = primary_metric(task)
    history, best, best_state, epoch_seconds = [], -math.inf, None, []
    for epoch in range(settings.epochs):
        started = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        bar = progress_bar(total=len(readers["train"]), desc=f"{config.method} epoch {epoch + 1}/{settings.epochs}",
                           unit="sample", disable=not show_progress)
        for batch in readers["train"].batches(settings.batch_size, shuffle=True, seed=settings.seed * 1000 + epoch,
                                              buffer_blocks=settings.buffer_blocks):
            loss = loss_of(model(batch.features, batch.mask), batch.labels, task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            total, count = total + loss.item() * len(batch.labels), count + len(batch.labels)
            bar.update(len(batch.labels))
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        epoch_seconds.append(time.perf_counter() - started)
        validation = evaluate_split(model, readers["validation"], task, spec.num_labels)
        history.append({"epoch": epoch + 1, "train_loss": total / max(count, 1), **{f"validation_{k}": v for k, v in validation.items()},
                        "seconds": epoch_seconds[-1]})
        if show_progress:
            tqdm.write(f"epoch {epoch + 1}: train loss {total / max(count, 1):.4f}, validation {metric} {validation[metric]:.4f}")
        if validation[metric] > best:
            best, best_state, best_epoch = validation[metric], trainable_state(model), epoch + 1
    model.load_state_dict(best_state, strict=False)
    test = evaluate_split(model, readers["test"], task, spec.num_labels) if "test" in readers else {}
    peak = peak_rss_mb()
    metrics = {
        "method": config.method, "test": test, "best_epoch": best_epoch, f"best_validation_{metric}": best,
        "history": history, "trainable_parameters": sum(p.numel() for p in trainable),
        "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds), "train_samples": len(readers["train"]),
        "peak_rss_mb": peak, "rss_at_start_mb": rss_at_start, "peak_memory_mb": peak - rss_at_start,
        "peak_memory_measured_as": "peak RSS of the fit (Linux VmHWM, reset when fit began) minus the RSS when fit began "
                                   "(after importing torch and zarr; the cache, model and frozen layers load later)",
        "settings": asdict(settings),
    }
    info = {"task": task, "label_names": attrs["label_names"], "cache_key": attrs["key"], "cache_key_sha256": attrs["key_sha256"],
            "max_length": attrs["max_length"], "dtype": attrs["dtype"], "model_type": attrs["model_type"]}
    save_side_model(SideModel(model, config, spec, info), out_dir, best_state)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
