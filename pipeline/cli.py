"""The `pipeline` command: extract features once, then fit side networks on them."""
from __future__ import annotations

import json
import os
import sys
from functools import wraps

import click

from cache.errors import InputError

DEFAULT_CACHE = os.path.join("artifacts", "features.zarr")


def user_errors(function):
    """Bad input ends in one line on stderr and exit code 2, never a traceback."""

    @wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except InputError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """cachetune: run a frozen backbone once, cache its layers, train side networks on the cache.

    \b
    Typical use:
      pipeline extract --layers all        # stage one: write artifacts/features.zarr
      pipeline fit --method sherl          # stage two: train a side network on it
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@main.command()
@click.option("--backbone", default="minilm", show_default=True,
              help="Built-in name (minilm, mpnet), a local model folder, or a hub id already in the local cache.")
@click.option("--data", default="movies", show_default=True,
              help="Built-in name (movies, trec), a .csv/.tsv/.jsonl/.parquet file, or a folder of train/validation/test files.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--text-pair-column", default=None, help="Second text of a pair task (optional).")
@click.option("--label-column", default="label", show_default=True)
@click.option("--split-column", default=None, help="Column with train/validation/test; without it a seeded stratified 80/10/10 split is made.")
@click.option("--task", type=click.Choice(["classification", "regression"]), default="classification", show_default=True)
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--layers", default="all", show_default=True, help="all | last:K | comma list of hidden_states indices (0 = embeddings).")
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per sample after truncation.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--codec", type=click.Choice(["lz4", "zstd", "none"]), default="lz4", show_default=True,
              help="Lossless compressor (blosc); every chunk also gets a crc32c checksum.")
@click.option("--lossy", default=None, help="Opt-in lossy rounding, e.g. bitround:7 (about bfloat16 precision).")
@click.option("--out", default=DEFAULT_CACHE, show_default=True, help="Where the zarr store goes.")
@click.option("--overwrite", is_flag=True, help="Replace a store made with other settings.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model folder's own Python code to run.")
@click.option("--block-tokens", type=int, default=16384, show_default=True, help="Tokens per block (one shard, the unit of resume).")
@click.option("--chunk-tokens", type=int, default=2048, show_default=True, help="Tokens per compressed chunk.")
@user_errors
def extract(backbone, data, text_column, text_pair_column, label_column, split_column, task, split_seed, layers,
            max_length, batch_size, dtype, codec, lossy, out, overwrite, device, trust_remote_code, block_tokens, chunk_tokens):
    """Stage one: run the frozen backbone over the data once and cache its layers.

    Re-running with the same settings does nothing; after a crash it resumes from the first
    unfinished block. Different settings into an existing store are refused without --overwrite.
    """
    from pipeline.data import load_dataset
    from stages.backbones import load_backbone
    from stages.extract import ExtractSettings, extract as run_extract, validate_settings

    settings = ExtractSettings(out=out, layers=layers, max_length=max_length, batch_size=batch_size, dtype=dtype,
                               codec=codec, lossy=lossy, overwrite=overwrite, block_tokens=block_tokens,
                               chunk_tokens=chunk_tokens, device=device)
    validate_settings(settings)
    dataset = load_dataset(data, text_column, label_column, text_pair_column, task, split_seed, split_column)
    model = load_backbone(backbone, trust_remote_code)
    if run_extract(model, dataset, settings) == "complete":
        click.echo(f"{out} is up to date (same backbone, data and settings); nothing to do")
    else:
        click.echo(f"wrote {out}")


@main.command()
@click.argument("path", default=DEFAULT_CACHE)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@user_errors
def info(path, as_json):
    """What a cache holds: backbone, splits, layers, dtype, codecs, size against padded float32."""
    from cache.info import describe_store

    facts = describe_store(path)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(f"store      {facts['path']}  [{facts['status']}]")
    click.echo(f"backbone   {facts['backbone']} ({facts['model_type']}, {facts['num_layers']} layers x {facts['hidden_size']}, pooling {facts['pooling']})")
    click.echo(f"layers     {facts['layers']}")
    click.echo(f"format     {facts['dtype']}, codecs {' + '.join(facts['codecs'])}, lossy {facts['lossy'] or 'off'}, max length {facts['max_length']}")
    click.echo(f"task       {facts['task']} {facts['label_names'] or ''}")
    for name, split in facts["splits"].items():
        click.echo(f"split      {name}: {split['samples']} samples, {split['tokens']} tokens, blocks {split['blocks_done']}/{split['blocks']}")
    ratio = facts["ratio_to_padded_fp32"]
    click.echo(f"size       {facts['bytes_on_disk'] / 1e6:.1f} MB on disk; padded float32 at max length would be "
               f"{facts['bytes_padded_fp32'] / 1e6:.1f} MB (ratio {ratio:.3f})" if ratio else f"size {facts['bytes_on_disk']} bytes")
