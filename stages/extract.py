"""Stage one: run the frozen backbone once over every split and write per-layer features to the store."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache.errors import InputError
from cache.layout import FORMAT_VERSION, codec_pipeline, parse_lossy, plan_blocks
from cache.writer import BackgroundWriter, open_store_for_write, prepare_split

from .backbones import Backbone
from .layer_selection import parse_layers
from .progress import progress_bar

SPLITS = ("train", "validation", "test")


@dataclass
class ExtractSettings:
    out: str
    layers: str = "all"
    max_length: int = 128
    batch_size: int = 32
    dtype: str = "float16"
    codec: str = "lz4"
    lossy: str | None = None
    overwrite: bool = False
    block_tokens: int = 8192  # tokens per block = per shard
    chunk_tokens: int = 1024  # tokens per compressed chunk inside a shard
    device: str = "cpu"


def tokenizer_sha256(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    facts = [type(tokenizer).__name__, vocab, tokenizer.all_special_tokens, getattr(tokenizer, "do_lower_case", None)]
    return hashlib.sha256(repr(facts).encode()).hexdigest()


def validate_settings(settings: ExtractSettings) -> None:
    if settings.dtype not in ("float16", "float32"):
        raise InputError(f"--dtype {settings.dtype}: use float16 or float32")
    if settings.max_length < 2 or settings.batch_size < 1:
        raise InputError("--max-length must be at least 2 and --batch-size at least 1")
    if settings.block_tokens % settings.chunk_tokens or settings.block_tokens < settings.max_length:
        raise InputError("block tokens must be a multiple of chunk tokens and at least --max-length")
    try:
        codec_pipeline(settings.codec, settings.lossy)
        if settings.lossy:
            parse_lossy(settings.lossy)
    except ValueError as error:
        raise InputError(str(error)) from None


def cache_key(backbone: Backbone, dataset, layers: list[int], settings: ExtractSettings) -> dict:
    """Everything that changes the stored numbers; a store is reused only when this matches."""
    return {
        "format_version": FORMAT_VERSION,
        "backbone_weights_sha256": backbone.weights_sha256,
        "model_type": backbone.model.config.model_type,
        "tokenizer_sha256": tokenizer_sha256(backbone.tokenizer),
        "max_length": settings.max_length,
        "layers": layers,
        "dtype": settings.dtype,
        "codec": settings.codec,
        "lossy": settings.lossy,
        "data_fingerprint": dataset.fingerprint(),
        "split_seed": dataset.split_seed,
        "block_tokens": settings.block_tokens,
        "chunk_tokens": settings.chunk_tokens,
    }


def tokenize(tokenizer, dataset, rows: np.ndarray, max_length: int) -> dict[str, list]:
    texts = [dataset.texts[i] for i in rows]
    pairs = [dataset.pairs[i] for i in rows] if dataset.pairs else None
    return tokenizer(texts, pairs, truncation=True, max_length=max_length)


def extract(backbone: Backbone, dataset, settings: ExtractSettings, log=print) -> str:
    """Writes or resumes the store; returns 'complete' (was up to date) or 'written'."""
    validate_settings(settings)
    layers = parse_layers(settings.layers, backbone.num_layers)
    key = cache_key(backbone, dataset, layers, settings)
    root, state = open_store_for_write(settings.out, key, settings.overwrite)
    if state == "complete":
        return "complete"
    if state == "resume":
        log(f"resuming the unfinished store at {settings.out}")
    root.attrs.update({
        "backbone_path": str(Path(backbone.path).resolve()), "model_type": backbone.model.config.model_type,
        "hidden_size": backbone.hidden_size, "num_layers": backbone.num_layers, "layers": layers,
        "pooling": backbone.pooling, "task": dataset.task, "label_names": dataset.label_names,
        "dataset": dataset.name, "max_length": settings.max_length, "dtype": settings.dtype,
        "codec": settings.codec, "lossy": settings.lossy,
    })
    filters, compressors = codec_pipeline(settings.codec, settings.lossy)
    model = backbone.model.to(settings.device)
    backbone.tokenizer.padding_side = "right"
    for split in SPLITS:
        rows = dataset.rows(split)
        if len(rows) == 0:
            continue
        encoded = tokenize(backbone.tokenizer, dataset, rows, settings.max_length)
        lengths = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int32)
        plan = plan_blocks(lengths, settings.block_tokens)
        meta = {"row": rows.astype(np.int64), "length": lengths, "label": dataset.labels[rows]}
        writer = prepare_split(root, split, plan, meta, layers, backbone.hidden_size, settings.dtype,
                               settings.chunk_tokens, filters, compressors)
        pending = writer.pending_blocks()
        todo = sum(len(plan.block_samples[b]) for b in pending)
        _run_blocks(model, backbone.tokenizer, encoded, plan, pending, layers, writer, settings,
                    progress_bar(total=todo, desc=f"extract {split}", unit="sample"))
    root.attrs["status"] = "complete"
    return "written"


def _run_blocks(model, tokenizer, encoded, plan, pending, layers, writer, settings, progress) -> None:
    dtype = np.float16 if settings.dtype == "float16" else np.float32
    background = BackgroundWriter()
    started = time.perf_counter()
    try:
        for block in pending:
            samples = plan.block_samples[block]  # longest first
            buffer = np.zeros((len(layers), plan.block_tokens, model.config.hidden_size), dtype=dtype)
            cursor = 0
            for first in range(0, len(samples), settings.batch_size):
                batch_samples = samples[first:first + settings.batch_size]
                features = [{name: values[i] for name, values in encoded.items()} for i in batch_samples]
                batch = tokenizer.pad(features, return_tensors="pt").to(settings.device)
                with torch.inference_mode():
                    hidden = model(**batch, output_hidden_states=True).hidden_states
                mask = batch["attention_mask"].bool()
                tokens = torch.stack([hidden[i][mask] for i in layers]).cpu().numpy().astype(dtype)
                if not np.isfinite(tokens).all():
                    raise InputError(f"features overflow {settings.dtype} (inf or nan); extract with --dtype float32")
                buffer[:, cursor:cursor + tokens.shape[1]] = tokens
                cursor += tokens.shape[1]
                progress.update(len(batch_samples))
            background.submit(writer.write_block, block, buffer)
        background.close()
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    if elapsed > 0 and progress.n:
        progress.write(f"{progress.n} samples in {elapsed:.1f} s ({progress.n / elapsed:.1f} samples/s)")
