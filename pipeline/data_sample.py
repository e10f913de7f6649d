"""`extract --max-samples N`: a seeded sample of a large dataset, stratified by split and label, so the splits keep
their proportions and each class its share of each. The sample goes into the store's key (`sample`), so a store of a
sample is never taken for the whole data's, and `pipeline info` shows it."""
from __future__ import annotations

import numpy as np

from cachetune.cache.errors import InputError

from .data import SPLITS


def take_sample(dataset, max_samples: int | None, seed: int, log):
    """The dataset, or `max_samples` of its rows drawn with `seed`, with `sample` = {"rows", "of", "seed"}; logs one
    line saying which. Each split keeps its share of max_samples, and within it each class its share (regression:
    the splits only). Raises InputError: max_samples < 1, or a sample with no rows of a split, or no
    training row of a class, that the data has (the fix: a larger --max-samples)."""
    if max_samples is None:
        return dataset
    if max_samples < 1:
        raise InputError(f"--max-samples {max_samples}: give at least 1 (or leave it out to extract every row)")
    total = len(dataset)
    if max_samples >= total:
        log(f"note: {dataset.name}: --max-samples {max_samples:,} is not fewer than its {total:,} rows; extracting them all")
        return dataset
    sample = dataset.take(stratified_rows(dataset, max_samples, seed),
                          {"rows": max_samples, "of": total, "seed": seed})
    check_sample(dataset, sample, max_samples, log)
    by = "split and label" if dataset.task == "classification" else "split"
    log(f"note: {dataset.name}: took {max_samples:,} of {total:,} rows, seed {seed} (--max-samples, --split-seed; "
        f"stratified by {by})")
    return sample


def stratified_rows(dataset, count: int, seed: int) -> np.ndarray:
    """Sorted positions of `count` rows: each split's quota, then within it each class's, by largest remainders;
    a seeded random draw of each quota."""
    rng = np.random.default_rng(seed)
    splits = [np.flatnonzero(dataset.split == index) for index in range(len(SPLITS))]
    chosen = []
    for rows, quota in zip(splits, quotas([len(rows) for rows in splits], count)):
        labels = dataset.labels[rows]
        groups = [rows[labels == c] for c in np.unique(labels)] if dataset.task == "classification" else [rows]
        chosen += [rng.permutation(group)[:k] for group, k in zip(groups, quotas([len(g) for g in groups], quota))]
    return np.sort(np.concatenate(chosen))


def quotas(sizes: list[int], count: int) -> np.ndarray:
    """`count` shared in proportion to `sizes`: the floors, then one more for the largest remainders (ties: first)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if not sizes.sum():
        return np.zeros(len(sizes), np.int64)
    share = sizes * count / sizes.sum()
    quota = np.floor(share).astype(np.int64)
    quota[np.argsort(quota - share, kind="stable")[:count - quota.sum()]] += 1
    return quota


def _classes(dataset, split: int) -> set:
    """The classes with rows in `split` ({None} for a non-empty regression split)."""
    labels = dataset.labels[dataset.split == split]
    if dataset.task != "classification":
        return {None} if labels.size else set()
    return set(np.unique(labels).tolist())


def check_sample(dataset, sample, count: int, log) -> None:
    """Refuses a sample that empties a split, or drops a class from train; warns when it drops a class from
    validation or test (their metrics would never score it)."""
    for index, split in enumerate(SPLITS):
        kept = _classes(sample, index)
        lost = sorted(_classes(dataset, index) - kept)
        if not lost:
            continue
        names = ", ".join(repr(dataset.label_names[c]) for c in lost[:3]) + (" ..." if len(lost) > 3 else "")
        if not kept:
            raise InputError(f"--max-samples {count}: the sample of {dataset.name} has no {split} rows "
                             f"(the data has {int((dataset.split == index).sum()):,}); raise --max-samples")
        if split == "train":
            raise InputError(f"--max-samples {count}: the sample of {dataset.name} has no training row of class {names}; "
                             "raise --max-samples")
        log(f"warning: {dataset.name}: the --max-samples {count} sample has no {split} row of class {names}; "
            f"{split} metrics never score it; raise --max-samples")
