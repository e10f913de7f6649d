"""Stage one as a library call: the checks, notes, store lock and failure record around extraction, shared by
`pipeline extract` and `cachetune.extract`."""
from __future__ import annotations

from cachetune.cache.errors import InputError, OtherStoreError, StorageError, describe_os_error
from cachetune.cache.store_lock import store_lock
from cachetune.stages.backbones import load_backbone
from cachetune.stages.extraction.extract import ExtractSettings, extract as extract_store, validate_settings
from cachetune.stages.extraction.host_memory import check_host_memory
from cachetune.stages.extraction.preflight import method_support_note, preflight

from .data import load_dataset
from .data_sample import take_sample
from .library_errors import library_errors


def run_extract(backbone: str, data: str, out: str, log=print, text_column: str = "text",
                image_column: str | None = None, text_pair_column: str | None = None, label_column: str = "label",
                delimiter: str | None = None, split_column: str | None = None, task: str = "classification",
                split_seed: int = 0, decimal_mark: str | None = None, max_samples: int | None = None,
                image_size: int | None = None, layers: str = "all", max_length: int = 128,
                batch_size: int | None = None, dtype: str = "fp8", precision: str = "fp32", codec: str = "lz4",
                lossy: str | None = None, pooling: str | None = None, overwrite: bool = False, device: str = "auto",
                trust_remote_code: bool = False, block_tokens: int = 8192, chunk_tokens: int = 1024,
                sort_tokens: int = 32768, workers: int | None = None, scheduler: str | None = None) -> str:
    """Run stage one (the options and defaults of `pipeline extract`; see its --help) and return "complete" when the
    store was already up to date, else "written". Notes go to `log`, one line each. Raises InputError (bad input,
    one line naming the fix) or StorageError (an OS error writing the store; rerunning resumes)."""
    settings = ExtractSettings(out=out, layers=layers, max_length=max_length, batch_size=batch_size, dtype=dtype,
                               codec=codec, lossy=lossy, overwrite=overwrite, block_tokens=block_tokens,
                               chunk_tokens=chunk_tokens, sort_tokens=sort_tokens, device=device,
                               precision=precision, pooling=pooling)
    validate_settings(settings)
    distributed = workers is not None or bool(scheduler)
    if distributed:
        from cachetune.stages.extraction.distributed_extract import check_cluster_options, extract_distributed

        check_cluster_options(workers, scheduler)
    notes = []  # said once every check has passed, so that a refused run prints its one error line only
    dataset = load_dataset(data, text_column, label_column, text_pair_column, task, split_seed, split_column, image_column,
                           delimiter, notes.append, decimal_mark)
    dataset = take_sample(dataset, max_samples, split_seed, notes.append)
    model = load_backbone(backbone, trust_remote_code, image_size)
    name = f"at {model.path} ({model.model.config.model_type})"
    with library_errors("extract's checks", name):
        preflight(model, dataset, settings, notes.append)
    method_support_note(model, notes.append)
    if not scheduler:  # before the lock: a refused run leaves nothing at --out (a scheduler's workers are elsewhere)
        check_host_memory(settings, model, dataset, settings.runtime().device, workers)
    for note in notes:
        log(note)
    try:
        with store_lock(out, log=log):
            clear_failure(out)
            try:
                with library_errors("extract (tokenizing and forward passes)", name):
                    if distributed:
                        state = extract_distributed(model, dataset, settings, workers=workers, scheduler=scheduler,
                                                    trust_remote_code=trust_remote_code, log=log)
                    else:
                        state = extract_store(model, dataset, settings, log)
            except OtherStoreError:  # not this run's store: leave it alone
                raise
            except InputError as error:  # the unfinished store says why, so `fit` does not send the user back here
                record_failure(out, str(error))
                raise
    except OSError as error:
        raise StorageError(store_error(error, model, dataset, settings)) from None
    if state == "written" and dataset.images is not None:  # how many image files needed which decode correction
        for note in dataset.images.notes(dataset.name):
            log(note)
    return state


FAILURE_ATTRIBUTE = "stopped_by"  # cache/reader.py names it when `fit` finds the store unfinished


def existing_store(out: str):
    """The root group of the store at `out` for writing, or None when there is none."""
    from cachetune.cache.writer import open_group, store_fs

    fs, path = store_fs(out)
    if not fs.exists(path):
        return None
    try:
        return open_group(out, mode="r+")
    except Exception:
        return None


def record_failure(out: str, message: str) -> None:
    """Writes why extract stopped into this run's unfinished store (nothing when there is no store)."""
    root = existing_store(out)
    if root is not None and root.attrs.get("status") != "complete":
        root.attrs[FAILURE_ATTRIBUTE] = message


def clear_failure(out: str) -> None:
    root = existing_store(out)
    if root is not None and FAILURE_ATTRIBUTE in root.attrs:
        del root.attrs[FAILURE_ATTRIBUTE]


def store_error(error: OSError, model, dataset, settings) -> str:
    """One line for an OS error while writing the store: what failed, where, the room the rest needs, resume."""
    from cachetune.cache.errors import is_disk_full
    from cachetune.stages.extraction.store_room import describe_room

    room = describe_room(model, dataset, settings) if is_disk_full(error) else ""
    fix = "free room" if is_disk_full(error) else "fix that"
    return (f"writing the store at {settings.out} failed: {describe_os_error(error)}; "
            f"{f'the rest needs {room}; ' if room else ''}{fix}, then rerun the same command: it resumes where it stopped")


def extract(backbone: str = "minilm", data: str = "movies", out: str = "artifacts/features.zarr", log=None,
            **options):
    """Stage one from Python: run the frozen `backbone` over `data` once and cache its hidden states at `out`.

    backbone, data: what `pipeline extract --backbone/--data` take (a built-in name, a model folder or .gguf file; a
    built-in dataset, a table file or a folder). options: the other `pipeline extract` options in snake_case, with
    its defaults (layers="all", max_length=128, dtype="fp8", ...). Notes (what was dropped, cut or chosen) go to
    `log` (default: standard error). Rerunning with the same settings does nothing; after a crash it resumes.
    Returns the store as a `Cache`. Raises InputError or StorageError (both cachetune.CachetuneError).
    """
    import inspect
    import sys

    from cachetune.cache.store import Cache

    known = set(inspect.signature(run_extract).parameters) - {"backbone", "data", "out", "log"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"extract has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}")
    run_extract(backbone, data, out, log=log or (lambda line: print(line, file=sys.stderr)), **options)
    return Cache(out)
