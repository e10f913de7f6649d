"""What a store holds, and how big it is against the same data padded in float32."""
from __future__ import annotations

import os
from pathlib import Path

import zarr

from .errors import InputError
from .layout import layer_array_name


def bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe_store(path: str) -> dict:
    try:
        root = zarr.open_group(path, mode="r", zarr_format=3)
    except Exception:
        raise InputError(f"no cache at {path}; give the path of a store written by `pipeline extract`") from None
    attrs = dict(root.attrs)
    if "key" not in attrs:
        raise InputError(f"{path} is a zarr group but not a cachetune store (no validity key)")
    layers = attrs.get("layers", [])
    splits, tokens = {}, 0
    for name in sorted(root.group_keys()):
        group = root[name]
        if not group.attrs.get("ready"):
            continue
        lengths = group["length"][:]
        done = group["done"][:]
        splits[name] = {"samples": len(lengths), "tokens": int(lengths.sum()), "blocks_done": int(done.sum()),
                        "blocks": len(done)}
        tokens += int(lengths.sum())
    samples = sum(s["samples"] for s in splits.values())
    padded_fp32 = samples * attrs.get("max_length", 0) * attrs.get("hidden_size", 0) * 4 * len(layers)
    on_disk = bytes_on_disk(Path(path))
    first = next((root[s][layer_array_name(layers[0])] for s in splits), None) if layers else None
    return {
        "path": os.fspath(path), "status": attrs.get("status"), "backbone": attrs.get("backbone_path"),
        "model_type": attrs.get("model_type"), "hidden_size": attrs.get("hidden_size"),
        "num_layers": attrs.get("num_layers"), "layers": layers, "dtype": attrs.get("dtype"),
        "codec": attrs.get("codec"), "lossy": attrs.get("lossy"), "max_length": attrs.get("max_length"),
        "pooling": attrs.get("pooling"), "task": attrs.get("task"), "label_names": attrs.get("label_names"),
        "splits": splits, "real_tokens": tokens, "bytes_on_disk": on_disk, "bytes_padded_fp32": padded_fp32,
        "ratio_to_padded_fp32": on_disk / padded_fp32 if padded_fp32 else None,
        "codecs": [type(c).__name__ for c in (first.filters + first.compressors)] if first is not None else [],
        "key_sha256": attrs.get("key_sha256"),
    }
