"""Stage one: run the frozen backbone once over every split and write per-layer features to the store.

Text: tokenized up front, padded per batch; only real tokens are stored. Images: decoded and run through the
backbone's image processor per batch (never all at once); every image gives the same tokens (patches plus CLS,
plus DeiT's distillation token), so the mask is all ones and `max_length` in the key is that token count.
"""
from __future__ import annotations

import hashlib
import json
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


def image_processor_sha256(processor) -> str:
    facts = [type(processor).__name__, processor.to_dict()]
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def preprocessor_sha256(backbone: Backbone) -> str:
    if backbone.modality == "image":
        return image_processor_sha256(backbone.image_processor)
    return tokenizer_sha256(backbone.tokenizer)


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


def cache_key(backbone: Backbone, dataset, layers: list[int], settings: ExtractSettings, max_length: int | None = None) -> dict:
    """Everything that changes the stored numbers; a store is reused only when this matches.

    `tokenizer_sha256` hashes the preprocessor: the tokenizer, or for images the image processor (the field keeps
    its name so text keys stay as they were and `evaluate`'s check covers both). Image keys add `modality` and
    hold the per-image token count as `max_length`.
    """
    key = {
        "format_version": FORMAT_VERSION,
        "backbone_weights_sha256": backbone.weights_sha256,
        "model_type": backbone.model.config.model_type,
        "tokenizer_sha256": preprocessor_sha256(backbone),
        "max_length": settings.max_length if max_length is None else max_length,
        "layers": layers,
        "dtype": settings.dtype,
        "codec": settings.codec,
        "lossy": settings.lossy,
        "data_fingerprint": dataset.fingerprint(),
        "split_seed": dataset.split_seed,
        "block_tokens": settings.block_tokens,
        "chunk_tokens": settings.chunk_tokens,
    }
    if backbone.modality != "text":
        key["modality"] = backbone.modality
    return key


def tokenize(tokenizer, dataset, rows: np.ndarray, max_length: int) -> dict[str, list]:
    texts = [dataset.texts[i] for i in rows]
    pairs = [dataset.pairs[i] for i in rows] if dataset.pairs else None
    return tokenizer(texts, pairs, truncation=True, max_length=max_length)


def image_mode(backbone: Backbone) -> str:
    """PIL mode the processor gets: RGB (grayscale converted) unless the model takes one channel."""
    return "L" if getattr(backbone.model.config, "num_channels", 3) == 1 else "RGB"


def pixel_values(backbone: Backbone, dataset, rows) -> torch.Tensor:
    """Decode images `rows` of the dataset and run the backbone's image processor on them: [B, C, H, W]."""
    mode = image_mode(backbone)
    images = [dataset.images.load(int(row), mode) for row in rows]
    try:
        return backbone.image_processor(images=images, return_tensors="pt")["pixel_values"]
    except InputError:
        raise
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"the image processor of {backbone.path} failed: {message}") from None


def image_tokens(model, backbone: Backbone, dataset, device: str) -> int:
    """Tokens per image (patches + CLS (+ distillation token)), from one forward pass on the first image."""
    with torch.inference_mode():
        hidden = model(pixel_values=pixel_values(backbone, dataset, [0]).to(device), output_hidden_states=True).hidden_states
    return int(hidden[0].shape[1])


def _check_modality(backbone: Backbone, dataset) -> None:
    data_modality = getattr(dataset, "modality", "text")
    if data_modality != backbone.modality:
        raise InputError(f"the data {dataset.name!r} is {data_modality} but the backbone at {backbone.path} is a "
                         f"{backbone.modality} model; pick a {data_modality} backbone")


@dataclass
class SplitWork:
    """One split's pending blocks and what a forward pass over them needs (built by `extract`, run by a runner).

    Text: `encoded` holds the split's tokenized samples (by split position). Images: `rows` maps split
    positions to dataset rows and `dataset.images` decodes them; `tokens_per_image` is fixed.
    """

    split: str
    plan: object  # cache.layout.BlockPlan
    pending: list[int]
    layers: list[int]
    writer: object  # cache.writer.SplitWriter
    settings: ExtractSettings
    hidden_size: int
    modality: str
    encoded: dict | None = None
    dataset: object = None
    rows: np.ndarray | None = None
    tokens_per_image: int | None = None

    @property
    def pending_samples(self) -> int:
        return sum(len(self.plan.block_samples[b]) for b in self.pending)


def extract(backbone: Backbone, dataset, settings: ExtractSettings, log=print, run_split=None) -> str:
    """Writes or resumes the store; returns 'complete' (was up to date) or 'written'.

    run_split: runs one split's pending blocks (a `SplitWork`) somewhere else, e.g. on a dask cluster
    (stages/distributed_extract.py); by default they run here. The backbone here then only hashes,
    tokenizes and (for images) counts tokens, on the CPU.
    """
    validate_settings(settings)
    _check_modality(backbone, dataset)
    layers = parse_layers(settings.layers, backbone.num_layers)
    device = settings.device if run_split is None else "cpu"
    model = backbone.model.to(device)
    tokens_per_image = None
    if backbone.modality == "image":
        if len(dataset) == 0:
            raise InputError(f"the data {dataset.name!r} has no images")
        tokens_per_image = image_tokens(model, backbone, dataset, device)
        if tokens_per_image > settings.block_tokens:
            raise InputError(f"an image gives {tokens_per_image} tokens, more than --block-tokens {settings.block_tokens}; "
                             "raise --block-tokens")
    key = cache_key(backbone, dataset, layers, settings, tokens_per_image)
    root, state = open_store_for_write(settings.out, key, settings.overwrite)
    if state == "complete":
        return "complete"
    if state == "resume":
        log(f"resuming the unfinished store at {settings.out}")
    root.attrs.update({
        "backbone_path": str(Path(backbone.path).resolve()), "model_type": backbone.model.config.model_type,
        "hidden_size": backbone.hidden_size, "num_layers": backbone.num_layers, "layers": layers,
        "pooling": backbone.pooling, "task": dataset.task, "label_names": dataset.label_names,
        "dataset": dataset.name, "max_length": key["max_length"], "dtype": settings.dtype,
        "codec": settings.codec, "lossy": settings.lossy, "modality": backbone.modality,
    })
    filters, compressors = codec_pipeline(settings.codec, settings.lossy)
    if backbone.modality == "text":
        backbone.tokenizer.padding_side = "right"
    for split in SPLITS:
        rows = dataset.rows(split)
        if len(rows) == 0:
            continue
        encoded = None
        if backbone.modality == "image":
            lengths = np.full(len(rows), tokens_per_image, dtype=np.int32)
        else:
            encoded = tokenize(backbone.tokenizer, dataset, rows, settings.max_length)
            lengths = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int32)
        plan = plan_blocks(lengths, settings.block_tokens)
        meta = {"row": rows.astype(np.int64), "length": lengths, "label": dataset.labels[rows]}
        writer = prepare_split(root, split, plan, meta, layers, backbone.hidden_size, settings.dtype,
                               settings.chunk_tokens, filters, compressors)
        work = SplitWork(split, plan, writer.pending_blocks(), layers, writer, settings, backbone.hidden_size,
                         backbone.modality, encoded, dataset, rows, tokens_per_image)
        if not work.pending:
            continue
        if run_split is not None:
            run_split(work)
            continue
        forward = split_forward(backbone, model, work, settings.device)
        _run_blocks(forward, work, progress_bar(total=work.pending_samples, desc=f"extract {split}", unit="sample"))
    root.attrs["status"] = "complete"
    return "written"


def split_forward(backbone: Backbone, model, work: SplitWork, device: str):
    """The forward function of a split: batch samples (split positions) -> (hidden_states, mask [B, T] bool)."""
    if work.modality == "image":
        return _image_forward(model, backbone, work.dataset, work.rows, work.tokens_per_image, device)
    return _text_forward(model, backbone.tokenizer, work.encoded, device)


def _text_forward(model, tokenizer, encoded, device):
    """batch samples (split positions) -> (hidden_states, mask [B, T] bool)."""

    def forward(batch_samples):
        features = [{name: values[int(i)] for name, values in encoded.items()} for i in batch_samples]
        batch = tokenizer.pad(features, return_tensors="pt").to(device)
        hidden = model(**batch, output_hidden_states=True).hidden_states
        return hidden, batch["attention_mask"].bool()

    return forward


def _image_forward(model, backbone, dataset, rows, tokens_per_image, device):
    """batch samples (split positions) -> (hidden_states, all-ones mask): images decoded per batch only."""

    def forward(batch_samples):
        pixels = pixel_values(backbone, dataset, [rows[int(i)] for i in batch_samples]).to(device)
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        if hidden[0].shape[1] != tokens_per_image:
            raise InputError(f"images give {hidden[0].shape[1]} tokens here but {tokens_per_image} for the first image; "
                             "the image processor must resize every image to one size")
        return hidden, torch.ones(hidden[0].shape[:2], dtype=torch.bool, device=hidden[0].device)

    return forward


def block_features(forward, samples: np.ndarray, layers: list[int], block_tokens: int, hidden_size: int,
                   dtype: str, batch_size: int, on_batch=None) -> np.ndarray:
    """One block's [K, block_tokens, D] buffer: its samples (longest first, the plan's order) run in forward
    batches of `batch_size`, their real tokens packed in that order, zeros in the unused tail.

    The one place a block's features are made: the single-process loop and every distributed worker use it,
    so both write the same bytes. on_batch(n) is called after each batch of n samples.
    """
    numpy_dtype = np.float16 if dtype == "float16" else np.float32
    buffer = np.zeros((len(layers), block_tokens, hidden_size), dtype=numpy_dtype)
    cursor = 0
    for first in range(0, len(samples), batch_size):
        batch_samples = samples[first:first + batch_size]
        with torch.inference_mode():
            hidden, mask = forward(batch_samples)
        tokens = torch.stack([hidden[i][mask] for i in layers]).cpu().numpy().astype(numpy_dtype)
        if not np.isfinite(tokens).all():
            raise InputError(f"features overflow {dtype} (inf or nan); extract with --dtype float32")
        buffer[:, cursor:cursor + tokens.shape[1]] = tokens
        cursor += tokens.shape[1]
        if on_batch is not None:
            on_batch(len(batch_samples))
    return buffer


def _run_blocks(forward, work: SplitWork, progress) -> None:
    """Runs a split's pending blocks in this process; writes overlap the next block's forward passes."""
    settings, plan = work.settings, work.plan
    background = BackgroundWriter()
    started = time.perf_counter()
    try:
        for block in work.pending:
            buffer = block_features(forward, plan.block_samples[block], work.layers, plan.block_tokens,
                                    work.hidden_size, settings.dtype, settings.batch_size, progress.update)
            background.submit(work.writer.write_block, block, buffer)
        background.close()
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    if elapsed > 0 and progress.n:
        progress.write(f"{progress.n} samples in {elapsed:.1f} s ({progress.n / elapsed:.1f} samples/s)")
