"""Running a side network over a cached split: logits, and the task's metrics."""
from __future__ import annotations

import numpy as np
import torch

from cache.reader import CacheReader

from .metrics import task_metrics
from .runtime import CPU, Runtime


def side_inputs(batch, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, mask) of a cached batch on the runtime's device; features are widened to float32 there, after
    the copy, so the host collates and transfers the cache's float16."""
    return runtime.to_device(batch.features, torch.float32), runtime.to_device(batch.mask)


@torch.no_grad()
def predict_split(model: torch.nn.Module, reader: CacheReader, batch_size: int = 64,
                  runtime: Runtime | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) for the reader's samples, in their sorted order."""
    runtime = runtime or CPU
    model.eval()
    chunks, order = [], []
    for batch in reader.batches(batch_size, pin_memory=runtime.pin_memory):
        with runtime.autocast():
            logits = model(*side_inputs(batch, runtime))
        chunks.append(logits.float().cpu().numpy())
        order.append(batch.index)
    logits = np.concatenate(chunks)[np.argsort(np.concatenate(order), kind="stable")]
    return logits, reader.labels[reader.samples]


def evaluate_split(model, reader: CacheReader, task: str, num_classes: int, batch_size: int = 64,
                   runtime: Runtime | None = None) -> dict:
    logits, labels = predict_split(model, reader, batch_size, runtime)
    return task_metrics(logits, labels, task, num_classes)
