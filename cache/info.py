"""What a store holds, how big it is against the same data padded in float32, and per-layer statistics.

The store may be a local path or an fsspec URL (s3://bucket/features.zarr).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import zarr

from .encoding import Decoder, Encoding, check_scales, read_projections, scale_array_name
from .errors import InputError
from .layout import layer_array_name
from .remote_access import check_reachable
from .writer import store_fs

FLOAT16_MAX = 65504.0
# Stores written before the recorded error's reference was float32 rounded it to float16: inf beyond 65504, so
# their sums are inf and the figure is lost (the codes themselves are right).
LOST_ERROR = ("not measured: values beyond float16's range overflowed the reference of the cachetune that wrote "
              "this store (its codes are right; extract or compact it again for the figure)")


def bytes_on_disk(path) -> int:
    """Bytes of every object under the store: files of a local folder, objects under an s3:// prefix, ..."""
    fs, fs_path = store_fs(os.fspath(path))
    return int(fs.du(fs_path, total=True))


def describe_store(path: str) -> dict:
    check_reachable(path)
    try:
        root = zarr.open_group(path, mode="r", zarr_format=3)
    except Exception:
        raise InputError(f"no cache at {path}; give the path of a store written by `pipeline extract`") from None
    attrs = dict(root.attrs)
    if "key" not in attrs:
        raise InputError(f"{path} is a zarr group but not a cachetune store (no validity key)")
    layers = attrs.get("layers", [])
    splits, tokens, error = {}, 0, np.zeros(2)
    for name in sorted(root.group_keys()):
        group = root[name]
        if not group.attrs.get("ready"):
            continue
        lengths = group["length"][:]
        done = group["done"][:]
        splits[name] = {"samples": len(lengths), "tokens": int(lengths.sum()), "blocks_done": int(done.sum()),
                        "blocks": len(done)}
        tokens += int(lengths.sum())
        if "encode_error" in group:  # compact stores: squared error and squared norm of the values, per done block
            error += group["encode_error"][:][done.astype(bool)].sum(0)
    samples = sum(s["samples"] for s in splits.values())
    padded_fp32 = samples * attrs.get("max_length", 0) * attrs.get("hidden_size", 0) * 4 * len(layers)
    on_disk = bytes_on_disk(path)
    first = next((root[s][layer_array_name(layers[0])] for s in splits), None) if layers else None
    return {
        "path": os.fspath(path), "status": attrs.get("status"), "backbone": attrs.get("backbone_path"),
        "model_type": attrs.get("model_type"), "hidden_size": attrs.get("hidden_size"),
        "num_layers": attrs.get("num_layers"), "layers": layers, "dtype": attrs.get("dtype"),
        "codec": attrs.get("codec"), "lossy": attrs.get("lossy"), "max_length": attrs.get("max_length"),
        "pooling": attrs.get("pooling"), "task": attrs.get("task"), "label_names": attrs.get("label_names"),
        "splits": splits, "real_tokens": tokens, "bytes_on_disk": on_disk, "bytes_padded_fp32": padded_fp32,
        "ratio_to_padded_fp32": on_disk / padded_fp32 if padded_fp32 else None,
        "codecs": [codec_name(c) for c in (first.filters + first.compressors)] if first is not None else [],
        "key_sha256": attrs.get("key_sha256"), "encoding": attrs.get("encoding"),
        "derived_from": attrs.get("derived_from"), "split_seed": attrs.get("key", {}).get("split_seed"),
        "sample": attrs.get("key", {}).get("sample"),  # extract --max-samples: {"rows", "of", "seed"}
        "bytes_per_token_layer": on_disk / (tokens * len(layers)) if tokens and layers else None,
        # ||x_hat - x||_F / ||x||_F over sampled real tokens of every done block, x the values before encoding
        "relative_error": float(np.sqrt(error[0] / error[1])) if np.isfinite(error).all() and error[1] else None,
        "relative_error_note": None if np.isfinite(error).all() else LOST_ERROR,
        "modality": attrs["key"].get("modality", "text"), "image_size": attrs["key"].get("image_size"),
        "bytes_per_sample": on_disk / samples if samples else None,
        "truncation": attrs.get("truncation"),  # what --max-length cut (stages/extraction/tokenizing.py); text only
    }


def codec_name(codec) -> str:
    """'blosc lz4 (shuffle, level 5)' for a Blosc codec (the compressor inside is what matters), 'crc32c checksum',
    else the class name; the inverse of cache/layout.py's codec lists."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    if isinstance(codec, BloscCodec):
        value = lambda x: getattr(x, "value", x)  # noqa: E731  (zarr keeps cname and shuffle as enums)
        return f"blosc {value(codec.cname)} ({value(codec.shuffle)}, level {codec.clevel})"
    return "crc32c checksum" if isinstance(codec, Crc32cCodec) else type(codec).__name__


def _block_moments(codes: np.ndarray, scales: np.ndarray | None = None, *, used: np.ndarray, decode,
                   block_id=None) -> np.ndarray:
    """[1, 5] for one block: values, mean, sum of squared deviations, max |x|, count of |x| > float16 max, of
    the decoded values of the block's used rows only (the padding gap at its end is left out)."""
    rows = int(used[block_id[0]])
    if rows == 0:
        return np.zeros((1, 5))
    values = decode(codes[:rows], None if scales is None else scales[:rows]).astype(np.float64)
    mean = values.mean()
    magnitude = np.abs(values)
    return np.array([[values.size, mean, np.square(values - mean).sum(), magnitude.max(),
                      np.count_nonzero(magnitude > FLOAT16_MAX)]])


def _layer_decoder(decoder: Decoder, position: int, name: str):
    """codes [rows, W] (scales [rows, G] or None) of the layer at `position` -> float32 values [rows, D], decoded
    as the reader's batches are; damaged scales are an InputError naming the array `name`."""
    def decode(codes: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
        if scales is not None:
            check_scales(scales, name)
            scales = torch.from_numpy(np.array(scales))[None, None]
        codes = torch.from_numpy(np.array(codes))[None, None]  # [1, 1, rows, W]; a copy: dask's blocks may be read-only
        mask = torch.ones(1, codes.shape[2], dtype=torch.bool)
        return decoder.decode(codes, scales, mask, [position])[0, 0].numpy()
    return decode


def layer_stats(path: str) -> list[dict]:
    """Per cached layer, over the real tokens of every done block of every split: mean, std (population),
    max |x| and the fraction of values with |x| > 65504 (they would overflow float16; meaningful for float32
    and 8-bit stores), of the values as training sees them: an 8-bit or projected store's codes are decoded
    first. Read with dask straight from the store, one task per block; nothing is loaded whole.
    Raises InputError: no store at `path`, damaged scales, a missing projection basis."""
    import dask
    import dask.array as da

    try:
        root = zarr.open_group(path, mode="r", zarr_format=3)
    except Exception:
        raise InputError(f"no cache at {path}; give the path of a store written by `pipeline extract`") from None
    layers = list(root.attrs.get("layers", []))
    encoding = Encoding.of_store(root.attrs)
    decoder = Decoder(encoding, read_projections(root, layers) if encoding.reduce else {}, layers)
    moments = {layer: [] for layer in layers}
    for name in sorted(root.group_keys()):
        group = root[name]
        if not group.attrs.get("ready"):
            continue
        block_tokens = int(group.attrs["block_tokens"])
        done = group["done"][:].astype(bool)
        lengths, starts = group["length"][:].astype(np.int64), group["token_start"][:]
        for position, layer in enumerate(layers):
            arrays = [group[layer_array_name(layer)]] + ([group[scale_array_name(layer)]] if encoding.eight_bit else [])
            blocks = arrays[0].shape[0] // block_tokens
            # Real tokens are packed from each block's first row: count them per block (0 where not done yet).
            used = np.bincount(starts // block_tokens, weights=lengths, minlength=blocks).astype(np.int64)
            used[np.flatnonzero(~done)] = 0
            blocked = [da.from_zarr(array, chunks=(block_tokens, array.shape[1])) for array in arrays]
            moments[layer].append(da.map_blocks(_block_moments, *blocked, used=used,
                                                decode=_layer_decoder(decoder, position, arrays[-1].path),
                                                dtype=np.float64, chunks=((1,) * blocks, (5,))))
    computed = dask.compute(moments)[0]
    rows = []
    for layer in layers:
        parts = np.concatenate(computed[layer]) if computed[layer] else np.zeros((0, 5))
        counts, means = parts[:, 0], parts[:, 1]
        total = counts.sum()
        row = {"layer": layer, "tokens": int(total // root.attrs.get("hidden_size", 1)), "mean": None, "std": None, "max_abs": None,
               "fp16_overflow_fraction": None}
        if total:
            mean = (counts * means).sum() / total
            squared = parts[:, 2].sum() + (counts * np.square(means - mean)).sum()  # pooled over blocks (Chan et al.)
            row.update(mean=float(mean), std=float(np.sqrt(squared / total)), max_abs=float(parts[:, 3].max()),
                       fp16_overflow_fraction=float(parts[:, 4].sum() / total))
        rows.append(row)
    return rows
