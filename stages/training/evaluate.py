"""Running a side network over a cached split: logits, and the task's metrics."""
from __future__ import annotations

import numpy as np
import torch

from cache.reader import CacheReader

from ..metrics import task_metrics
from ..runtime import CPU, Runtime


def side_inputs(batch, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, mask) of a cached batch on the runtime's device; features are widened to float32 there, after
    the copy, so the host collates and transfers the cache's float16."""
    return batch.decoded(runtime.to_device), runtime.to_device(batch.mask)


def layer_subsets(features: torch.Tensor, subsets: list[tuple[int, ...] | None]) -> list[torch.Tensor]:
    """features [B, K, T, D] narrowed to each network's layer positions (None: all K); networks that read the same
    positions share one tensor."""
    made = {}
    for subset in dict.fromkeys(subsets):
        everything = subset is None or list(subset) == list(range(features.shape[1]))
        made[subset] = features if everything else features[:, list(subset)]
    return [made[subset] for subset in subsets]


@torch.no_grad()
def predict_split_many(models: list[torch.nn.Module], reader: CacheReader, batch_size: int = 64,
                       runtime: Runtime | None = None, subsets: list | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Logits [N, C] of every model over one read of the split, in the samples' sorted order, and the labels [N].
    subsets[i]: the positions, among the reader's layers, that models[i] reads (None: all)."""
    runtime = runtime or CPU
    subsets = subsets or [None] * len(models)
    for model in models:
        model.eval()
    chunks, order = [[] for _ in models], []
    for batch in reader.batches(batch_size, pin_memory=runtime.pin_memory):
        features, mask = side_inputs(batch, runtime)
        for model, inputs, out in zip(models, layer_subsets(features, subsets), chunks):
            with runtime.autocast():
                out.append(model(inputs, mask).float().cpu().numpy())
        order.append(batch.index)
    ranks = np.argsort(np.concatenate(order), kind="stable")
    return [np.concatenate(out)[ranks] for out in chunks], reader.labels[reader.samples]


def predict_split(model: torch.nn.Module, reader: CacheReader, batch_size: int = 64,
                  runtime: Runtime | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) for the reader's samples, in their sorted order."""
    (logits,), labels = predict_split_many([model], reader, batch_size, runtime)
    return logits, labels


def evaluate_split(model, reader: CacheReader, task: str, num_classes: int, batch_size: int = 64,
                   runtime: Runtime | None = None) -> dict:
    logits, labels = predict_split(model, reader, batch_size, runtime)
    return task_metrics(logits, labels, task, num_classes)
