"""The epoch loop that `fit` (side networks) and `baseline` (LoRA, full fine-tuning) share:
AdamW, linear warm-up then linear decay, gradient clipping, per-epoch validation, best epoch kept."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .memory import peak_rss_mb
from .metrics import primary_metric
from .progress import progress_bar
from .runtime import CPU, Runtime


@dataclass
class Schedule:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    seed: int


@dataclass
class TrainingRun:
    history: list[dict]
    best_epoch: int
    best_value: float
    best_state: dict
    seconds_per_epoch: float


def loss_of(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    if task == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def warmup_then_linear_decay(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))
    return lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def parameter_groups(parameters: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups by the usual rule: no decay on biases, norm weights, gates and scales (every tensor of fewer
    than two dimensions); decay would pull LST's alpha, SHERL's gamma or SynQT's scales toward zero."""
    groups = [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def train_epochs(name: str, forward: Callable, trainable: list[torch.nn.Parameter], modules: torch.nn.Module,
                 batches: Callable[[int], Iterable[tuple[object, torch.Tensor]]], train_size: int,
                 validate: Callable[[], dict], snapshot: Callable[[], dict], schedule: Schedule, task: str,
                 show_progress: bool = True, runtime: Runtime | None = None, checkpoint=None) -> TrainingRun:
    """batches(epoch) yields (inputs, labels) already on the runtime's device; forward(inputs) gives logits, run
    under the runtime's autocast; snapshot() copies the weights to keep.

    checkpoint (stages.checkpoint.Checkpoint): resume after its last epoch, and write one after every epoch."""
    runtime = runtime or CPU
    optimizer = torch.optim.AdamW(parameter_groups(trainable, schedule.weight_decay), lr=schedule.lr)
    scaler = runtime.grad_scaler()
    steps = schedule.epochs * math.ceil(train_size / schedule.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay(steps, schedule.warmup_ratio))
    metric, _ = primary_metric(task)
    history, best, best_state, best_epoch, seconds = [], -math.inf, None, 0, []
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}  # what a checkpoint carries
    if checkpoint is not None:
        history, best, best_state, best_epoch, seconds = checkpoint.restore(
            modules, stateful, (history, best, best_state, best_epoch, seconds))
    for epoch in range(len(history), schedule.epochs):
        started = time.perf_counter()
        modules.train()
        total, count, shown = torch.zeros((), device=runtime.device), 0, started
        bar = progress_bar(total=train_size, desc=f"{name} epoch {epoch + 1}/{schedule.epochs}", unit="sample",
                           disable=not show_progress)
        for inputs, labels in batches(epoch):
            with runtime.autocast():
                logits = forward(inputs)
            loss = loss_of(logits.float(), labels, task)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total, count = total + loss.detach() * len(labels), count + len(labels)
            bar.update(len(labels))
            if not bar.disable and time.perf_counter() - shown >= bar.mininterval:  # .item() waits for the device
                bar.set_postfix(loss=f"{total.item() / count:.4f}", refresh=False)
                shown = time.perf_counter()
        bar.close()
        total = float(total)
        seconds.append(time.perf_counter() - started)
        validation = validate()
        history.append({"epoch": epoch + 1, "train_loss": total / max(count, 1),
                        **{f"validation_{k}": v for k, v in validation.items()}, "seconds": seconds[-1]})
        if show_progress:
            tqdm.write(f"epoch {epoch + 1}: train loss {total / max(count, 1):.4f}, validation {metric} {validation[metric]:.4f}")
        if validation[metric] > best:
            best, best_state, best_epoch = validation[metric], snapshot(), epoch + 1
        if checkpoint is not None:
            weights = best_state if best_epoch == epoch + 1 else snapshot()  # torch.save stores shared tensors once
            checkpoint.save(weights, stateful, (history, best, best_state, best_epoch, seconds))
    return TrainingRun(history, best_epoch, best, best_state, sum(seconds) / len(seconds))


def run_metrics(method: str, run: TrainingRun, test: dict, trainable: list, train_samples: int, task: str,
                rss_at_start: float, measured_as: str, settings: dict, runtime: Runtime | None = None) -> dict:
    """On a GPU, the peak `torch.cuda.max_memory_allocated` (reset when training began) is the memory figure that
    reports use; RSS is kept beside it."""
    peak = peak_rss_mb()
    metric, _ = primary_metric(task)
    runtime = runtime or CPU
    return {**runtime.describe(), **runtime.peak_memory(),
        "method": method, "test": test, "best_epoch": run.best_epoch, f"best_validation_{metric}": run.best_value,
        "history": run.history, "trainable_parameters": sum(p.numel() for p in trainable),
        "seconds_per_epoch": run.seconds_per_epoch, "train_samples": train_samples,
        "peak_rss_mb": peak, "rss_at_start_mb": rss_at_start, "peak_memory_mb": peak - rss_at_start,
        "peak_memory_measured_as": measured_as, "settings": settings,
    }
