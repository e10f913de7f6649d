"""The CPU training-memory measure: torch's own allocations of one step, against sizes known by hand."""
from __future__ import annotations

import pytest
import torch

from cachetune.stages.memory import peak_allocated_mb, tensor_mb
from cachetune.stages.training.training_loop import Learner, Schedule

MB = 2**20


def test_peak_allocated_counts_live_tensors_not_freed_ones():
    def work():
        kept = torch.ones(4 * MB // 4)  # 4 MB, alive until work returns
        for _ in range(3):
            torch.ones(2 * MB // 4)  # 2 MB, freed at once: counted once, not three times
        return kept.sum()

    assert peak_allocated_mb(work) == pytest.approx(6, abs=0.1)


def test_tensor_mb_counts_a_shared_storage_once():
    x = torch.zeros(MB // 4)
    assert tensor_mb([x, x[:10], x.view(2, -1), None]) == pytest.approx(1)


@pytest.mark.parametrize("rows", [512, 2048])
def test_step_memory_holds_weights_optimizer_state_and_activations(rows):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 2))
    trainable = list(model.parameters())
    learner = Learner(model, trainable, model, lambda: {}, Schedule(1, rows, 1e-3, 0.0, 0.0, 0), rows,
                      "classification")
    x, y = torch.randn(rows, 256), torch.randint(0, 2, (rows,))
    learner.start_epoch()
    learner.step(x, y)  # AdamW's state exists from the first step on
    weights = sum(p.numel() for p in trainable) * 4 / MB
    memory = learner.step_memory(x, y)
    # resident: weights + AdamW's two moments (+ its step counters) + the batch
    assert memory["resident"] == pytest.approx(3 * weights + (x.numel() * 4 + y.numel() * 8) / MB, rel=0.01)
    # the step keeps the first layer's output and GELU's output for backward (rows x 1024 floats each), and
    # allocates gradients as large as the weights
    activations = 2 * rows * 1024 * 4 / MB
    assert activations + weights <= memory["step_peak"] <= 2 * (activations + weights)
