"""The `pipeline info` command: what a cache holds; pipeline/cli.py registers it."""
from __future__ import annotations

import json

import click

from .cli_errors import user_errors
from .cli_options import DEFAULT_CACHE, storage_option


@click.command()
@click.argument("path", default=DEFAULT_CACHE)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--stats", is_flag=True,
              help="Per-layer mean, std, max |x| and share of values beyond float16 of the decoded values over the real tokens (reads every layer).")
@user_errors
@storage_option("path")
def info(path, as_json, stats):
    """What a cache holds: backbone, splits, layers, dtype, codecs, size against padded float32.

    PATH may be an fsspec URL (s3://bucket/features.zarr).
    """
    from cachetune.cache.info import describe_store, layer_stats
    from cachetune.cache.store_lock import store_reading

    with store_reading(path):
        facts = describe_store(path)
        if stats:
            facts["stats"] = layer_stats(path)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(f"store      {facts['path']}  [{facts['status']}]")
    click.echo(f"backbone   {facts['backbone']} ({facts['model_type']}, {facts['num_layers']} layers x {facts['hidden_size']}, pooling {facts['pooling']})")
    click.echo(f"layers     {facts['layers']}")
    click.echo(f"format     {facts['dtype']}, codecs {' + '.join(facts['codecs'])}, max length {facts['max_length']}")
    _echo_encoding(facts)
    cut = facts.get("truncation")
    if cut:
        allows = f"; backbone allows {cut['backbone_allows']}" if cut["backbone_allows"] else ""
        click.echo(f"truncated  {cut['cut']} of {cut['texts']} texts at {cut['max_length']} tokens "
                   f"(longest {cut['longest']} tokens{allows})")
    click.echo(f"task       {facts['task']} {facts['label_names'] or ''}")
    if facts["modality"] == "image" and facts["bytes_per_sample"]:
        click.echo(f"image      {facts['image_size'] or 'processor default'} px -> {facts['max_length']} tokens per image; "
                   f"{facts['bytes_per_sample'] / 1e3:.0f} kB per image on disk")
    click.echo("splits     " + ("as the data gave them" if facts["split_seed"] is None else
                                f"seeded and stratified where the data gave none (--split-seed {facts['split_seed']})"))
    if facts["sample"]:
        sample = facts["sample"]
        click.echo(f"sample     {sample['rows']:,} of the data's {sample['of']:,} rows (extract --max-samples, seed "
                   f"{sample['seed']}); not the whole data")
    for name, split in facts["splits"].items():
        click.echo(f"split      {name}: {split['samples']} samples, {split['tokens']} tokens, blocks {split['blocks_done']}/{split['blocks']}")
    ratio = facts["ratio_to_padded_fp32"]
    click.echo(f"size       {facts['bytes_on_disk'] / 1e6:.1f} MB on disk; padded float32 at max length would be "
               f"{facts['bytes_padded_fp32'] / 1e6:.1f} MB (ratio {ratio:.3f})" if ratio else f"size {facts['bytes_on_disk']} bytes")
    if stats:
        click.echo(f"stats      over {facts['stats'][0]['tokens'] if facts['stats'] else 0} real tokens (done blocks, all splits)")
        click.echo(f"  {'layer':>5}  {'mean':>11}  {'std':>11}  {'max |x|':>11}  {'> float16 max':>13}")
        for row in facts["stats"]:
            if row["mean"] is None:
                click.echo(f"  {row['layer']:>5}  (no finished blocks)")
                continue
            click.echo(f"  {row['layer']:>5}  {row['mean']:>11.4g}  {row['std']:>11.4g}  {row['max_abs']:>11.4g}  "
                       f"{row['fp16_overflow_fraction']:>13.3g}")


def _echo_encoding(facts: dict) -> None:
    """`info`'s lines on a compact store (and bytes per real token and layer for every store)."""
    encoding = facts.get("encoding") or {}
    if encoding.get("reduce") or encoding.get("group"):
        error, note = facts["relative_error"], facts["relative_error_note"]
        click.echo(f"encoding   {encoding['dtype']} (stored as {encoding['storage']}{', scale per token and ' + str(encoding['group']) + ' channels' if encoding.get('group') else ''})"
                   f"{', ' + encoding['reduce'] if encoding.get('reduce') else ''}; relative error "
                   + (note or ("not known yet (no block written)" if error is None else
                               f"{error:.4f} against the values before encoding")))
    if facts.get("derived_from"):
        click.echo(f"source     {facts['derived_from']['path']} (key {facts['derived_from']['key_sha256'][:12]})")
    if facts.get("bytes_per_token_layer") and facts["status"] == "complete":  # unwritten blocks would count as free
        click.echo(f"bytes      {facts['bytes_per_token_layer']:.1f} per real token and layer on disk "
                   f"(float16 raw: {2 * facts['hidden_size']})")
