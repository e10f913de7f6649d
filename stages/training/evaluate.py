"""Running a side network over a cached split: logits, and the task's metrics."""
from __future__ import annotations

import numpy as np
import torch

from cachetune.cache.hidden_states import CachedHiddenStates
from cachetune.cache.reader import CacheReader

from ..metrics import task_metrics
from ..runtime import CPU, Runtime
from .target_scale import TargetScale


def side_inputs(batch, runtime: Runtime) -> tuple[CachedHiddenStates, torch.Tensor]:
    """(hidden states, mask) of a cached batch on the runtime's device, still in the store's encoding: the host
    collates and transfers the codes, and each method decodes a layer when it uses it."""
    states = batch.hidden_states(runtime.to_device)
    return states, states.mask


def layer_subsets(states: CachedHiddenStates, subsets: list[tuple[int, ...] | None]) -> list[CachedHiddenStates]:
    """The batch narrowed to each network's layer slots (None: all K); networks that read the same slots share
    one CachedHiddenStates (a view for consecutive slots, a gather of the codes otherwise)."""
    made = {subset: states if subset is None else states.select(subset) for subset in dict.fromkeys(subsets)}
    return [made[subset] for subset in subsets]


@torch.no_grad()
def predict_split_many(models: list[torch.nn.Module], reader: CacheReader, batch_size: int = 64,
                       runtime: Runtime | None = None, subsets: list | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Logits [N, C] of every model over one read of the split, in the samples' sorted order, and the labels [N].
    subsets[i]: the positions, among the reader's layers, that models[i] reads (None: all). Logits stay on the
    device until the split is done: one copy to the host per model, not one per batch."""
    runtime = runtime or CPU
    subsets = subsets or [None] * len(models)
    for model in models:
        model.eval()
    chunks, order = [[] for _ in models], []
    for batch in reader.batches(batch_size, pin_memory=runtime.pin_memory):
        features, mask = side_inputs(batch, runtime)
        for model, inputs, out in zip(models, layer_subsets(features, subsets), chunks):
            with runtime.autocast():
                out.append(model(inputs, mask).float())
        order.append(batch.index)
    if not order:
        return [np.zeros((0, 1), np.float32) for _ in models], reader.labels[reader.samples]
    ranks = np.argsort(np.concatenate(order), kind="stable")
    return [torch.cat(out).cpu().numpy()[ranks] for out in chunks], reader.labels[reader.samples]


def predict_split(model: torch.nn.Module, reader: CacheReader, batch_size: int = 64,
                  runtime: Runtime | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) for the reader's samples, in their sorted order."""
    (logits,), labels = predict_split_many([model], reader, batch_size, runtime)
    return logits, labels


def evaluate_split(model, reader: CacheReader, task: str, num_classes: int, batch_size: int = 64,
                   runtime: Runtime | None = None, *, scale: TargetScale) -> dict:
    """The task's metrics over the reader's samples; scale: the model's target scale (regression outputs are
    restored to the data's units before they are scored)."""
    logits, labels = predict_split(model, reader, batch_size, runtime)
    return task_metrics(scale.restore(logits), labels, task, num_classes)
