"""Splits that make a run meaningless, found when the data is loaded (before `extract` writes anything).

- No validation rows (given train/test files, or the 80/10/10 split of classes of 3 or 4 rows): a seeded
  stratified share of train becomes validation, and the log says so. `fit` needs validation to pick its epoch.
- A class without training rows (only in validation or test): refused; no side network can learn it.
- The same text (and pair) in train and in validation or test: a loud warning; the run still works, but its
  held-out metrics flatter the model.
- No test rows at all, or a class absent from validation or test (too few rows for the 80/10/10 split): a
  warning; fit then reports no test metrics, or metrics that never score that class.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from cachetune.cache.errors import InputError

VALIDATION_FRACTION = 0.1
SPLITS = ("train", "validation", "test")


def check_splits(dataset, seed: int, log) -> object:
    """The dataset, with a validation split carved from train when it had none; raises InputError for a class
    without training rows; warns (through `log`) about texts shared between train and a held-out split."""
    dataset = carve_validation(dataset, seed, log)
    refuse_classes_without_training_rows(dataset)
    warn_shared_samples(dataset, log)
    warn_thin_held_out_splits(dataset, log)
    return dataset


def carve_validation(dataset, seed: int, log, fraction: float = VALIDATION_FRACTION):
    """When no row is in validation: per class (all rows for regression), round(fraction x its training rows),
    at least one, from classes with two or more training rows, drawn with `seed`, become validation."""
    if dataset.rows("validation").size:
        return dataset
    train = dataset.rows("train")
    rng = np.random.default_rng(seed)
    if dataset.task == "regression":
        groups = [train]
    else:
        groups = [train[dataset.labels[train] == c] for c in np.unique(dataset.labels[train])]
    chosen = [rng.permutation(rows)[:max(1, int(round(fraction * len(rows))))] for rows in groups if len(rows) >= 2]
    why = ("the given splits have none" if dataset.split_seed is None else
           "the seeded 80/10/10 split drew none from classes this small")
    if not chosen:
        raise InputError(f"{dataset.name}: no validation rows ({why}) and no class has two training rows to spare; "
                         "add a validation file (validation.csv) or more rows")
    chosen = np.sort(np.concatenate(chosen))
    split = dataset.split.copy()
    split[chosen] = SPLITS.index("validation")
    log(f"note: {dataset.name}: no validation rows ({why}); made {len(chosen)} of the {len(train)} training rows the "
        f"validation split ({'' if dataset.task == 'regression' else 'stratified, '}{fraction:.0%}, at least one per "
        f"class, --split-seed {seed}); give a validation file or split column to choose them yourself")
    return replace(dataset, split=split, split_seed=seed)


def warn_thin_held_out_splits(dataset, log) -> None:
    """A note when no row is in test, or (classification) when a class has no validation or no test row."""
    if not dataset.rows("test").size:
        log(f"warning: {dataset.name}: no test rows{' (the table is too small for the 80/10/10 split)' if dataset.split_seed is not None else ''}; "
            "fit and sweep will report validation metrics only; give a test file or split column for a held-out score")
    if dataset.task != "classification":
        return
    for split in ("validation", "test"):
        rows = dataset.rows(split)
        if not rows.size:
            continue
        absent = np.setdiff1d(np.arange(len(dataset.label_names)), dataset.labels[rows])
        if absent.size:
            names = ", ".join(repr(dataset.label_names[c]) for c in absent[:5]) + (" ..." if absent.size > 5 else "")
            log(f"warning: {dataset.name}: {absent.size} class{'es' if absent.size > 1 else ''} ({names}) "
                f"{'have' if absent.size > 1 else 'has'} no {split} row (too few rows to split); {split} metrics never "
                f"score {'them' if absent.size > 1 else 'it'}; add rows or give the split yourself")


def refuse_classes_without_training_rows(dataset) -> None:
    if dataset.task != "classification":
        return
    counts = np.bincount(dataset.labels[dataset.rows("train")], minlength=len(dataset.label_names))
    missing = np.flatnonzero(counts == 0)
    if not missing.size:
        return
    rows = np.flatnonzero(np.isin(dataset.labels, missing))
    names = ", ".join(repr(dataset.label_names[c]) for c in missing[:3]) + (" ..." if missing.size > 3 else "")
    held_out = sorted({SPLITS[s] for s in dataset.split[rows]})
    raise InputError(f"{dataset.name}: class{'es' if missing.size > 1 else ''} {names} "
                     f"{'have' if missing.size > 1 else 'has'} no training rows (only {' and '.join(held_out)}: "
                     f"{dataset.where(rows)}); add training rows of {'them' if missing.size > 1 else 'it'} or remove "
                     "those rows")


def _sample_keys(dataset) -> list | None:
    if dataset.modality == "image":
        return dataset.images.paths  # the same file twice; None for array-backed built-ins
    return list(zip(dataset.texts, dataset.pairs)) if dataset.pairs else dataset.texts


def warn_shared_samples(dataset, log) -> None:
    """Warns once per held-out split whose rows repeat a training text (pair, or image file) exactly."""
    keys = _sample_keys(dataset)
    if keys is None:
        return
    seen = {keys[i] for i in dataset.rows("train")}
    for split in ("validation", "test"):
        shared = [i for i in dataset.rows(split) if keys[i] in seen]
        if shared:
            what = "image file" if dataset.modality == "image" else "text"
            log(f"warning: {dataset.name}: {len(shared)} of {dataset.rows(split).size} {split} rows repeat a training "
                f"{what} exactly ({dataset.where(shared)}); {split} metrics will flatter the model: remove the "
                "duplicates from one side")
