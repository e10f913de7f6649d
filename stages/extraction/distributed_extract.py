"""Stage one on a dask.distributed cluster: `pipeline extract --workers N` or `--scheduler ADDRESS`.

The main process does what a single-process run does up to the forward passes (hashes the backbone,
tokenizes, plans blocks, creates the arrays: `stages.extraction.extract.extract`), then hands each split's pending
blocks to the cluster, a few blocks per task. A worker process loads the backbone once (cached per
process, keyed by folder and settings), turns each of its blocks into the block's [K, block_tokens, D]
buffer with the same `group_features` the single-process loop uses (a task holds whole sort groups, so its
forward batches are the single-process ones), writes the block's shards whole and then its done flag. Every block is in exactly one task, so no two writers share a shard; a task whose
worker dies is run again (on the same or another worker) and skips the blocks an earlier attempt
flagged done. A killed run resumes from the done flags like a single-process one, with or without a
cluster, and the arrays equal a single-process extraction byte for byte.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import threading
import time
import types
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cachetune.cache.errors import InputError
from cachetune.cache.remote_access import check_reachable
from cachetune.cache.storage_options import options_for
from cachetune.cache.writer import SplitWriter, open_group

from ..backbones import Backbone, load_backbone
from .extract import ExtractSettings, sort_groups, SplitWork, image_forward, text_forward, extract, group_features
from ..progress import progress_bar
from ..runtime import Runtime, device_kind, spread_device

SCHEDULER_TIMEOUT_S = 10  # how long to try to reach --scheduler before giving up
MAX_BLOCKS_PER_TASK = 4
TASKS_PER_WORKER = 4  # at least this many tasks per worker when there are enough blocks (load balance)
TASK_RETRIES = 2


@dataclass(frozen=True)
class BackboneSpec:
    """What a worker needs to load the same backbone: its folder (reachable from the worker), the options,
    and the weights hash the store's key holds (a worker with other weights refuses)."""

    path: str
    trust_remote_code: bool
    device: str
    weights_sha256: str
    image_size: int | None = None  # --image-size: each worker resizes its processor and position table the same way


@dataclass
class BlockTask:
    """One task: some whole sort groups of blocks of one split, and the model inputs of exactly their samples."""

    store: str
    split: str
    blocks: list[int]
    samples: list[np.ndarray]  # per block: split positions, longest first (the plan's order)
    layers: list[int]
    block_tokens: int
    hidden_size: int
    dtype: str
    batch_size: int
    backbone: BackboneSpec
    modality: str
    workers_per_host: dict[str, int]
    encoded: object = None  # text: a TokenTable holding only these samples' tokens
    precision: str = "fp32"
    lengths: np.ndarray | None = None  # real tokens per sample, by split position
    sort_tokens: int = 32768
    rows: dict | None = None  # images: split position -> dataset row
    images: object = None  # images: RowImages holding only these rows
    tokens_per_image: int | None = None
    before_write: object = None  # callable(split, block) run on the worker before a block is written (tests)
    torch_threads: int | None = None  # None: this host's CPUs shared among its workers
    storage_options: dict | None = None  # the command's --storage-option for the store: a worker started elsewhere lacks them


class RowImages:
    """The images of some dataset rows, loadable by their original row number (as `Images.load` is)."""

    def __init__(self, images, rows: list[int]):
        from ..images import Images

        self.index = {row: position for position, row in enumerate(rows)}
        if images.paths is not None:
            self.images = Images(paths=[images.paths[row] for row in rows])
        else:
            self.images = Images(array=images.array[np.asarray(rows, dtype=np.int64)])

    def load(self, row: int, mode: str = "RGB"):
        return self.images.load(self.index[int(row)], mode)

    def corrected_rows(self) -> dict[str, list[int]]:
        """Correction (image_decode) -> the dataset rows of the images here it changed."""
        rows = list(self.index)
        return {kind: [rows[i] for i in indices] for kind, indices in self.images.corrected.items()}


# ---------------------------------------------------------------- on a worker

_BACKBONES: dict[BackboneSpec, Backbone] = {}
_BACKBONES_LOCK = threading.Lock()


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _torch_threads(workers_per_host: dict[str, int]) -> int:
    """This host's CPUs shared among the workers on it.

    Note: CPU matrix products may round differently with another intra-op thread count, so features equal a
    single-process run's byte for byte when that run used as many torch threads as each worker does.
    """
    try:
        from distributed import get_worker
        from distributed.comm import get_address_host

        sharing = workers_per_host.get(get_address_host(get_worker().address), 1)
    except Exception:  # not on a worker
        sharing = 1
    return max(1, available_cpus() // max(1, sharing))


def worker_name() -> str:
    """'the dask worker at tcp://HOST:PORT', for errors that only this worker meets."""
    try:
        from distributed import get_worker

        return f"the dask worker at {get_worker().address}"
    except Exception:  # not on a worker
        return "this process"


def open_store_on_worker(store: str, storage_options: dict | None):
    """The store's root group for writing; InputError naming this worker when it cannot reach the store (its own
    credentials, network or shared file system differ from the main process's)."""
    try:
        check_reachable(store, storage_options)
    except InputError as error:
        raise InputError(f"{worker_name()}: {error} (each worker needs this access in its own environment)") from None
    return open_group(store, mode="r+", storage_options=storage_options)


def worker_backbone(spec: BackboneSpec, workers_per_host: dict[str, int], torch_threads: int | None = None) -> Backbone:
    """The backbone, loaded once per worker process (and per folder + settings). InputError when the folder is
    missing on this worker."""
    with _BACKBONES_LOCK:
        if spec not in _BACKBONES:
            if not os.path.exists(spec.path):
                raise InputError(f"{worker_name()} has no backbone at {spec.path}; put the same model folder at that "
                                 "path on every worker machine (or on a file system they share)")
            import torch

            torch.set_num_threads(torch_threads or _torch_threads(workers_per_host))
            backbone = load_backbone(spec.path, spec.trust_remote_code, spec.image_size)
            if backbone.weights_sha256 != spec.weights_sha256:
                raise InputError(f"the backbone at {spec.path} on this worker has other weights than the one the store's "
                                 "key was made with; give every worker the same model folder")
            backbone.model.to(worker_device(spec.device))
            _BACKBONES[spec] = backbone
        return _BACKBONES[spec]


def worker_device(device: str) -> str:
    """This worker's device: `--workers N --device cuda` spreads the workers over the host's GPUs by the worker's
    name (a LocalCluster names them 0..N-1; any other name by a stable hash), instead of all on GPU 0."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except Exception:  # not on a worker
        return device
    rank = int(name) if str(name).isdigit() else int(hashlib.sha256(str(name).encode()).hexdigest(), 16)
    return spread_device(device, rank)


def run_block_task(task: BlockTask) -> dict:
    """Runs on a worker: forward passes for the task's blocks, then each block's shards and done flag."""
    root = open_store_on_worker(task.store, task.storage_options)
    backbone = worker_backbone(task.backbone, task.workers_per_host, task.torch_threads)
    runtime = Runtime.resolve(worker_device(task.backbone.device), task.precision)
    if task.modality == "image":
        forward = image_forward(backbone.model, backbone, types.SimpleNamespace(images=task.images), task.rows,
                                 task.tokens_per_image, runtime)
    else:
        forward = text_forward(backbone.model, task.encoded, runtime)
    writer = SplitWriter.for_existing(root[task.split], task.layers)
    written = []
    group_size = max(1, task.sort_tokens // task.block_tokens)
    for _, members in itertools.groupby(zip(task.blocks, task.samples), key=lambda member: member[0] // group_size):
        members = list(members)
        if all(writer.is_done(block) for block, _ in members):  # an earlier attempt (on a worker that died) wrote them
            continue
        features = group_features(forward, [samples for _, samples in members], task.lengths, task.layers,
                                  task.block_tokens, task.hidden_size, task.dtype, task.batch_size, runtime)
        for (block, _), buffer in zip(members, features):
            if writer.is_done(block):
                continue
            if task.before_write is not None:
                task.before_write(task.split, block)
            writer.write_block(block, buffer)
            written.append(block)
    return {"blocks": list(task.blocks), "written": written, "samples": int(sum(len(s) for s in task.samples)),
            "corrected": task.images.corrected_rows() if task.images is not None else {}}


# ---------------------------------------------------------------- in the main process

def check_cluster_options(workers: int | None, scheduler: str | None) -> None:
    if workers is not None and scheduler:
        raise InputError("give --workers N (a cluster on this machine) or --scheduler ADDRESS (an existing one), not both")
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: give at least 1 worker process")


class Connection:
    """A dask client: to --scheduler ADDRESS, or to a LocalCluster of N one-thread worker processes, started
    only when a split has blocks to run (a complete store starts nothing)."""

    def __init__(self, workers: int | None, scheduler: str | None):
        self.workers, self.scheduler = workers, scheduler
        self.cluster = None
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from distributed import Client, LocalCluster

            if self.scheduler:
                try:
                    self._client = Client(self.scheduler, timeout=SCHEDULER_TIMEOUT_S)
                except Exception as error:
                    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    raise InputError(f"cannot reach the dask scheduler at {self.scheduler} within {SCHEDULER_TIMEOUT_S} s "
                                     f"({message}); check the address (tcp://HOST:8786) and that the scheduler runs") from None
            else:
                self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None)
                self._client = Client(self.cluster)
        return self._client

    def close(self) -> None:
        try:
            if self._client is not None:
                self._client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
            self._client = self.cluster = None


class DaskSplitRunner:
    """`extract`'s run_split: submits one task per group of pending blocks and waits for all of them."""

    def __init__(self, connection: Connection, store: str, backbone: BackboneSpec, blocks_per_task: int | None = None,
                 before_write=None, torch_threads: int | None = None):
        self.connection, self.store, self.backbone = connection, store, backbone
        self.storage_options = options_for(store)
        self.blocks_per_task, self.before_write, self.torch_threads = blocks_per_task, before_write, torch_threads

    def __call__(self, work: SplitWork) -> None:
        from distributed import as_completed
        from distributed.comm import get_address_host

        client = self.connection.client
        workers = client.scheduler_info(**({"n_workers": -1} if _takes_n_workers(client) else {}))["workers"]
        workers_per_host = dict(Counter(get_address_host(address) for address in workers))
        pending = set(work.pending)
        groups = [g for g in sort_groups(work.plan.num_blocks, work.plan.block_tokens, work.settings.sort_tokens)
                  if pending & set(g)]
        per_worker = len(work.pending) // (TASKS_PER_WORKER * max(1, len(workers)))
        blocks = self.blocks_per_task or max(1, min(MAX_BLOCKS_PER_TASK, per_worker))
        size = max(1, blocks // len(groups[0]))  # whole sort groups per task (done blocks in them are not rewritten)
        tasks = [sum(groups[first:first + size], []) for first in range(0, len(groups), size)]
        futures = [client.submit(run_block_task, self._task(work, blocks, workers_per_host), retries=TASK_RETRIES,
                                 pure=False, key=f"extract-{work.split}-blocks-{blocks[0]}-{blocks[-1]}-{uuid.uuid4().hex[:8]}")
                   for blocks in tasks]
        total_blocks = sum(map(len, tasks))
        progress = progress_bar(total=sum(len(work.plan.block_samples[b]) for blocks in tasks for b in blocks),
                                desc=f"extract {work.split} ({len(workers)} workers)", unit="sample")
        started, blocks_done = time.perf_counter(), 0
        try:
            for future in as_completed(futures):
                result = _result(future)
                if result["corrected"]:  # counted here, so that extract's notes cover the workers' images
                    work.dataset.images.record(result["corrected"])
                blocks_done += len(result["blocks"])
                progress.set_postfix_str(f"blocks {blocks_done}/{total_blocks}", refresh=False)
                progress.update(result["samples"])
        except BaseException:
            client.cancel(futures)
            raise
        finally:
            progress.close()
        elapsed = time.perf_counter() - started
        if elapsed > 0 and progress.n:
            progress.write(f"{progress.desc}: {progress.n} samples in {elapsed:.1f} s "
                           f"({progress.n / elapsed:.1f} samples/s)")
        missing = work.writer.pending_blocks()
        if missing:  # every task returned, so this would be a bug, not a crash: never mark such a store complete
            raise RuntimeError(f"{work.split}: blocks {missing[:10]} have no done flag after every task finished")

    def _task(self, work: SplitWork, blocks: list[int], workers_per_host: dict[str, int]) -> BlockTask:
        samples = [work.plan.block_samples[b] for b in blocks]
        positions = [int(i) for s in samples for i in s]
        task = BlockTask(self.store, work.split, list(blocks), samples, work.layers, work.plan.block_tokens,
                         work.hidden_size, work.settings.dtype, work.settings.batch_size, self.backbone, work.modality,
                         workers_per_host, before_write=self.before_write, torch_threads=self.torch_threads,
                         precision=work.settings.precision, lengths=work.lengths, sort_tokens=work.settings.sort_tokens,
                         storage_options=self.storage_options)
        if work.modality == "image":
            task.rows = {i: int(work.rows[i]) for i in positions}
            task.images = RowImages(work.dataset.images, sorted(set(task.rows.values())))
            task.tokens_per_image = work.tokens_per_image
        else:
            task.encoded = work.encoded.subset(positions)
        return task


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def _result(future):
    from distributed.scheduler import KilledWorker

    try:
        return future.result()
    except KilledWorker as error:
        raise InputError(f"dask workers kept dying while running {future.key} ({error}); check the workers' memory "
                         "(each holds the backbone and a few blocks) and their logs") from None


def store_location(out: str) -> str:
    """Local paths become absolute (workers may run elsewhere in the tree); URLs stay as given."""
    return out if "://" in out else os.path.abspath(out)


def extract_distributed(backbone: Backbone, dataset, settings: ExtractSettings, workers: int | None = None,
                        scheduler: str | None = None, trust_remote_code: bool = False, log=print,
                        blocks_per_task: int | None = None, before_write=None, torch_threads: int | None = None) -> str:
    """`extract` with the forward passes on a dask cluster; returns 'complete' or 'written' as `extract` does.

    workers: start a LocalCluster of this many one-thread worker processes; scheduler: use the cluster at
    this address instead. The store must be reachable from every worker (shared storage or an fsspec URL);
    so must the backbone folder. blocks_per_task: default a few, so each worker gets several tasks.
    torch_threads: per worker, set once when it first loads the backbone (a worker process is reused);
    default: its host's CPUs shared among the workers there.
    """
    check_cluster_options(workers, scheduler)
    if workers is None and not scheduler:
        raise InputError("give --workers N or --scheduler ADDRESS for a distributed extraction")
    settings = dataclasses.replace(settings, out=store_location(settings.out))
    device = device_kind("auto") if settings.device == "auto" else settings.device  # bare cuda: spread (worker_device)
    spec = BackboneSpec(str(Path(backbone.path).resolve()), trust_remote_code, device, backbone.weights_sha256,
                        backbone.image_size)
    connection = Connection(workers, scheduler)
    try:
        if scheduler:
            connection.client  # an unreachable scheduler fails now, before any tokenizing or writing
        runner = DaskSplitRunner(connection, settings.out, spec, blocks_per_task, before_write, torch_threads)
        return extract(backbone, dataset, settings, log, run_split=runner)
    finally:
        connection.close()
