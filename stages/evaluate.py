"""Running a side network over a cached split: logits, and the task's metrics."""
from __future__ import annotations

import numpy as np
import torch

from cache.reader import CacheReader

from .metrics import task_metrics


@torch.no_grad()
def predict_split(model: torch.nn.Module, reader: CacheReader, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) for the reader's samples, in their sorted order."""
    model.eval()
    chunks, order = [], []
    for batch in reader.batches(batch_size):
        chunks.append(model(batch.features, batch.mask).float().numpy())
        order.append(batch.index)
    logits = np.concatenate(chunks)[np.argsort(np.concatenate(order), kind="stable")]
    return logits, reader.labels[reader.samples]


def evaluate_split(model, reader: CacheReader, task: str, num_classes: int, batch_size: int = 64) -> dict:
    logits, labels = predict_split(model, reader, batch_size)
    return task_metrics(logits, labels, task, num_classes)
