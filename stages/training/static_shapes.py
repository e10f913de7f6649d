"""Static batch shapes for compiled steps: every training batch is [batch_size, K, T, D] with T one of a few buckets.

torch.compile specialises a graph to its input shapes, and CUDA graphs replay one shape only, so a batch's rows and
length must come from a small set: the last batch of an epoch is padded to `batch_size` with copies of its first row
(real data, so every method's pooling stays finite) that the loss ignores (training_loop.loss_of, `rows`), and the
padded length T is rounded up to the next of `LENGTH_BUCKETS` quarters of the cache's max length. Padded positions
are zeros with a False mask, as the reader pads, so every method's output for the real rows is unchanged.
"""
from __future__ import annotations

import math

import torch

from cachetune.cache.hidden_states import CachedHiddenStates

LENGTH_BUCKETS = 4


def bucket_length(length: int, max_length: int, buckets: int = LENGTH_BUCKETS) -> int:
    """The smallest of max_length * i / buckets (rounded up, i = 1..buckets) that holds `length` tokens."""
    step = math.ceil(max_length / buckets)
    return min(max(step, math.ceil(length / step) * step), max(max_length, length))


def pad_batch(states: CachedHiddenStates, labels: torch.Tensor, batch_size: int,
              max_length: int) -> tuple[CachedHiddenStates, torch.Tensor, int]:
    """states [B, K, T, W] (mask [B, T] inside), labels [B] -> the same padded to [batch_size, K, T', W] with
    T' = bucket_length(T), and B (the real rows, first). Runs on the tensors' device, without waiting for it."""
    rows, length = states.shape[0], states.shape[2]
    if rows < batch_size:
        index = torch.cat([torch.arange(rows, device=labels.device),
                           torch.zeros(batch_size - rows, dtype=torch.long, device=labels.device)])
        labels = labels.index_select(0, index)
    return states.pad(batch_size, bucket_length(length, max_length)), labels, rows
