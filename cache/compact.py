"""`pipeline compact`: re-encode an existing float16/float32 store as 8-bit codes and/or PCA coefficients, without
the backbone.

Block by block, like extraction: each destination block is read from the source's block, encoded, written whole,
then flagged done; `status: complete` comes last, so a killed run resumes at the first unfinished block, and every
chunk carries a crc32c checksum. The destination's key is the source's with the new encoding and
`derived_from` = the source's key_sha256, so a store made from another source (or with other settings) is refused
unless --overwrite. A projection's basis is fitted once on a seeded sample of the source's training tokens and
stored before any block, so a resumed run uses the same basis.
"""
from __future__ import annotations

import os

import numpy as np
import zarr

from .encoding import BlockEncoder, Encoding, read_projections
from .errors import InputError
from .layout import BlockPlan, codec_pipeline, layer_array_name
from .projection import SAMPLE_TOKENS, fit_pca, parse_reduce, sample_rows
from .reader import open_store, read_checked
from .writer import open_group, open_store_for_write, prepare_split, store_fs

META_FIELDS = ("row", "length", "label")


def same_store(a: str, b: str) -> bool:
    fs_a, path_a = store_fs(a)
    fs_b, path_b = store_fs(b)
    if fs_a.protocol != fs_b.protocol:
        return False
    return os.path.realpath(path_a) == os.path.realpath(path_b) if "file" in str(fs_a.protocol) else path_a == path_b


def compact_key(source_key: dict, source_sha: str, encoding: Encoding, codec: str) -> dict:
    key = {k: v for k, v in source_key.items() if k not in ("scale_group", "reduce")}
    key.update({"dtype": encoding.dtype, "codec": codec, "lossy": None, "derived_from": source_sha})
    key.update(encoding.key_fields())
    return key


def _fit_projections(source: zarr.Group, layers: list[int], components: int, root: zarr.Group, compressors, log) -> None:
    """Per layer, PCA on SAMPLE_TOKENS seeded real training tokens, written to `projection/` (then flagged ready)."""
    if "projection" in root and root["projection"].attrs.get("fitted"):
        return
    train = source["train"]
    rows = sample_rows(train["length"][:].astype(np.int64), train["token_start"][:], SAMPLE_TOKENS)
    log(f"fitting a {components}-component PCA basis per layer on {len(rows)} training tokens")
    group = root.create_group("projection", overwrite=True)
    for layer in layers:
        values = read_checked(train[layer_array_name(layer)], slice(None))[rows]
        basis, mean = fit_pca(values, components)
        group.create_array(f"{layer_array_name(layer)}_basis", data=basis, compressors=compressors[-1:])
        group.create_array(f"{layer_array_name(layer)}_mean", data=mean, compressors=compressors[-1:])
    group.attrs.update({"sample_tokens": len(rows), "seed": 0, "fitted": True})  # not "ready": it is no split


def _plan(split: zarr.Group) -> BlockPlan:
    """The source split's block layout (block size, token starts, each block's samples)."""
    block_tokens = int(split.attrs["block_tokens"])
    token_start = split["token_start"][:]
    owner = token_start // block_tokens
    return BlockPlan(block_tokens, token_start, [np.flatnonzero(owner == b) for b in range(int(split.attrs["num_blocks"]))])


def check_request(source_path: str, out: str, dtype: str, reduce: str | None):
    """Validate a compact request before anything is written (or locked) at `out`.

    Returns (encoding, opened source group, its attrs, hidden size, cached layers, PCA components or 0).
    Raises InputError: `out` is the source, the source is incomplete or already compact, a bad --dtype/--reduce.
    """
    if same_store(source_path, out):
        raise InputError(f"compact would write onto its own source {source_path}; give another --out")
    encoding = Encoding(dtype, reduce)
    source = open_store(source_path)
    attrs = dict(source.attrs)
    stored = Encoding.of_store(attrs)
    if not stored.plain:
        raise InputError(f"{source_path} is already a compact store (--dtype {stored.dtype}"
                         f"{f' --reduce {stored.reduce}' if stored.reduce else ''}); compact a float16 or float32 store")
    if encoding.plain and dtype == attrs.get("dtype"):
        raise InputError(f"--dtype {dtype} without --reduce would copy {source_path} unchanged; use int8, fp8 or --reduce")
    hidden, layers = int(attrs["hidden_size"]), list(attrs["layers"])
    components = parse_reduce(reduce, hidden)
    if components and "train" not in source:
        raise InputError(f"--reduce needs a train split to fit the basis on; {source_path} has none")
    return encoding, source, attrs, hidden, layers, components


def compact(source_path: str, out: str, dtype: str = "fp8", reduce: str | None = None, codec: str = "lz4",
            overwrite: bool = False, log=print, progress=None) -> str:
    """Writes or resumes `out` from `source_path`; returns 'complete' (was up to date) or 'written'.

    Raises InputError: `out` is the source, the source is incomplete or already compact, a bad --dtype/--reduce.
    """
    encoding, source, attrs, hidden, layers, components = check_request(source_path, out, dtype, reduce)
    filters, compressors = codec_pipeline(codec, None)
    key = compact_key(attrs["key"], attrs["key_sha256"], encoding, codec)
    root, state = open_store_for_write(out, key, overwrite)
    if state == "complete":
        return "complete"
    if state == "resume":
        log(f"resuming the unfinished store at {out}")
    root.attrs.update({name: value for name, value in attrs.items() if name not in ("key", "key_sha256", "status")})
    root.attrs.update({"dtype": dtype, "codec": codec, "lossy": None, "encoding": encoding.attrs(hidden),
                       "derived_from": {"path": str(source_path), "key_sha256": attrs["key_sha256"]}})
    if components:
        _fit_projections(source, layers, components, root, compressors, log)
    encoder = BlockEncoder(encoding, read_projections(open_group(out, "r+"), layers) if components else None)
    for name in sorted(source.group_keys()):
        split = source[name]
        if name == "projection" or not split.attrs.get("ready"):
            continue
        plan = _plan(split)
        meta = {field: split[field][:] for field in META_FIELDS}
        writer = prepare_split(root, name, plan, meta, layers, hidden, dtype, int(split[layer_array_name(layers[0])].chunks[0]),
                               filters, compressors, encoder)
        pending = writer.pending_blocks()
        bar = progress(total=len(pending), desc=f"compact {name}", unit="block") if progress else None
        arrays = [split[layer_array_name(i)] for i in layers]
        for block in pending:
            rows = slice(block * plan.block_tokens, (block + 1) * plan.block_tokens)
            writer.write_block(block, np.stack([read_checked(array, rows) for array in arrays]))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    root.attrs["status"] = "complete"
    return "written"
