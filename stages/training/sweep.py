"""`pipeline sweep`: many side networks trained on one pass over the cache.

Runs that share a seed share their batches (the seed fixes the batch order, as in `fit`): each batch is read,
decoded, copied to the device and widened once per step, then every network of the group takes its step on it;
validation and test are one read each for the whole group. Each run has its own random stream (set before its
step, kept after), so dropout draws what the same run draws in `fit` alone: a run's result here equals its
`fit` result with the same seed and settings. Memory grows with the number of networks (weights, optimizer
state, best weights), not with the cache; one network's activations are alive at a time.

Each run's model folder is OUT/runs/NAME, as `fit` writes it, and its checkpoint OUT/runs/NAME.checkpoint.pt after
every epoch: a killed sweep, rerun, skips the runs already finished and resumes the others after their last epoch.
OUT/sweep.json and OUT/sweep.csv list every run's best epoch, validation and test metrics.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from cachetune.cache.layout import key_sha256
from cachetune.cache.reader import CacheReader, open_store, subset_positions

from .checkpoint import Checkpoint
from .evaluate import layer_subsets, predict_split_many
from .fit import (FitSettings, data_path, device_batches, gpu_memory_figures, hold_frozen_layers, model_info, network_forward,
                  open_readers, reader_buffer_mb, require_training_splits, required_layers, resident_bytes, run_identity, spec_from_store,
                  training_scale, write_model_folder)
from ..memory import current_rss_mb, limit_allocator_slack, peak_rss_mb, reset_peak
from ..methods import build_model
from ..metrics import primary_metric, task_metrics
from ..progress import progress_bar
from ..runtime import Runtime
from .side_model import SideModel, trainable_state
from .sweep_grid import SweepRun
from .target_scale import TargetScale
from .training_loop import Learner, Schedule, run_metrics, train_together

SWEEP_JSON, SWEEP_CSV, RUNS_DIR = "sweep.json", "sweep.csv", "runs"


class RandomStream:
    """One run's torch random state (CPU and, on a GPU, CUDA), made current only while that run computes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu, self.cuda = torch.get_rng_state(), self._cuda_state()

    def _cuda_state(self):
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    @contextmanager
    def active(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        yield
        self.cpu, self.cuda = torch.get_rng_state(), self._cuda_state()


@dataclass
class Member:
    run: SweepRun
    settings: FitSettings
    identity: dict
    model: torch.nn.Module
    subset: tuple[int, ...]  # positions of its layers among the group's
    stream: RandomStream
    learner: Learner


def run_folder(out_dir: Path, run: SweepRun) -> Path:
    return Path(out_dir) / RUNS_DIR / run.name


def finished_metrics(folder: Path, identity: dict) -> dict | None:
    """The metrics of a model folder written for exactly this run (same options, schedule, seed, cache), else None."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    ready = (folder / "model.safetensors").exists() and metrics.get("identity_sha256") == key_sha256(identity)
    return metrics if ready else None


def sweep(cache_path: str, runs: list[SweepRun], settings: FitSettings, out_dir: Path,
          backbone_path: str | None = None, show_progress: bool = True) -> dict:
    """Train every run (settings' lr, weight decay and seed are each run's own); write the folders and tables."""
    out_dir = Path(out_dir)
    runtime = Runtime.resolve(settings.device, settings.precision)
    runtime.reset_peak_memory()  # once: the summary's GPU peak is the whole invocation's
    limit_allocator_slack()
    reset_peak()
    rss_at_start, started = current_rss_mb(), time.perf_counter()
    root = open_store(cache_path)
    attrs, spec = dict(root.attrs), spec_from_store(root, backbone_path)
    require_training_splits(root, cache_path)
    layers = {run.name: required_layers(run.config, spec, cache_path) for run in runs}
    settings_of = {run.name: replace(settings, lr=run.lr, weight_decay=run.weight_decay, seed=run.seed) for run in runs}
    identity_of = {run.name: run_identity(run.config, settings_of[run.name], attrs["key_sha256"]) for run in runs}
    results = {run.name: finished_metrics(run_folder(out_dir, run), identity_of[run.name]) for run in runs}
    todo = [run for run in runs if results[run.name] is None]
    seeds = list(dict.fromkeys(run.seed for run in todo))
    train_size = len(subset_positions(root["train"]["length"].shape[0], settings.max_train_samples))
    bar = progress_bar(total=len(seeds) * settings.epochs * train_size, unit="sample", disable=not show_progress,
                       desc=f"sweep: {len(todo)} of {len(runs)} runs to train"
                            + (f", {len(seeds)} passes (one per seed)" if len(seeds) > 1 else ""))
    best = _best(runs, results, primary_metric(attrs["task"])[0])
    if best:
        bar.set_postfix(best=f"{best[0]} {best[1]:.4f}", refresh=False)
    resident = [0]  # the largest --in-memory cache held on the GPU (one seed group's at a time)
    for seed in seeds:
        group = [run for run in todo if run.seed == seed]
        for run, metrics in _train_group(cache_path, root, group, layers, settings_of, identity_of, spec, attrs,
                                         runtime, out_dir, bar, rss_at_start, runs, results, resident):
            results[run.name] = metrics
    bar.close()
    summary = _summary(runs, results, settings, time.perf_counter() - started, peak_rss_mb() - rss_at_start,
                       runtime, len(todo), attrs, resident[0])
    write_tables(out_dir, summary)
    return summary


def _train_group(cache_path, root, group, layers, settings_of, identity_of, spec, attrs, runtime, out_dir, bar,
                 rss_at_start, runs, results, resident):
    """Train the runs of one seed on shared batches; yield (run, metrics) as each model folder is written."""
    settings = settings_of[group[0].name]
    union = sorted(set().union(*(layers[run.name] for run in group)))
    readers = open_readers(cache_path, root, union, settings, runtime)
    resident[0] = max(resident[0], resident_bytes(readers))
    train_size, task = len(readers["train"]), attrs["task"]
    scale = training_scale(readers["train"], task)  # every run of the group trains on the same rows
    members = [_member(run, settings_of[run.name], identity_of[run.name], layers[run.name], union, spec, train_size,
                       task, runtime, out_dir, bar, scale) for run in group]
    first = min(member.learner.epochs_done for member in members)
    bar.update(first * train_size)  # epochs every run of the group finished before a resume

    def batches(epoch):
        return device_batches(readers["train"], settings, epoch, runtime, attrs["max_length"])

    def inputs_for(index, inputs):
        features, mask = inputs
        return layer_subsets(features, [members[index].subset])[0], mask

    def validate(active):
        return _evaluate([members[i] for i in active], readers["validation"], task, spec.num_labels, runtime,
                         settings.batch_size, scale)

    step_memory = train_together([member.learner for member in members], batches, settings.epochs, validate,
                                 SweepBar(bar, train_size, settings.seed, settings.epochs, runs, results, members),
                                 inputs_for, lambda index: members[index].stream.active())
    for member in members:
        member.model.load_state_dict(member.learner.best_state, strict=False)
    tests = (_evaluate(members, readers["test"], task, spec.num_labels, runtime, settings.batch_size, scale)
             if "test" in readers else [{}] * len(members))
    for member, test, memory in zip(members, tests, step_memory):
        run = member.learner.result(memory)
        trainable = member.learner.trainable
        metrics = run_metrics(member.run.config.method, run, test, trainable, train_size, task, rss_at_start,
                              "peak RSS of the whole sweep so far (Linux VmHWM, reset when it began) minus the RSS "
                              "when it began; seconds per epoch are the sweep's, shared by every run of its seed",
                              asdict(member.settings), runtime,
                              gpu_memory_figures(runtime, member.learner, resident_bytes(readers), alone=False),
                              reader_buffer_mb(readers["train"]))
        metrics.update(identity_sha256=key_sha256(member.identity), sweep_run=member.run.name,
                       sweep_runs_sharing_batches=len(members), data_path=data_path(readers["train"]), **scale.to_info())
        side = SideModel(member.model, member.run.config, spec, model_info(attrs, cache_path, scale))
        write_model_folder(run_folder(out_dir, member.run), side, run.best_state, metrics)
        member.learner.checkpoint.remove()
        yield member.run, metrics


class SweepBar:
    """The sweep's progress (see `train_together`): one bar over every seed's epochs, the best run so far beside it,
    and a line per epoch."""

    def __init__(self, bar, train_size: int, seed: int, epochs: int, runs, results, members):
        self.bar, self.train_size, self.seed, self.epochs = bar, train_size, seed, epochs
        self.runs, self.results, self.members = runs, results, members

    def begin(self, epoch: int) -> None:
        pass

    def advance(self, rows: int, learners) -> None:
        self.bar.update(rows)

    def skip(self, epoch: int) -> None:
        self.bar.update(self.train_size)

    def end(self, epoch: int, rows: list[dict], learners) -> None:
        best = _best(self.runs, self.results, self.members[0].learner.metric, self.members)
        self.bar.set_postfix(best=f"{best[0]} {best[1]:.4f}", refresh=False)
        if not self.bar.disable:
            self.bar.write(f"seed {self.seed} epoch {epoch + 1}/{self.epochs}: best so far {best[0]}, validation "
                           f"{self.members[0].learner.metric} {best[1]:.4f}")


def _member(run, settings, identity, layers, union, spec, train_size, task, runtime, out_dir, bar,
            scale: TargetScale) -> Member:
    """Built as `fit` builds it: the same seed, then the model, so the initial weights are the same."""
    torch.manual_seed(run.seed)
    model = hold_frozen_layers(build_model(run.config, spec).to(runtime.device), runtime)
    stream = RandomStream(runtime.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = Schedule(settings.epochs, settings.batch_size, run.lr, run.weight_decay, settings.warmup_ratio, run.seed)
    checkpoint = Checkpoint.beside(run_folder(out_dir, run), identity, log=lambda line: bar.write(line, file=sys.stderr))
    forward, cuda_graphs = network_forward(model, settings, runtime)
    with stream.active():  # a resumed checkpoint restores the run's random state into its stream
        learner = Learner(forward, trainable, model, lambda: trainable_state(model), schedule,
                          train_size, task, runtime, checkpoint, cuda_graphs, scale)
    subset = tuple(union.index(layer) for layer in layers)
    return Member(run, settings, identity, model, subset, stream, learner)


def _evaluate(members: list[Member], reader: CacheReader, task: str, num_labels: int, runtime: Runtime,
              batch_size: int, scale: TargetScale) -> list[dict]:
    """Batches of the training size, as `fit` evaluates (regression outputs restored to the data's units)."""
    logits, labels = predict_split_many([m.model for m in members], reader, batch_size, runtime=runtime,
                                        subsets=[m.subset for m in members])
    return [task_metrics(scale.restore(each), labels, task, num_labels) for each in logits]


def _best(runs: list[SweepRun], results: dict, metric: str, members: list[Member] = ()) -> tuple[str, float] | None:
    """(name, best validation value) over the finished runs and those still training."""
    scores = {run.name: results[run.name][f"best_validation_{metric}"] for run in runs if results.get(run.name)}
    scores.update({m.run.name: m.learner.best for m in members if m.learner.best_epoch})
    return max(scores.items(), key=lambda item: item[1]) if scores else None


def _summary(runs, results, settings, seconds, peak_mb, runtime, trained, attrs, resident: int = 0) -> dict:
    metric, _ = primary_metric(attrs["task"])
    rows = []
    for run in runs:
        metrics = results[run.name]
        rows.append({"name": run.name, "group": run.group, "method": run.config.method,
                     "options": dict(run.options), "lr": run.lr, "weight_decay": run.weight_decay, "seed": run.seed,
                     "best_epoch": metrics["best_epoch"], f"validation_{metric}": metrics[f"best_validation_{metric}"],
                     **{f"test_{key}": value for key, value in metrics["test"].items()},
                     "trainable_parameters": metrics["trainable_parameters"], "folder": f"{RUNS_DIR}/{run.name}"})
    best = max(rows, key=lambda row: row[f"validation_{metric}"])
    return {"metric": metric, "best": best["name"], "best_by": f"validation_{metric} (never test)", "runs": rows,
            "trained_now": trained, "wall_seconds": seconds, "peak_memory_mb": peak_mb,
            "peak_memory_measured_as": "peak RSS of this sweep invocation above its RSS when it began",
            **runtime.describe(), **runtime.peak_memory(resident),
            "settings": {key: value for key, value in asdict(settings).items()
                         if key not in ("lr", "weight_decay", "seed")}}


def write_tables(out_dir: Path, summary: dict) -> None:
    """sweep.json (everything) and sweep.csv (one row per run); written whole, then renamed into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / (SWEEP_JSON + ".partial")
    partial.write_text(json.dumps(summary, indent=2))
    partial.replace(out_dir / SWEEP_JSON)
    rows = [{**{k: v for k, v in row.items() if k != "options"},
             "options": " ".join(f"{k}={v}" for k, v in row["options"].items())} for row in summary["runs"]]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    partial = out_dir / (SWEEP_CSV + ".partial")
    with open(partial, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(out_dir / SWEEP_CSV)

