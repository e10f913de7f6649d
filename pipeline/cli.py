"""The `pipeline` command: extract features once, then fit side networks on them."""
from __future__ import annotations

import json
import os
import shutil

import click

from cachetune.cache.errors import InputError, StorageError, describe_os_error
from cachetune.cache.store_lock import model_folder_lock, store_reading

from .cli_errors import PipelineGroup, stop_on_sigterm, user_errors
from .cli_options import (DEFAULT_CACHE, DEFAULT_MODELS, delimiter_option, log, resolve_runtime, runtime_options,
                          storage_option)
from .library_errors import library_errors



def _method_names() -> list[str]:
    from cachetune.stages.methods import method_names

    return method_names()


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """cachetune: run a frozen backbone once, cache its layers, train side networks on the cache.

    \b
    Typical use:
      pipeline extract --layers all        # stage one: write artifacts/features.zarr
      pipeline fit --method sherl          # stage two: train a side network on it
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stop_on_sigterm()


def data_options(command):
    """The backbone and data options shared by `extract` and `baseline`."""
    options = [
        click.option("--backbone", default="minilm", show_default=True,
                     help="Built-in name (minilm, mpnet, smollm2; images: dinov2-small), a .gguf file, a local model folder, or a hub id already in the local cache."),
        click.option("--data", default="movies", show_default=True,
                     help="Built-in name (movies, trec; images: fashion-mnist, digits), a .csv/.tsv/.jsonl/.parquet file, "
                          "a folder of train/validation/test files, or a folder of images in one subfolder per class."),
        click.option("--text-column", default="text", show_default=True, help="The table's column of texts."),
        click.option("--image-column", default=None,
                     help="Column of image paths (relative to the table's folder) [default: image, used when the table "
                          "has it and no text column; giving this option always reads images]."),
        click.option("--text-pair-column", default=None, help="Second text of a pair task (optional)."),
        click.option("--label-column", default="label", show_default=True,
                     help="The table's column of labels (class names, or numbers with --task regression)."),
        click.option("--delimiter", default=None,
                     help="Column delimiter of a CSV/TSV file, e.g. ';' or tab [default: ',' (.csv) or tab (.tsv), or the "
                          "one that splits the header when those do not]."),
        click.option("--split-column", default=None,
                     help="Column with train/validation/test (any case; val and dev are read as validation) "
                          "[default: the table's `split` column if it has one]; without one a seeded stratified "
                          "80/10/10 split is made."),
        click.option("--task", type=click.Choice(["classification", "regression"]), default="classification", show_default=True,
                     help="Classes (cross-entropy, accuracy and macro-F1) or one numeric target (MSE, Pearson, Spearman)."),
        click.option("--split-seed", type=int, default=0, show_default=True,
                     help="Seed of the stratified 80/10/10 split, used when the data gives no splits."),
        click.option("--decimal-mark", type=click.Choice([".", ","]), default=None,
                     help="--task regression: the targets' decimal mark; the other one (or a space) groups thousands "
                          "(',': 1.197,45 is 1197.45) [default: plain numbers only, 4.25]."),
        click.option("--image-size", type=int, default=None,
                     help="Image backbones (DINOv2): pixels per side, a multiple of the patch size [default: the processor's]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@data_options
@click.option("--max-samples", type=int, default=None,
              help="Extract a seeded sample of this many rows (--split-seed; stratified by split and label, so the "
                   "splits keep their proportions); recorded in the store's key and shown by `pipeline info`.")
@click.option("--layers", default="all", show_default=True,
              help="all | last:K | every:K | for:METHOD,... (the layers those methods read) | comma list of hidden_states indices (0 = embeddings).")
@click.option("--max-length", type=int, default=128, show_default=True,
              help="Tokens per sample after truncation (text; an image always gives its patches plus CLS).")
@click.option("--batch-size", type=int, default=None, help="Samples per forward batch [default: 32 on a CPU, 128 on a GPU].")
@click.option("--dtype", type=click.Choice(["float16", "float32", "int8", "fp8"]), default="fp8", show_default=True,
              help="fp8 (e4m3) / int8: 8-bit codes with a float16 scale per token and 64 channels, decoded on the training "
                   "device, about half of float16's bytes (fp8 kept every method measured within 0.3 points or one "
                   "seed-to-seed std of float16 on MiniLM, MPNet and SmolLM2-135M: BENCHMARKS.md); float16 / float32: "
                   "the features as computed.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="The forward pass's precision (autocast); part of the store's key, since bf16/fp16 features differ.")
@click.option("--codec", type=click.Choice(["lz4", "zstd", "none"]), default="lz4", show_default=True,
              help="Lossless compressor (blosc); every chunk also gets a crc32c checksum.")
@click.option("--lossy", default=None, hidden=True, help="Removed: use --dtype int8 or fp8 (an error says so).")
@click.option("--pooling", type=click.Choice(["last", "mean", "cls"]), default=None,
              help="What side networks pool by [default: last for a causal decoder, else the encoder's own: cls or mean]; "
                   "recorded in the store.")
@click.option("--out", default=DEFAULT_CACHE, show_default=True, help="Where the zarr store goes.")
@click.option("--overwrite", is_flag=True, help="Replace a store made with other settings.")
@click.option("--device", default="auto", show_default=True,
              help="auto (a GPU when there is one), cpu, cuda or cuda:N; with --workers, cuda spreads them over the GPUs.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model folder's own Python code to run.")
@click.option("--block-tokens", type=int, default=8192, show_default=True, help="Tokens per block (one shard, the unit of resume).")
@click.option("--chunk-tokens", type=int, default=1024, show_default=True, help="Tokens per compressed chunk.")
@click.option("--sort-tokens", type=int, default=32768, show_default=True,
              help="Forward batches are length-sorted across consecutive blocks holding this many tokens (less padding); "
                   "host memory holds about twice this many tokens of every cached layer, and a value that would not "
                   "fit in the memory available is refused before anything is written.")
@click.option("--workers", type=int, default=None,
              help="Run the forward passes on a dask LocalCluster of N one-thread worker processes.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run the forward passes on an existing dask cluster (tcp://HOST:8786); --out must be reachable from its workers.")
@user_errors
@storage_option("out")
def extract(backbone, data, text_column, image_column, text_pair_column, label_column, delimiter, split_column, task,
            split_seed, decimal_mark, image_size, max_samples, layers, max_length, batch_size, dtype, precision, codec, lossy,
            pooling, out, overwrite, device, trust_remote_code, block_tokens, chunk_tokens,
            sort_tokens, workers, scheduler):
    """Stage one: run the frozen backbone over the data once and cache its layers.

    Re-running with the same settings does nothing; after a crash it resumes from the first
    unfinished block. Different settings into an existing store are refused without --overwrite.
    --out may be an fsspec URL (s3://bucket/features.zarr).
    """
    from cachetune.pipeline.extract_run import run_extract

    state = run_extract(backbone, data, out, log=log, text_column=text_column, image_column=image_column,
                        text_pair_column=text_pair_column, label_column=label_column, delimiter=delimiter_option(delimiter),
                        split_column=split_column, task=task, split_seed=split_seed, decimal_mark=decimal_mark,
                        max_samples=max_samples, image_size=image_size, layers=layers, max_length=max_length,
                        batch_size=batch_size, dtype=dtype, precision=precision,
                        codec=codec, lossy=lossy, pooling=pooling, overwrite=overwrite, device=device,
                        trust_remote_code=trust_remote_code, block_tokens=block_tokens, chunk_tokens=chunk_tokens,
                        sort_tokens=sort_tokens, workers=workers, scheduler=scheduler)
    if state == "complete":
        click.echo(f"{out} is up to date (same backbone, data and settings); nothing to do")
    else:
        click.echo(f"wrote {out}")


@main.command()
@user_errors
def methods():
    """List the registered side networks, one line each."""
    from cachetune.stages.methods import get_method, method_names

    for name in method_names():
        click.echo(f"{name:10s} {get_method(name).summary}")


class MethodChoice(click.Choice):
    """Choices taken from the registry when first needed, so --help stays fast; auto adds `auto`."""

    def __init__(self, auto: bool = False):
        super().__init__([])
        self.auto = auto

    def _names(self) -> list[str]:
        return _method_names() + (["auto"] if self.auto else [])

    def convert(self, value, param, ctx):
        self.choices = self._names()
        return super().convert(value, param, ctx)

    def get_metavar(self, param, ctx=None):
        return "[" + "|".join(self._names()) + "]"


def training_options(command):
    """The cache, schedule and data-path options shared by `fit` and `sweep`."""
    options = [
        click.option("--cache", "cache_path", default=DEFAULT_CACHE, show_default=True, help="Store written by `pipeline extract`."),
        click.option("--epochs", type=int, default=5, show_default=True,
                     help="Passes over the training split; the epoch with the best validation metric is kept."),
        click.option("--batch-size", type=int, default=32, show_default=True, help="Training samples per optimizer step."),
        click.option("--warmup-ratio", type=float, default=0.1, show_default=True,
                     help="Share of steps with linear warm-up; then linear decay to 0."),
        click.option("--buffer-mb", type=float, default=None,
                     help="MB of cache rows the reader holds: the shuffle buffer served and the one read ahead, half "
                          "each (memory vs randomness: samples are shuffled within a buffer) [default: two buffers of "
                          "two blocks of the layers read, at most 48]."),
        click.option("--in-memory/--streaming", default=None,
                     help="Load the needed layers once onto the training device (RAM, or the GPU's memory) and gather "
                          "batches there, or stream them from the store [default: in memory on a GPU when they fit in "
                          "half its free memory, else streaming]."),
        click.option("--length-buckets", is_flag=True,
                     help="Batches of similar length within the shuffle buffer, served in shuffled order (less padding)."),
        click.option("--max-train-samples", type=int, default=None, help="Train on a seeded random subset of this size."),
        click.option("--static-shapes", is_flag=True,
                     help="Every batch --batch-size rows (the last padded; padding rows count for nothing) and one of "
                          "four lengths: fewer shapes for --compile."),
        click.option("--compile", "compile_", is_flag=True,
                     help="torch.compile the side network (fused kernels; CUDA graphs on a GPU, best with "
                          "--static-shapes); equal to eager within float tolerance."),
        click.option("--backbone", "backbone_path", default=None,
                     help="Backbone folder, if it moved since extraction (methods with frozen layers)."),
    ]
    command = runtime_options(command)
    for option in reversed(options):
        command = option(command)
    return command


def _fit_settings(epochs, batch_size, warmup_ratio, buffer_mb, in_memory, length_buckets, max_train_samples,
                  device, precision, lr=1e-3, weight_decay=0.01, seed=0, static_shapes=False, compile_=False):
    from cachetune.stages.training.fit import FitSettings

    if epochs < 1 or batch_size < 1:
        raise InputError("--epochs and --batch-size must be at least 1")
    if buffer_mb is not None and not buffer_mb > 0:
        raise InputError(f"--buffer-mb {buffer_mb}: give a positive number of MB, or leave it out for the default")
    runtime = resolve_runtime(device, precision)  # bad --device/--precision fail here, before the cache is opened
    if compile_ and not runtime.is_cuda and not shutil.which(os.environ.get("CXX", "g++")):
        raise InputError("--compile on the CPU needs a C++ compiler (g++ or $CXX) for torch.compile; install one or "
                         "drop --compile")
    return FitSettings(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                       seed=seed, buffer_mb=buffer_mb, in_memory=in_memory, max_train_samples=max_train_samples,
                       device=device, precision=precision, length_buckets=length_buckets,
                       static_shapes=static_shapes, compile=compile_)


@main.command()
@click.option("--method", type=MethodChoice(auto=True), default="sherl", show_default=True,
              help="Side network (see `pipeline methods`), or auto: every method at its defaults in one sweep, the best "
                   "by validation kept.")
@click.option("--out", default=None, help=f"Model folder [default: {DEFAULT_MODELS}/METHOD].")
@click.option("--set", "pairs", multiple=True, metavar="KEY=VALUE", help="A method option, e.g. --set r=4; repeat for more.")
@click.option("--config", "config_file", default=None, help="YAML or JSON file of method options (--set wins).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW peak learning rate (linear warm-up, then linear decay).")
@click.option("--weight-decay", type=float, default=0.01, show_default=True, help="AdamW weight decay.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial weights, dropout and batch order.")
@training_options
@user_errors
@storage_option("cache_path")
def fit(method, out, pairs, config_file, lr, weight_decay, seed, cache_path, epochs, batch_size, warmup_ratio,
        buffer_mb, in_memory, length_buckets, max_train_samples, backbone_path, device, precision, static_shapes,
        compile_):
    """Stage two: train a side network on the cached features.

    Keeps the epoch with the best validation metric, reports test metrics, and writes
    config.json, model.safetensors and metrics.json to the model folder. With --method auto,
    every registered method trains on the same batches (`pipeline sweep`); the one with the best
    validation metric becomes the model folder, with sweep.json and sweep.csv beside its files.
    """
    from pathlib import Path

    from cachetune.pipeline.method_options import collect_options
    from cachetune.stages.training.fit import fit as run_fit
    from cachetune.stages.methods import config_from_options

    if lr <= 0:
        raise InputError("--lr must be positive")
    settings = _fit_settings(epochs, batch_size, warmup_ratio, buffer_mb, in_memory, length_buckets,
                             max_train_samples, device, precision, lr, weight_decay, seed, static_shapes, compile_)
    out_dir = Path(out or os.path.join(DEFAULT_MODELS, method))
    if method == "auto":
        if pairs or config_file:
            raise InputError("--method auto trains every method at its defaults; drop --set/--config, or run "
                             "`pipeline sweep --methods ... --set KEY=V1,V2`")
        with store_reading(cache_path), model_folder_lock(out_dir):
            return _fit_auto(cache_path, settings, out_dir, backbone_path)
    try:
        config = config_from_options(method, collect_options(pairs, config_file))
    except ValueError as error:
        raise InputError(str(error)) from None
    try:
        with store_reading(cache_path), model_folder_lock(out_dir):
            with library_errors(f"fit --method {method}", _cache_backbone(cache_path, backbone_path)):
                metrics = run_fit(cache_path, config, settings, out_dir, backbone_path)
    except OSError as error:
        raise _training_error(error, out_dir) from None
    click.echo(f"{method}: test {_format_metrics(metrics['test'])}; best epoch {metrics['best_epoch']}; "
               f"{metrics['trainable_parameters']:,} trainable parameters; {metrics['seconds_per_epoch']:.1f} s/epoch; "
               f"{_format_memory(metrics)}; {metrics['device_name']}, {metrics['precision']}")
    _echo_target_scale(metrics)
    click.echo(f"saved to {out_dir}")


def _echo_target_scale(metrics: dict) -> None:
    """One line when regression targets were standardised for training (stages/training/target_scale.py)."""
    from cachetune.stages.training.target_scale import INFO_KEY, TargetScale

    if INFO_KEY in metrics:
        click.echo(TargetScale.of_info(metrics).describe())


def _fit_auto(cache_path, settings, out_dir, backbone_path):
    """The sweep's runs go to OUT/runs; the best run's files are copied into OUT itself, beside the tables."""
    import shutil

    from cachetune.stages.methods import method_names
    from cachetune.stages.training.sweep import RUNS_DIR
    from cachetune.stages.training.sweep_grid import make_grid

    grid = make_grid({}, methods=_runnable_methods(method_names(), cache_path, backbone_path), lrs=[settings.lr],
                     weight_decays=[settings.weight_decay], seeds=[settings.seed])
    summary = _run_sweep(cache_path, grid.runs(), settings, out_dir, backbone_path)
    best = out_dir / RUNS_DIR / summary["best"]
    for name in ("config.json", "model.safetensors", "metrics.json"):
        shutil.copyfile(best / name, out_dir / f".{name}.partial")
        os.replace(out_dir / f".{name}.partial", out_dir / name)
    click.echo(f"auto: kept {summary['best']} (best validation {summary['metric']}); saved to {out_dir}")


@main.command()
@click.option("--methods", default=None,
              help="Comma-separated methods, e.g. lst,unipt,sherl [default: the grid file's, else every method].")
@click.option("--grid", "grid_file", default=None,
              help="YAML file of the grid (methods, set, lr, weight-decay, seeds), or params.yaml (its sweep section); "
                   "the command line's lists override it.")
@click.option("--set", "pairs", multiple=True, metavar="KEY=V1,V2",
              help="Values of a method option, applied to the methods that have it, e.g. --set r=4,8; repeat for more.")
@click.option("--lr", "lrs", default=None, help="Comma-separated learning rates, e.g. 3e-4,1e-3,3e-3 [default: 1e-3].")
@click.option("--weight-decay", "weight_decays", default=None, help="Comma-separated weight decays [default: 0.01].")
@click.option("--seeds", default=None, help="Comma-separated seeds, e.g. 0,1,2 [default: 0]; one pass over the cache each.")
@click.option("--out", default=os.path.join(DEFAULT_MODELS, "sweep"), show_default=True,
              help="Folder of the tables (sweep.json, sweep.csv) and of each run's model folder (runs/NAME).")
@training_options
@user_errors
@storage_option("cache_path")
def sweep(methods, grid_file, pairs, lrs, weight_decays, seeds, out, cache_path, epochs, batch_size, warmup_ratio,
          buffer_mb, in_memory, length_buckets, max_train_samples, backbone_path, device, precision, static_shapes,
        compile_):
    """Train many side networks on one pass over the cache: every combination of methods, options, learning
    rates, weight decays and seeds.

    \b
    Runs with the same seed share every batch (read and decoded once); each run's result equals
    `pipeline fit` with the same settings. A rerun skips finished runs and resumes the others.
    Example: pipeline sweep --methods lst,unipt,sherl --set r=4,8 --lr 3e-4,1e-3 --seeds 0,1,2
    """
    from pathlib import Path

    from cachetune.stages.methods import method_names
    from cachetune.stages.training.sweep_grid import make_grid, read_grid_file

    with store_reading(cache_path), model_folder_lock(out):
        file = read_grid_file(grid_file) if grid_file else {}
        if methods is None and "methods" not in file:  # every method that can run on this cache's backbone
            methods = ",".join(_runnable_methods(method_names(), cache_path, backbone_path))
        grid = make_grid(file, methods=methods, pairs=pairs, lrs=lrs, weight_decays=weight_decays, seeds=seeds)
        runs = grid.runs()
        settings = _fit_settings(epochs, batch_size, warmup_ratio, buffer_mb, in_memory, length_buckets,
                                 max_train_samples, device, precision, static_shapes=static_shapes, compile_=compile_)
        if any(run.lr <= 0 for run in runs):
            raise InputError("--lr values must be positive")
        _run_sweep(cache_path, runs, settings, Path(out), backbone_path)


def _run_sweep(cache_path, runs, settings, out_dir, backbone_path) -> dict:
    from cachetune.stages.training.sweep import SWEEP_CSV, sweep as run_sweep

    try:
        with library_errors("sweep", _cache_backbone(cache_path, backbone_path)):
            summary = run_sweep(cache_path, runs, settings, out_dir, backbone_path)
    except OSError as error:
        raise _training_error(error, out_dir) from None
    metric = summary["metric"]
    click.echo(f"{len(runs)} runs ({summary['trained_now']} trained now) in {summary['wall_seconds']:.0f} s; "
               f"{_format_memory(summary)}; {summary['device_name']}, {summary['precision']}")
    for row in sorted(summary["runs"], key=lambda row: -row[f"validation_{metric}"]):
        click.echo(f"  {row['name']:40s} validation {metric} {row[f'validation_{metric}']:.4f}  "
                   f"test {metric} {row.get(f'test_{metric}', float('nan')):.4f}")
    click.echo(f"best by validation: {summary['best']}; table: {out_dir / SWEEP_CSV}")
    return summary


def _cache_backbone(cache_path: str, backbone_path: str | None) -> str:
    """'DIR (model type) of the cache at PATH', for messages; what the store records, --backbone first."""
    from cachetune.cache.reader import open_store

    try:
        attrs = open_store(cache_path).attrs
    except InputError:
        return f"of the cache at {cache_path}"
    return f"{backbone_path or attrs.get('backbone_path')} ({attrs.get('model_type')}) of the cache at {cache_path}"


def _runnable_methods(methods: list[str], cache_path: str, backbone_path: str | None) -> list[str]:
    """The methods that can run on the cache's backbone (stages/methods/support.py); the others are named on
    stderr. A missing cache is left for the training code to report."""
    from cachetune.cache.reader import open_store
    from cachetune.stages.methods import get_method
    from cachetune.stages.methods.support import split_supported
    from cachetune.stages.training.fit import missing_layers, spec_from_store

    try:
        root = open_store(cache_path)
    except InputError:
        return methods
    attrs = root.attrs
    runnable, reasons = split_supported(methods, backbone_path or attrs["backbone_path"])
    if reasons:
        log(f"note: leaving out {', '.join(reasons)}: they cannot run on this {attrs.get('model_type')} cache "
             f"({next(iter(reasons.values()))})")
    spec = spec_from_store(root, backbone_path)
    lacking = {name: missing_layers(get_method(name).config_class(), spec)[1] for name in runnable}
    lacking = {name: missing for name, missing in lacking.items() if missing}
    if lacking:
        log(f"note: leaving out {', '.join(lacking)}: the cache lacks layers they need "
            f"({', '.join(f'{name}: {missing}' for name, missing in lacking.items())}); extract with --layers all for them")
    runnable = [name for name in runnable if name not in lacking]
    if not runnable:
        raise InputError(f"no method can run on the cache at {cache_path} (it has layers {list(spec.cached_layers)}); "
                         "re-extract with --layers all")
    return runnable


def _format_memory(metrics: dict) -> str:
    if "peak_gpu_allocated_mb" in metrics:
        return f"peak GPU memory {metrics['peak_gpu_allocated_mb']:.0f} MB allocated"
    if "training_memory_mb" in metrics:
        return f"training memory {metrics['training_memory_mb']:.0f} MB (torch's allocations, largest batch)"
    return f"peak memory {metrics['peak_memory_mb']:.0f} MB above start"


def _training_error(error: OSError, out_dir) -> InputError | StorageError:
    """One line for an OS error while training writes its checkpoint or model folder: bad input when a file
    stands where --out needs a folder."""
    from cachetune.cache.errors import file_in_the_way, is_disk_full

    where = "" if error.filename else f" writing {out_dir} or its checkpoint {out_dir}.checkpoint.pt"
    return file_in_the_way(error) or StorageError(
        f"{describe_os_error(error)}{where}; {'free room' if is_disk_full(error) else 'fix that'}, then rerun the "
        "same command: it resumes after the last finished epoch")


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "(no test split)"


@main.command()
@click.argument("model_dir")
@click.option("--cache", "cache_path", default=None,
              help="The cache to score [default: the one the model was trained on, else artifacts/features.zarr].")
@click.option("--split", default="test", show_default=True, help="train, validation or test.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Samples per forward pass.")
@click.option("--backbone", "backbone_path", default=None,
              help="Backbone folder, if it moved since extraction (methods with frozen layers).")
@runtime_options
@user_errors
@storage_option()
def evaluate(model_dir, cache_path, split, batch_size, backbone_path, device, precision, storage_options):
    """Metrics of a saved side network on a cached split (printed as JSON)."""
    from cachetune.cache.storage_options import storage_options as use_storage_options
    from cachetune.stages.training.side_model import load_side_model

    runtime = resolve_runtime(device, precision)
    side = load_side_model(model_dir, backbone_path)
    if cache_path is None:
        cache_path = side.info.get("cache_path") or DEFAULT_CACHE  # models saved before cache_path was recorded
        log(f"evaluate: scoring the cache at {cache_path} (the one {model_dir} was trained on; --cache for another)"
             if side.info.get("cache_path") else f"evaluate: scoring the cache at {cache_path} (--cache for another)")
    with use_storage_options([cache_path], storage_options):
        _evaluate(model_dir, side, cache_path, split, batch_size, runtime)


def _evaluate(model_dir, side, cache_path, split, batch_size, runtime) -> None:
    from cachetune.cache.reader import CacheReader, open_store
    from cachetune.stages.training.evaluate import evaluate_split
    from cachetune.stages.training.target_scale import TargetScale

    with store_reading(cache_path):
        key = open_store(cache_path).attrs["key"]
        trained = side.info["cache_key"]
        for field in ("backbone_weights_sha256", "tokenizer_sha256", "max_length", "precision"):  # absent = fp32
            if key.get(field) != trained.get(field):
                raise InputError(f"the cache at {cache_path} was made with another {field.replace('_sha256', '')} than "
                                 f"the one {model_dir} was trained on; extract with the same backbone and settings")
        encoding = lambda k: (k.get("dtype", "float16"), k.get("reduce"))  # noqa: E731
        if encoding(key) != encoding(trained):
            log(f"evaluate: note: {model_dir} was trained on {'+'.join(filter(None, encoding(trained)))} features and "
                f"this cache holds {'+'.join(filter(None, encoding(key)))}: the side network sees another approximation "
                "of the same hidden states, so its metrics can differ from those on its own cache")
        reader = CacheReader(cache_path, split, side.layers)
        metrics = evaluate_split(side.model.to(runtime.device), reader, side.info["task"], side.spec.num_labels,
                                 batch_size, runtime, scale=TargetScale.of_info(side.info))
    click.echo(json.dumps({"split": split, "samples": len(reader), **metrics}, indent=2))


@main.command()
@click.option("--method", type=click.Choice(["lora", "full"]), default="lora", show_default=True)
@data_options
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per text (longer texts are truncated).")
@click.option("--epochs", type=int, default=2, show_default=True, help="Passes over the training split.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Training samples per optimizer step.")
@click.option("--lr", type=float, default=None, help="[default: 5e-4 for lora, 5e-5 for full]")
@click.option("--weight-decay", type=float, default=0.01, show_default=True, help="AdamW weight decay.")
@click.option("--warmup-ratio", type=float, default=0.1, show_default=True, help="Share of steps in linear warm-up.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the head, LoRA weights, dropout and batch order.")
@click.option("--max-train-samples", type=int, default=None, help="Same seeded subset as `fit --max-train-samples`.")
@click.option("--length-buckets", is_flag=True,
              help="Batches of similar length (sorted within windows of 20 batches of the shuffled order), served in "
                   "shuffled order: less padding computed, as `fit --length-buckets`.")
@click.option("--lora-r", type=int, default=8, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=int, default=16, show_default=True, help="LoRA scaling numerator (scale = alpha / r).")
@click.option("--lora-targets", default=None,
              help="Comma list of module names to adapt [default: the attention query and value projections, e.g. query,value; q,v for MPNet and T5; q_proj,v_proj for Llama-layout and Gemma-3 decoders; c_attn for GPT-2].")
@click.option("--pooling", type=click.Choice(["last", "mean", "cls"]), default=None,
              help="[default: last for a causal decoder, else the encoder's own]; match the cache's for a fair comparison.")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute each backbone layer in backward instead of keeping its activations (transformers' "
                   "gradient_checkpointing_enable): the memory-conscious baseline; same arithmetic, so same accuracy.")
@click.option("--measure-step", is_flag=True,
              help="Do not train: measure the memory of one step on the largest batch of the first epoch and write it "
                   "to metrics.json (no accuracy). For --gradient-checkpointing, whose accuracy is the plain run's.")
@click.option("--out", default=None, help=f"Model folder [default: {DEFAULT_MODELS}/METHOD].")
@runtime_options
@user_errors
def baseline(method, backbone, data, text_column, image_column, text_pair_column, label_column, delimiter, split_column, task,
             split_seed, decimal_mark, image_size, max_length, epochs, batch_size, lr, weight_decay, warmup_ratio, seed, max_train_samples,
             length_buckets, lora_r, lora_alpha, lora_targets, pooling, gradient_checkpointing, measure_step, out, device,
             precision):
    """Train the backbone itself (LoRA via PEFT, or full fine-tuning) for side-by-side numbers.

    Same split, pooling, head, schedule and metrics.json as `fit`; nothing is cached.
    """
    from pathlib import Path

    from cachetune.pipeline.data import load_dataset
    from cachetune.stages.training.baseline import BaselineSettings, train_baseline

    resolve_runtime(device, precision)
    dataset = load_dataset(data, text_column, label_column, text_pair_column, task, split_seed, split_column, image_column,
                           delimiter_option(delimiter), log, decimal_mark)
    settings = BaselineSettings(method=method, image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                warmup_ratio=warmup_ratio, seed=seed, max_length=max_length, max_train_samples=max_train_samples,
                                length_buckets=length_buckets,
                                lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=[t.strip() for t in lora_targets.split(",")] if lora_targets else None,
                                pooling=pooling, device=device, precision=precision,
                                gradient_checkpointing=gradient_checkpointing, measure_step=measure_step)
    out_dir = Path(out or os.path.join(DEFAULT_MODELS, method))
    try:
        with model_folder_lock(out_dir), library_errors(f"baseline --method {method}", backbone):
            metrics = train_baseline(backbone, dataset, settings, out_dir)
    except OSError as error:
        raise _training_error(error, out_dir) from None
    if measure_step:
        click.echo(f"{method}{' with gradient checkpointing' if gradient_checkpointing else ''}: one step measured, "
                   f"no training; {_format_memory(metrics)}; {metrics['device_name']}, {metrics['precision']}")
    else:
        click.echo(f"{method}: test {_format_metrics(metrics['test'])}; {metrics['trainable_parameters']:,} trainable "
                   f"parameters; {metrics['seconds_per_epoch']:.1f} s/epoch; {_format_memory(metrics)}; "
                   f"{metrics['device_name']}, {metrics['precision']}")
        _echo_target_scale(metrics)
    click.echo(f"saved to {out_dir}")


from cachetune.pipeline.info_cli import info  # noqa: E402  (its own module, as report)
from cachetune.pipeline.predict_cli import predict  # noqa: E402  (its own module, as report)

main.add_command(info)
main.add_command(predict)

from cachetune.pipeline.report_cli import report  # noqa: E402  (its own module: report needs matplotlib, not the stages)

main.add_command(report)

from cachetune.pipeline.compact_cli import compact  # noqa: E402  (its own module, as report)

main.add_command(compact)


if __name__ == "__main__":
    main()
