"""Stage one: run the frozen backbone once over every split and write per-layer features to the store.

Text: tokenized up front into a packed table (stages/extraction/token_table.py), padded per batch; only real tokens are stored. Images: decoded and run through the
backbone's image processor per batch (never all at once); every image gives the same tokens (patches plus CLS,
plus DeiT's distillation token), so the mask is all ones and `max_length` in the key is that token count.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import queue
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cachetune.cache.encoding import Encoding
from cachetune.cache.errors import InputError
from cachetune.cache.quantize import host_array, one_thread
from cachetune.cache.layout import FORMAT_VERSION, codec_pipeline, plan_blocks
from cachetune.cache.writer import BackgroundWriter, open_store_for_write, prepare_split, writer_threads

from ..backbones import Backbone, causal_position_ids, check_pooling, is_causal
from ..runtime import Runtime, device_kind
from .layer_selection import parse_layers
from ..progress import progress_bar
from .token_table import TokenTable, ranges
from .tokenizing import Truncation, backbone_limit, encode, single_prefix

SPLITS = ("train", "validation", "test")
DEFAULT_BATCH_SIZE = {"cpu": 32, "cuda": 128}


@dataclass
class ExtractSettings:
    out: str
    layers: str = "all"
    max_length: int = 128
    batch_size: int | None = None  # None: DEFAULT_BATCH_SIZE for the device
    dtype: str = "fp8"  # the CLI's default (BENCHMARKS.md, "Compact caches")
    codec: str = "lz4"
    lossy: str | None = None
    overwrite: bool = False
    block_tokens: int = 8192  # tokens per block = per shard
    sort_tokens: int = 32768  # forward batches are length-sorted across consecutive blocks of this many tokens
    chunk_tokens: int = 1024  # tokens per compressed chunk inside a shard
    device: str = "auto"  # auto (a GPU when there is one) | cpu | cuda | cuda:N: stages/runtime.py decides
    precision: str = "fp32"  # the forward pass: fp32, or autocast to bf16 / fp16 (part of the store's key)
    pooling: str | None = None  # what stage two pools by: cls | mean | last; None: the backbone family's default

    def __post_init__(self):
        if self.batch_size is None:
            self.batch_size = DEFAULT_BATCH_SIZE[device_kind(self.device)]

    def runtime(self) -> Runtime:
        """Where the forward passes run and in what precision (InputError, one line, for a bad or absent device)."""
        return Runtime.resolve(self.device, self.precision)


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
    Encoding(settings.dtype)  # an InputError naming the choices for an unknown --dtype
    if settings.max_length < 2 or settings.batch_size < 1:
        raise InputError("--max-length must be at least 2 and --batch-size at least 1")
    settings.runtime()  # a bad --device (tpu9, cuda without a GPU, cuda:7 on a 2-GPU machine) is one line here
    if settings.sort_tokens < 1:
        raise InputError("--sort-tokens must be at least 1")
    if settings.chunk_tokens < 1 or settings.block_tokens < 1:
        raise InputError("--block-tokens and --chunk-tokens must be at least 1")
    if settings.block_tokens % settings.chunk_tokens:
        raise InputError(f"--block-tokens {settings.block_tokens} is not a multiple of --chunk-tokens "
                         f"{settings.chunk_tokens}; use --block-tokens {round_up(settings.block_tokens, settings.chunk_tokens)}")
    try:
        codec_pipeline(settings.codec, settings.lossy)  # --lossy: removed, the error names the replacement
    except ValueError as error:
        raise InputError(str(error)) from None


def round_up(count: int, step: int) -> int:
    """The smallest multiple of `step` that is at least `count`."""
    return -(-count // step) * step


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
    key.update(Encoding(settings.dtype).key_fields())  # nothing for float16/float32: their keys stay as they were
    if dataset.sample:  # extract --max-samples; absent for the whole data, as before the option
        key["sample"] = dataset.sample
    if backbone.modality == "text" and single_prefix(backbone.tokenizer, dataset.texts)[1]:
        key["single_prefix"] = True  # texts that start with the tokenizer's BOS/CLS string: now given it once
    if backbone.modality != "text":
        key["modality"] = backbone.modality
    if dataset.images is not None and dataset.images.paths is not None:
        key["image_decode"] = "as viewers show them"  # stages/image_decode.py: a store of Pillow's raw decode is not reused
    if getattr(backbone, "image_size", None):  # absent: the processor's own size (stores made before --image-size)
        key["image_size"] = backbone.image_size
    if settings.precision != "fp32":  # absent means fp32: stores made before the option keep their key
        key["precision"] = settings.precision
    pooling = settings.pooling or backbone.pooling
    if backbone.causal or pooling != backbone.pooling:  # absent means the encoder family's default, as before
        key["pooling"] = pooling
    return key


def tokenize(tokenizer, dataset, rows: np.ndarray, max_length: int) -> tuple[dict[str, list], np.ndarray]:
    """(the tokenizer's output for these rows, cut at max_length; [N] tokens of each before the cut): see
    stages/extraction/tokenizing.py."""
    texts = [dataset.texts[i] for i in rows]
    pairs = [dataset.pairs[i] for i in rows] if dataset.pairs else None
    return encode(tokenizer, texts, pairs, max_length)


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


def check_modality(backbone: Backbone, dataset) -> None:
    data_modality = getattr(dataset, "modality", "text")
    if data_modality != backbone.modality:
        raise InputError(f"the data {dataset.name!r} is {data_modality} but the backbone at {backbone.path} is "
                         f"{'an image' if backbone.modality == 'image' else 'a text'} model; pick "
                         f"{'an image' if data_modality == 'image' else 'a text'} backbone")


@dataclass
class SplitWork:
    """One split's pending blocks and what a forward pass over them needs (built by `extract`, run by a runner).

    Text: `encoded` holds the split's tokenized samples (a TokenTable, by split position). Images: `rows` maps split
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
    encoded: TokenTable | None = None
    dataset: object = None
    rows: np.ndarray | None = None
    tokens_per_image: int | None = None
    lengths: np.ndarray | None = None  # real tokens per sample (by split position)

    @property
    def pending_samples(self) -> int:
        return sum(len(self.plan.block_samples[b]) for b in self.pending)


def extract(backbone: Backbone, dataset, settings: ExtractSettings, log=print, run_split=None) -> str:
    """Writes or resumes the store; returns 'complete' (was up to date) or 'written'.

    run_split: runs one split's pending blocks (a `SplitWork`) somewhere else, e.g. on a dask cluster
    (stages/extraction/distributed_extract.py); by default they run here. The backbone here then only hashes,
    tokenizes and (for images) counts tokens, on the CPU.
    """
    started = time.perf_counter()
    validate_settings(settings)
    check_modality(backbone, dataset)
    if backbone.modality == "text":
        from .preflight import check_block_tokens

        check_block_tokens(backbone, settings)
    if settings.pooling is not None:
        check_pooling(backbone, settings.pooling, log)
    layers = parse_layers(settings.layers, backbone.num_layers, backbone.hidden_size)
    runtime = settings.runtime() if run_split is None else Runtime.resolve("cpu", "fp32")
    device = runtime.device
    if run_split is None:
        from .host_memory import check_host_memory

        check_host_memory(settings, backbone, dataset, device)
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
        "pooling": settings.pooling or backbone.pooling, "task": dataset.task, "label_names": dataset.label_names,
        "dataset": dataset.name, "max_length": key["max_length"], "dtype": settings.dtype,
        "codec": settings.codec, "lossy": settings.lossy, "modality": backbone.modality,
        "encoding": Encoding(settings.dtype).attrs(backbone.hidden_size),
    })
    filters, compressors = codec_pipeline(settings.codec, settings.lossy)
    truncation = Truncation(settings.max_length, backbone_limit(backbone)) if backbone.modality == "text" else None
    works = []  # every split tokenized first, so what --max-length cut is said before the forward passes
    for split in SPLITS:
        rows = dataset.rows(split)
        if len(rows) == 0:
            continue
        encoded = None
        if backbone.modality == "image":
            lengths = np.full(len(rows), tokens_per_image, dtype=np.int32)
        else:
            tokens, full_lengths = tokenize(backbone.tokenizer, dataset, rows, settings.max_length)
            truncation.add(full_lengths)
            encoded = TokenTable.from_encoded(tokens, backbone.tokenizer)
            del tokens
            lengths = encoded.lengths.astype(np.int32)
        plan = plan_blocks(lengths, settings.block_tokens)
        meta = {"row": dataset.data_row(rows).astype(np.int64), "length": lengths, "label": dataset.labels[rows]}
        writer = prepare_split(root, split, plan, meta, layers, backbone.hidden_size, settings.dtype,
                               settings.chunk_tokens, filters, compressors)
        work = SplitWork(split, plan, writer.pending_blocks(), layers, writer, settings, backbone.hidden_size,
                         backbone.modality, encoded, dataset, rows, tokens_per_image, lengths)
        if work.pending:
            works.append(work)
    if truncation is not None:
        root.attrs["truncation"] = dataclasses.asdict(truncation)
        if truncation.line():
            log(truncation.line())
    writes = None
    while works:
        work = works.pop(0)  # a split's token table is let go once its blocks are run
        if run_split is not None:
            run_split(work)
            continue
        if writes is None:
            writes = Writes(settings, len(layers), backbone.hidden_size, runtime)
        forward = split_forward(backbone, model, work, runtime)
        _run_blocks(forward, work, progress_bar(total=work.pending_samples, desc=f"extract {work.split}", unit="sample"),
                    writes)
    if writes is not None:
        writes.background.close()  # every split's writes, then `complete`
    # wall seconds of every run that wrote this store (a resumed one adds its own): the report's amortised cost
    root.attrs.update({"extract_seconds": root.attrs.get("extract_seconds", 0.0) + time.perf_counter() - started,
                       "status": "complete"})
    return "written"


def split_forward(backbone: Backbone, model, work: SplitWork, runtime: Runtime):
    """The forward function of a split: batch samples (split positions) -> (hidden_states, real tokens per row)."""
    if work.modality == "image":
        return image_forward(model, backbone, work.dataset, work.rows, work.tokens_per_image, runtime)
    return text_forward(model, work.encoded, runtime)


def text_forward(model, table: TokenTable, runtime: Runtime):
    """batch samples (split positions) -> (hidden_states, real tokens per row, column of each row's first real token).

    Padding is on the tokenizer's side. A causal decoder gets position ids counted over real tokens
    (causal_position_ids), so every sample's hidden states are the same whatever its batch, padding side and length
    sort; its own causal mask combined with the attention mask keeps real tokens from seeing padding. The inputs
    cross pinned and without blocking (runtime.to_device), so the next batch's CPU work overlaps the copy."""
    causal = is_causal(model.config)

    def forward(batch_samples):
        inputs, lengths = table.batch(batch_samples)
        if causal:
            inputs["position_ids"] = causal_position_ids(inputs["attention_mask"])
        with runtime.autocast():
            hidden = model(**{name: runtime.to_device(t) for name, t in inputs.items()}, output_hidden_states=True)
        return hidden.hidden_states, lengths, table.first_real(lengths, inputs["attention_mask"].shape[1])

    return forward


def image_forward(model, backbone, dataset, rows, tokens_per_image, runtime: Runtime):
    """batch samples (split positions) -> (hidden_states, real tokens per row: all of them, first real column: 0),
    images decoded per batch."""

    def forward(batch_samples):
        pixels = runtime.to_device(pixel_values(backbone, dataset, [rows[int(i)] for i in batch_samples]))
        with runtime.autocast():
            hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        if hidden[0].shape[1] != tokens_per_image:
            raise InputError(f"images give {hidden[0].shape[1]} tokens here but {tokens_per_image} for the first image; "
                             "the image processor must resize every image to one size")
        return hidden, np.full(len(batch_samples), tokens_per_image, dtype=np.int64), np.zeros(len(batch_samples), np.int64)

    return forward


# The host buffers' dtype; the writer threads encode 8-bit stores from them (cache/quantize.py). fp8 from bfloat16:
# float32's range (outliers beyond float16's 65504 still encode) in half its bytes, and a significand 4 bits finer
# than e4m3's (on real SmolLM2-135M and MiniLM blocks the relative error rose 0.2-0.3%, e.g. 0.00730 -> 0.00747).
# int8 from float32: its 127 levels per group feel bfloat16's rounding more (the same blocks: +2-3%).
CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int8": torch.float32, "fp8": torch.bfloat16}


def block_buffer(layers: int, block_tokens: int, hidden_size: int, dtype: str, device) -> torch.Tensor:
    """A block's host buffer [K, block_tokens, D]; pinned when the features come from a GPU."""
    return torch.empty((layers, block_tokens, hidden_size), dtype=CACHE_DTYPES[dtype],
                       pin_memory=torch.device(device).type == "cuda")


@dataclass
class PendingBlock:
    """A block whose copies to the host may still be running (GPU); `result()` waits for them and checks them."""

    buffer: torch.Tensor
    bounds: torch.Tensor | None  # [K, 2] per layer: min and max as the model gave them (on the host; pinned on a GPU)
    copied: object = None  # torch.cuda.Event recorded on the copy stream after the block's last copy
    layers: tuple[int, ...] = ()  # hidden_states index of each of the K layers

    def result(self) -> np.ndarray:
        if self.copied is not None:
            self.copied.synchronize()  # waits for this block's copies only, never for forward passes queued since
        if self.bounds is not None:
            check_finite(self.bounds, self.buffer.dtype, self.layers)
        return host_array(self.buffer)


def check_finite(bounds: torch.Tensor, store_dtype: torch.dtype, layers) -> None:
    """Raises InputError naming the first layer with inf or nan, and whose fault it is: the model's own output
    (a broken checkpoint, or an fp16/bf16 forward pass) or the cast to a float16 store (an overflow).
    bounds [K, 2]: per layer, the min and max of its features in the forward pass's dtype (nan propagates)."""
    source_ok, stored_ok = torch.isfinite(bounds).all(1), torch.isfinite(bounds.to(store_dtype)).all(1)
    if bool(stored_ok.all()):
        return
    k = int((~stored_ok).nonzero()[0])
    layer = layers[k] if k < len(layers) else k
    if not bool(source_ok[k]):
        forward = str(bounds.dtype).removeprefix("torch.")
        fix = ("use --precision fp32, or check the checkpoint" if bounds.dtype != torch.float32 else
               "the checkpoint's weights (or this input) break the model: check them against the model's own "
               "forward pass; --dtype does not change this")
        raise InputError(f"the backbone itself gives inf or nan at layer {layer} (hidden_states index) in its {forward} "
                         f"forward pass, before anything is stored; {fix}")
    largest = float(bounds[k].abs().max())
    raise InputError(f"layer {layer}'s features overflow {str(store_dtype).removeprefix('torch.')} (max |x| {largest:.4g}, "
                     f"the store's largest is {torch.finfo(store_dtype).max:.6g}); extract with --dtype float32")


class HostCopies:
    """Where a block's device-to-host copies run. On a GPU: a side stream of the features' device, which waits
    for the compute stream's work so far (the gather and cast of this batch) and then copies while the compute
    stream goes on with the next forward pass; each source tensor is recorded on it, so the allocator does not
    hand its memory to the next batch before the copy read it. On the CPU: plain copies, here and now."""

    _streams: dict = {}

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = None
        if device.type == "cuda":
            if device not in HostCopies._streams:
                HostCopies._streams[device] = torch.cuda.Stream(device)
            self.stream = HostCopies._streams[device]

    @contextmanager
    def copying(self, *sources: torch.Tensor):
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for source in sources:
            source.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            yield

    def finish(self, bounds: torch.Tensor | None) -> tuple[torch.Tensor | None, object]:
        """(the group's per-layer bounds on the host, event after the last copy): the bounds cross on the copy
        stream into pinned memory, so the writer checks them without a device-wide sync (reading a GPU tensor would
        wait for every forward pass queued since)."""
        if self.stream is None or bounds is None:
            return bounds, None
        host = torch.empty(bounds.shape, dtype=bounds.dtype, pin_memory=True)
        with self.copying(bounds):
            host.copy_(bounds, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return host, copied


def sort_groups(num_blocks: int, block_tokens: int, sort_tokens: int) -> list[list[int]]:
    """Consecutive blocks whose samples are length-sorted together into forward batches.

    Sorting within one block leaves batches with a wide spread of lengths (11% more tokens than a global sort
    on 2,000 movie snippets, batch 32, 8,192-token blocks; 4.8% over 32,768 tokens). The groups are fixed by
    block number, never by which blocks are pending, so a resumed run (which recomputes a partly done group)
    and every distributed worker form the same batches and write the same bytes."""
    size = max(1, sort_tokens // block_tokens)
    return [list(range(first, min(first + size, num_blocks))) for first in range(0, num_blocks, size)]


def start_group(forward, block_samples: list[np.ndarray], lengths: np.ndarray, layers: list[int],
                buffers: list[torch.Tensor], batch_size: int, on_batch=None,
                runtime: Runtime | None = None) -> list[PendingBlock]:
    """Runs the forward batches of a group of blocks (forward(samples) -> hidden_states, real tokens per row,
    column of each row's first real token) and fills each block's buffer [K, block_tokens, D] with its
    samples' real tokens in the block's layout order (block_samples[i]: longest first), zeros in the unused tail.

    The samples of all the group's blocks are sorted by length together (stable: ties keep the layout order)
    and cut into batches of `batch_size`. Gather, cast and the inf/nan check (min and max) run on the device;
    only real tokens cross to the host, on a side stream without waiting (on a GPU: `HostCopies`), so the next
    forward pass overlaps the copies; nothing here waits for the device. on_batch(samples) is called after each
    batch with the batch's sample positions.
    """
    runtime = runtime or Runtime.resolve("cpu", "fp32")
    copies = HostCopies(runtime.device)
    samples = np.concatenate(block_samples)
    owner = np.repeat(np.arange(len(block_samples)), [len(b) for b in block_samples])
    local_start = np.concatenate([np.cumsum(lengths[b]) - lengths[b] for b in block_samples]).astype(np.int64)
    order = np.argsort(-lengths[samples], kind="stable")
    extremes = []
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        with torch.inference_mode():
            hidden, batch_lengths, first_real = forward(samples[rows])
            width = hidden[0].shape[1]
            # The batch's real tokens (row r's positions first_real[r] ... + batch_lengths[r]) grouped by block,
            # each block's in its layout order, where they form one contiguous run.
            by_block = np.lexsort((local_start[rows], owner[rows]))
            index = runtime.to_device(torch.from_numpy(ranges(by_block * width + first_real[by_block],
                                                              batch_lengths[by_block])))
            blocks, run_rows = np.unique(owner[rows][by_block], return_index=True)
            run_starts = np.concatenate([[0], np.cumsum(batch_lengths[by_block])])[np.append(run_rows, len(rows))]
            with one_thread():
                for k, layer in enumerate(layers):
                    tokens = hidden[layer].reshape(-1, hidden[layer].shape[-1]).index_select(0, index)
                    extremes.append(torch.stack(torch.aminmax(tokens)))  # as the model gave them; nan propagates
                    tokens = tokens.to(buffers[0].dtype)
                    with copies.copying(tokens):
                        for n, block in enumerate(blocks):
                            source = tokens[run_starts[n]:run_starts[n + 1]]
                            start = local_start[rows[by_block[run_rows[n]]]]
                            buffers[block][k, start:start + len(source)].copy_(source, non_blocking=True)
        if on_batch is not None:
            on_batch(samples[rows])
    with torch.inference_mode(), one_thread():
        for buffer, block in zip(buffers, block_samples):
            buffer[:, int(lengths[block].sum()):].zero_()
        bounds = None
        if extremes:  # [batches, K, 2] -> per layer, the group's min and max
            stats = torch.stack(extremes).view(-1, len(layers), 2)
            bounds = torch.stack([stats[..., 0].amin(0), stats[..., 1].amax(0)], 1)
        bounds, copied = copies.finish(bounds)
    return [PendingBlock(buffer, bounds, copied, tuple(layers)) for buffer in buffers[:len(block_samples)]]


def group_features(forward, block_samples: list[np.ndarray], lengths: np.ndarray, layers: list[int],
                   block_tokens: int, hidden_size: int, dtype: str, batch_size: int,
                   runtime: Runtime | None = None) -> list[np.ndarray]:
    """The [K, block_tokens, D] features of each block of a sort group (see `start_group`), waited for.

    The one place a block's features are made: the single-process loop (through `start_group`, without
    waiting) and every distributed worker use it, so both write the same bytes.
    """
    runtime = runtime or Runtime.resolve("cpu", "fp32")
    buffers = [block_buffer(len(layers), block_tokens, hidden_size, dtype, runtime.device) for _ in block_samples]
    return [pending.result() for pending in start_group(forward, block_samples, lengths, layers, buffers, batch_size,
                                                        runtime=runtime)]


class BufferPool:
    """Block buffers made when first needed, up to `limit`, and reused (pinned memory is slow to allocate)."""

    def __init__(self, limit: int, make):
        self.free, self.made, self.limit, self.make = queue.Queue(), 0, limit, make

    def take(self, background: BackgroundWriter) -> torch.Tensor:
        if self.free.empty() and self.made < self.limit:
            self.made += 1
            return self.make()
        return background.wait_for(self.free)


class Writes:
    """The background writer threads and block buffers of one extraction, shared by its splits (so a split's
    last writes overlap the next split's forward passes)."""

    def __init__(self, settings: ExtractSettings, layers: int, hidden_size: int, runtime: Runtime):
        self.runtime = runtime
        from .host_memory import buffer_count

        self.background = BackgroundWriter(threads=writer_threads(str(runtime.device)))
        self.pool = BufferPool(buffer_count(settings, runtime.device), lambda: block_buffer(
            layers, settings.block_tokens, hidden_size, settings.dtype, runtime.device))


def _run_blocks(forward, work: SplitWork, progress, writes: Writes) -> None:
    """Runs a split's pending blocks in this process, a sort group at a time, handing finished blocks to the
    background writers while the next group's forward passes run. A group's blocks that are already done (a
    resumed run) are computed again, so the batches are the same as in an uninterrupted run, but not written."""
    settings, plan, background, pool = work.settings, work.plan, writes.background, writes.pool
    pending = set(work.pending)
    groups = [g for g in sort_groups(plan.num_blocks, plan.block_tokens, settings.sort_tokens) if pending & set(g)]
    counted = np.zeros(len(plan.token_start), dtype=bool)
    counted[np.concatenate([plan.block_samples[b] for b in work.pending])] = True

    def write(block: int, result: PendingBlock) -> None:
        try:
            features = result.result()
            if block in pending:
                work.writer.write_block(block, features)
        finally:
            pool.free.put(result.buffer)

    started = time.perf_counter()
    try:
        for group in groups:
            buffers = [pool.take(background) for _ in group]
            results = start_group(forward, [plan.block_samples[b] for b in group], work.lengths, work.layers, buffers,
                                  settings.batch_size, lambda samples: progress.update(int(counted[samples].sum())),
                                  writes.runtime)
            for block, result in zip(group, results):
                background.submit(write, block, result)
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    if elapsed > 0 and progress.n:
        progress.write(f"{progress.desc}: {progress.n} samples in {elapsed:.1f} s ({progress.n / elapsed:.1f} samples/s)")
