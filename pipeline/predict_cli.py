"""The `pipeline predict` command: raw texts or images in, records out (JSONL or CSV); pipeline/cli.py registers it."""
from __future__ import annotations

import json
from pathlib import Path

import click

from cachetune.cache.errors import InputError

from .cli_errors import user_errors
from .cli_options import delimiter_option, log, resolve_runtime, runtime_options


@click.command()
@click.argument("model_dir")
@click.option("--text", "texts", multiple=True, help="A text to classify; repeat for more.")
@click.option("--image", "images", multiple=True, help="An image file or a folder of images (image models); repeat for more.")
@click.option("--data", default=None, help="A .csv/.tsv/.jsonl/.parquet file of texts (or of image paths: --image-column).")
@click.option("--text-column", default="text", show_default=True, help="--data: the column of texts.")
@click.option("--text-pair-column", default=None, help="--data: the column of second texts, for pair tasks.")
@click.option("--delimiter", default=None, help="Column delimiter of a CSV/TSV file, e.g. ';' or tab.")
@click.option("--image-column", default=None, help="Image models: the table's column of image paths [default: image].")
@click.option("--out", default=None, help="Write .jsonl or .csv here [default: JSONL on stdout].")
@click.option("--backbone", "backbone_path", default=None, help="Backbone folder, if it moved since extraction.")
@runtime_options
@user_errors
def predict(model_dir, texts, images, data, text_column, text_pair_column, delimiter, image_column, out, backbone_path,
            device, precision):
    """Labels and probabilities for raw inputs: runs the frozen backbone and the side network."""
    from cachetune.stages.extraction.tokenizing import special_token_notes
    from cachetune.stages.training.predict import load_matching_backbone, logits_to_records, predict_texts
    from cachetune.stages.training.side_model import load_side_model

    if out:  # checked and its folder made before anything is loaded or computed, as the other commands do
        _require_record_format(out)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    side = load_side_model(model_dir, backbone_path)
    if images or image_column or side.info["cache_key"].get("modality") == "image":
        return _predict_images(side, model_dir, texts, images, data, image_column, out, resolve_runtime(device, precision))
    if bool(texts) == bool(data):
        raise InputError("give either --text (one or more) or --data FILE")
    if any(not t.strip() for t in texts):
        raise InputError("--text is empty; give the text to classify")
    runtime = resolve_runtime(device, precision)
    pairs, lines = None, None
    if data:
        from cachetune.pipeline.tables import read_table

        if not Path(data).exists():
            raise InputError(f"--data {data}: file not found")
        table = read_table(Path(data), delimiter_option(delimiter), log)
        columns = [text_column] + ([text_pair_column] if text_pair_column else [])
        for column in columns:
            if column not in table.columns:
                raise InputError(f"{data}: no column {column!r}; columns are: {', '.join(map(str, table.columns))}")
        empty = [i for i in range(len(table)) if any(not table.columns[c][i].strip() for c in columns)]
        if empty:
            log(f"predict: {len(empty)} of {len(table)} rows not scored: an empty {' or '.join(map(repr, columns))} "
                 f"({table.where(empty)}); each record carries its {table.unit} number")
        kept = sorted(set(range(len(table))) - set(empty))
        if not kept:
            raise InputError(f"{data}: every row has an empty {' or '.join(map(repr, columns))}; nothing to predict")
        texts = [table.columns[text_column][i] for i in kept]
        pairs = [table.columns[text_pair_column][i] for i in kept] if text_pair_column else None
        lines = [{table.unit: table.lines[i]} for i in kept]
    backbone = load_matching_backbone(side)
    where = ((lambda rows: table.where([kept[r] for r in rows])) if data else
             (lambda rows: "--text " + ", ".join(str(r + 1) for r in rows[:5]) + (" ..." if len(rows) > 5 else "")))
    for note in special_token_notes(backbone.tokenizer, list(texts), pairs, where):
        log(note)
    logits = predict_texts(side, backbone, list(texts), pairs, runtime=runtime, log=log)
    records = [{**(where or {}), "text": t, **r} for where, t, r in
               zip(lines or [None] * len(texts), texts, logits_to_records(logits, side.info))]
    _write_records(records, out)


def _predict_images(side, model_dir, texts, images, data, image_column, out, runtime) -> None:
    from cachetune.pipeline.tables import read_table
    from cachetune.stages.images import image_paths
    from cachetune.stages.training.predict import load_matching_backbone, logits_to_records, predict_images

    if side.info["cache_key"].get("modality", "text") != "image":
        raise InputError(f"{model_dir} is a text model: give --text or --data FILE of texts, not images")
    if texts:
        raise InputError(f"{model_dir} is an image model: give --image FILE|FOLDER or --data TABLE of image paths, not --text")
    if not images and not data:
        raise InputError("give --image FILE|FOLDER (one or more) or --data TABLE of image paths")
    paths = image_paths(list(images), log)
    if data:  # a table's column of image paths, relative to the table's folder
        if not Path(data).exists():
            raise InputError(f"--data {data}: file not found")
        table, column = read_table(Path(data)), image_column or "image"
        if column not in table.columns:
            raise InputError(f"{data}: no column {column!r} of image paths; columns are: "
                             f"{', '.join(map(str, table.columns))}; name it with --image-column")
        paths += [Path(data).parent / str(p) for p in table.columns[column]]
    logits = predict_images(side, load_matching_backbone(side), paths, runtime=runtime, log=log)
    _write_records([{"image": str(p), **r} for p, r in zip(paths, logits_to_records(logits, side.info))], out)


RECORD_FORMATS = (".jsonl", ".csv")


def _require_record_format(out: str) -> None:
    suffix = Path(out).suffix.lower()
    if suffix not in RECORD_FORMATS:
        raise InputError(f"--out {out}: predict writes {' or '.join(RECORD_FORMATS)}, not "
                         f"{suffix or 'a file without a suffix'}; name the file .jsonl or .csv")


def _write_records(records: list[dict], out: str | None) -> None:
    if out and Path(out).suffix.lower() == ".csv":
        import csv

        with open(out, "w", newline="") as stream:
            flat = [{**{k: v for k, v in r.items() if k != "probabilities"},
                     **{f"p_{name}": p for name, p in r.get("probabilities", {}).items()}} for r in records]
            writer = csv.DictWriter(stream, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
        return
    lines = "\n".join(json.dumps(r) for r in records) + "\n"
    if out:
        with open(out, "w") as stream:
            stream.write(lines)
    else:
        click.echo(lines, nl=False)
