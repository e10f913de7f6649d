"""The epoch loop that `fit` (side networks) and `baseline` (LoRA, full fine-tuning) share:
AdamW, linear warm-up then linear decay, gradient clipping, per-epoch validation, best epoch kept."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cachetune.cache.hidden_states import CachedHiddenStates

from ..memory import peak_allocated_mb, peak_rss_mb, tensor_mb
from ..metrics import primary_metric
from ..progress import progress_bar
from ..runtime import CPU, Runtime
from .target_scale import TargetScale


LOSS_SHOWN_EVERY_S = 2.0  # the progress bar's running loss reads the device: at most this often, never per step


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
    step_memory: dict | None = None  # Learner.step_memory on the run's largest batch (CPU runs)


def loss_of(logits: torch.Tensor, labels: torch.Tensor, task: str, rows: int | None = None) -> torch.Tensor:
    """Mean loss over the first `rows` rows (all when None): a static-shape batch's padding rows come last and
    count for nothing (stages/training/static_shapes.py)."""
    if rows is not None and rows < len(labels):
        if task == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="none")[:rows].mean()
        return F.cross_entropy(logits, labels, reduction="none")[:rows].mean()
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


class Learner:
    """One network's optimisation, a step at a time: AdamW over `parameter_groups`, warm-up then linear decay,
    gradient clipping, the running training loss, and per epoch the history and the best epoch's weights.
    `train_together` drives them: one for `fit` and `baseline`, many on the same batches for a sweep.

    forward(inputs) gives logits, run under the runtime's autocast; snapshot() copies the weights to keep.
    checkpoint (stages.training.checkpoint.Checkpoint): resume after its last epoch, and write one after every epoch.
    On a GPU AdamW is fused (one kernel for every tensor, and the gradient scaler's inf check stays on the device);
    nothing in a step waits for the device. compiled: `forward` is a torch.compile'd module in reduce-overhead mode
    (CUDA graphs), so each step marks a new graph step first. target_scale: regression targets are learnt
    standardised (stages/training/target_scale.py); validation restores the outputs itself."""

    def __init__(self, forward: Callable, trainable: list[torch.nn.Parameter], modules: torch.nn.Module,
                 snapshot: Callable[[], dict], schedule: Schedule, train_size: int, task: str,
                 runtime: Runtime | None = None, checkpoint=None, cuda_graphs: bool = False,
                 target_scale: TargetScale = TargetScale()):
        self.forward, self.trainable, self.modules, self.snapshot = forward, trainable, modules, snapshot
        self.schedule, self.task, self.runtime, self.checkpoint = schedule, task, runtime or CPU, checkpoint
        self.cuda_graphs, self.target_scale = cuda_graphs, target_scale
        self.optimizer = torch.optim.AdamW(parameter_groups(trainable, schedule.weight_decay), lr=schedule.lr,
                                           fused=True if self.runtime.is_cuda else None)
        self.step_peak, self.batch_bytes = [0], 0  # GPU bytes: a step's transient peak, the largest batch
        self.scaler = self.runtime.grad_scaler()
        steps = schedule.epochs * math.ceil(train_size / schedule.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_then_linear_decay(steps, schedule.warmup_ratio))
        self.metric, _ = primary_metric(task)
        self.stateful = {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}
        progress = ([], -math.inf, None, 0, [])  # history, best value, best state, best epoch, seconds per epoch
        if checkpoint is not None:
            progress = checkpoint.restore(modules, self.stateful, progress)
        self.history, self.best, self.best_state, self.best_epoch, self.seconds = progress

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def start_epoch(self) -> None:
        self.modules.train()
        self.total, self.count = torch.zeros((), device=self.runtime.device), 0

    def step(self, inputs, labels: torch.Tensor, rows: int | None = None) -> None:
        """One optimisation step; rows: the batch's real rows when it is padded to a static shape (the rest count
        for nothing)."""
        rows = len(labels) if rows is None else rows
        if self.runtime.is_cuda:
            self.batch_bytes = max(self.batch_bytes, sum(t.nbytes for t in batch_tensors(inputs)))
        with self.runtime.memory.window(self.step_peak):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with self.runtime.autocast():
                logits = self.forward(inputs)
            loss = loss_of(logits.float(), self.target_scale.standardise(labels), self.task, rows)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        self.total, self.count = self.total + loss.detach() * rows, self.count + rows

    def gpu_memory(self) -> dict:
        """What this network alone holds on the GPU at its peak, in MB: its weights (frozen layers too), gradients
        and optimizer state, the largest batch, and the largest transient of a step (activations; measured as the
        allocator's peak inside the step above what was allocated when it began). In a sweep, where the device
        also holds the other networks, this is the figure to compare with a fit; {} on the CPU."""
        if not self.runtime.is_cuda:
            return {}
        tensors = list(self.modules.parameters()) + list(self.modules.buffers())
        tensors += [p.grad for p in self.trainable if p.grad is not None]
        tensors += [t for state in self.optimizer.state.values() for t in state.values()
                    if isinstance(t, torch.Tensor) and t.is_cuda]
        held = sum(t.nbytes for t in {id(t): t for t in tensors if t.is_cuda}.values())
        return {"peak_gpu_network_mb": (held + self.batch_bytes + self.step_peak[0]) / 2**20}

    def step_memory(self, inputs, labels: torch.Tensor, rows: int | None = None) -> dict:
        """What one training step holds, in MB, by torch's own allocation tracking (stages.memory.peak_allocated_mb):
        `resident`: the network's weights and buffers (frozen ones included), the optimizer's state and the batch's
        tensors, allocated before the step; `step_peak`: the step's own peak above that (activations kept for the
        backward pass, gradients, temporaries). Takes a real step (the caller restores the weights it keeps); the
        previous step's gradients are freed first, so they are neither counted twice nor missed by the profiler. The
        step runs in training mode with a fresh running loss (a run resumed after its last epoch has trained none)."""
        self.start_epoch()
        self.optimizer.zero_grad(set_to_none=True)
        state = [t for values in self.optimizer.state.values() for t in values.values() if torch.is_tensor(t)]
        resident = tensor_mb([*self.modules.parameters(), *self.modules.buffers(), *state,
                              *batch_tensors(inputs), labels])
        return {"resident": resident, "step_peak": peak_allocated_mb(lambda: self.step(inputs, labels, rows))}

    def running_loss(self) -> float:
        """The epoch's mean training loss so far (.item() waits for the device)."""
        return self.total.item() / max(self.count, 1)

    def finish_epoch(self, validation: dict, seconds: float) -> dict:
        """Record the epoch (keeping the weights if it is the best so far), write the checkpoint; the history row."""
        self.seconds.append(seconds)
        epoch = self.epochs_done + 1
        row = {"epoch": epoch, "train_loss": self.running_loss(),
               **{f"validation_{k}": v for k, v in validation.items()}, "seconds": seconds}
        self.history.append(row)
        if validation[self.metric] > self.best:
            self.best, self.best_state, self.best_epoch = validation[self.metric], self.snapshot(), epoch
        if self.checkpoint is not None:
            weights = self.best_state if self.best_epoch == epoch else self.snapshot()  # shared tensors stored once
            self.checkpoint.save(weights, self.stateful,
                                 (self.history, self.best, self.best_state, self.best_epoch, self.seconds))
        return row

    def result(self, step_memory: dict | None = None) -> TrainingRun:
        return TrainingRun(self.history, self.best_epoch, self.best, self.best_state,
                           sum(self.seconds) / len(self.seconds), step_memory)


class Largest:
    """The batch with the most elements seen so far (CPU runs: training memory is measured on it after training,
    by `Learner.step_memory`, in `fit`, `sweep` and `baseline` alike). Kept only on the CPU."""

    def __init__(self):
        self.batch, self.size = None, -1

    def offer(self, batch: tuple | None, runtime: Runtime) -> None:
        """batch: (inputs, labels[, rows]); None is ignored."""
        if batch is not None and runtime.device.type == "cpu" and batch_elements(batch[0]) > self.size:
            self.batch, self.size = batch, batch_elements(batch[0])


def batch_tensors(inputs) -> list[torch.Tensor]:
    """The tensors of a batch: a tuple of tensors and CachedHiddenStates (side networks), or a dict as tokenizers
    give (baselines)."""
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    tensors = []
    for value in values:
        if isinstance(value, CachedHiddenStates):
            tensors += [t for t in (value.codes, value.scales, value.mask) if t is not None]
        elif torch.is_tensor(value):
            tensors.append(value)
    return tensors


def batch_elements(inputs) -> int:
    """Elements in a batch's tensors: within one run, the padded size."""
    return sum(t.numel() for t in batch_tensors(inputs))


class EpochBars:
    """The progress of one network's training (`fit`, `baseline`): a bar per epoch with the running loss, then a line
    with the epoch's training loss and validation metric."""

    def __init__(self, name: str, epochs: int, train_size: int, show: bool = True):
        self.name, self.epochs, self.train_size, self.show = name, epochs, train_size, show

    def begin(self, epoch: int) -> None:
        self.bar = progress_bar(total=self.train_size, desc=f"{self.name} epoch {epoch + 1}/{self.epochs}",
                                unit="sample", disable=not self.show)
        self.shown = time.perf_counter()

    def advance(self, rows: int, learners: list[Learner]) -> None:
        self.bar.update(rows)
        if not self.bar.disable and time.perf_counter() - self.shown >= LOSS_SHOWN_EVERY_S:  # .item() waits for the GPU
            self.bar.set_postfix(loss=f"{learners[0].running_loss():.4f}", refresh=False)
            self.shown = time.perf_counter()

    def skip(self, epoch: int) -> None:
        """An epoch no learner trains (every one resumed past it)."""

    def end(self, epoch: int, rows: list[dict], learners: list[Learner]) -> None:
        self.bar.close()
        if self.show:
            metric = learners[0].metric
            tqdm.write(f"epoch {epoch + 1}: train loss {rows[0]['train_loss']:.4f}, validation {metric} "
                       f"{rows[0][f'validation_{metric}']:.4f}")


def train_together(learners: list[Learner], batches: Callable[[int], Iterable[tuple]], epochs: int,
                   validate: Callable[[list[int]], list[dict]], progress,
                   inputs_for: Callable[[int, object], object] = lambda index, inputs: inputs,
                   around: Callable[[int], object] = lambda index: nullcontext()) -> list[dict | None]:
    """The one epoch loop of cachetune: `fit` and `baseline` run it with one learner, `sweep` with one per run of a
    seed, all on the same batches.

    batches(epoch) yields (inputs, labels) or (inputs, labels, real rows) on the learners' device; each learner that
    has not yet finished that epoch (a resumed one may be ahead) takes a step on inputs_for(i, inputs) inside
    around(i) (a sweep: its layers, its own random stream). validate(indices) gives those learners' validation
    metrics after each epoch; progress: an `EpochBars`-like object (begin, advance, skip, end).
    Returns each learner's `Learner.step_memory` on the run's largest batch (CPU runs; None on a GPU): one more step
    after the last epoch, when the learning rate is zero (the caller restores the best weights). A run resumed after
    its last epoch is measured on the first batch."""
    runtime, largest = learners[0].runtime, Largest()
    for epoch in range(min(learner.epochs_done for learner in learners), epochs):
        active = [i for i, learner in enumerate(learners) if learner.epochs_done == epoch]
        if not active:
            progress.skip(epoch)
            continue
        started = time.perf_counter()
        progress.begin(epoch)
        for i in active:
            learners[i].start_epoch()
        for inputs, labels, *rows in batches(epoch):
            for i in active:
                with around(i):
                    learners[i].step(inputs_for(i, inputs), labels, *rows)
            largest.offer((inputs, labels, *rows), runtime)
            progress.advance(rows[0] if rows else len(labels), [learners[i] for i in active])
        seconds = time.perf_counter() - started
        validations = validate(active)
        finished = []
        for i, validation in zip(active, validations):
            with around(i):  # a checkpoint stores the run's own random state
                finished.append(learners[i].finish_epoch(validation, seconds))
        progress.end(epoch, finished, [learners[i] for i in active])
    if runtime.device.type != "cpu":
        return [None] * len(learners)
    if largest.batch is None:
        largest.offer(next(iter(batches(0)), None), runtime)
    if largest.batch is None:
        return [None] * len(learners)
    inputs, labels, *rows = largest.batch
    measured = []
    for i, learner in enumerate(learners):
        with around(i):
            measured.append(learner.step_memory(inputs_for(i, inputs), labels, *rows))
    return measured


def train_epochs(name: str, forward: Callable, trainable: list[torch.nn.Parameter], modules: torch.nn.Module,
                 batches: Callable[[int], Iterable[tuple]], train_size: int,
                 validate: Callable[[], dict], snapshot: Callable[[], dict], schedule: Schedule, task: str,
                 show_progress: bool = True, runtime: Runtime | None = None, checkpoint=None,
                 cuda_graphs: bool = False, learner_out: list | None = None,
                 target_scale: TargetScale = TargetScale()) -> TrainingRun:
    """One network trained by `train_together`: batches(epoch) yields (inputs, labels) or (inputs, labels, real rows)
    already on the runtime's device; see `Learner` for the rest. learner_out: the learner is appended to it (for its
    GPU memory figures)."""
    learner = Learner(forward, trainable, modules, snapshot, schedule, train_size, task, runtime, checkpoint,
                      cuda_graphs, target_scale)
    if learner_out is not None:
        learner_out.append(learner)
    [step_memory] = train_together([learner], batches, schedule.epochs, lambda active: [validate()],
                                   EpochBars(name, schedule.epochs, train_size, show_progress))
    return learner.result(step_memory)


TRAINING_MEMORY_MEASURED_AS = (
    "torch's own allocation tracking (torch.profiler, profile_memory) of one training step on the run's largest "
    "batch: the step's peak allocation, plus the tensors alive before it (weights and buffers, frozen ones included; "
    "optimizer state; the batch), plus the data the run keeps decoded beside them (cached methods: the reader's "
    "buffered cache blocks). Not RSS: the allocator's slack and Python objects are left out")


def run_metrics(method: str, run: TrainingRun, test: dict, trainable: list, train_samples: int, task: str,
                rss_at_start: float, measured_as: str, settings: dict, runtime: Runtime | None = None,
                gpu_memory: dict | None = None, data_mb: float = 0.0) -> dict:
    """On a GPU, gpu_memory holds the memory figures that reports use (`peak_gpu_allocated_mb` and how it was
    measured); on the CPU `training_memory_mb` (TRAINING_MEMORY_MEASURED_AS; data_mb: the decoded data the run
    holds outside torch, in MB). Peak RSS above the start is kept beside either."""
    peak = peak_rss_mb()
    metric, _ = primary_metric(task)
    runtime = runtime or CPU
    memory = {}
    if run.step_memory is not None:
        parts = {**run.step_memory, "data": data_mb}
        memory = {"training_memory_mb": sum(parts.values()), "training_memory_parts_mb": parts,
                  "training_memory_measured_as": TRAINING_MEMORY_MEASURED_AS}
    return {**runtime.describe(), **(gpu_memory or {}), **memory,
        "method": method, "test": test, "best_epoch": run.best_epoch, f"best_validation_{metric}": run.best_value,
        "history": run.history, "trainable_parameters": sum(p.numel() for p in trainable),
        "seconds_per_epoch": run.seconds_per_epoch, "train_samples": train_samples,
        "peak_rss_mb": peak, "rss_at_start_mb": rss_at_start, "peak_memory_mb": peak - rss_at_start,
        "peak_memory_measured_as": measured_as, "settings": settings,
    }
