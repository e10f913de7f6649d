"""Stage two's read speed from an S3 store against the same store on local disk, in one run.

The store (made by `pipeline extract` from MiniLM on --rows movie snippets, or copied from --store) is uploaded to
moto's S3 server, started here on 127.0.0.1 (tests/s3_server.py). Then, for the reader's default read-ahead and for
each --buffer-mb, one epoch of the training split is read with the reader `pipeline fit` uses
(`stages.training.fit.train_batches`: shuffled, batch 32) from local disk and from S3, alternating, best of --repeats
each. Printed per budget: samples/s of each and the ratio remote/local (goal: >= 0.8 at the default on loopback),
on loopback and with each --latency-ms added before every S3 request (a simulated far bucket). Reading alone is the
worst case: a training step costs far more than reading its batch, and the read-ahead runs on a thread of its own.
So last, for each of --fit-methods, `pipeline fit` (the fastest of 3 epochs) at the default budget from each place (a process
each, the S3 one with --storage-option endpoint_url=...): training samples/s and their ratio.

What a real network needs: to keep a link busy, the bytes in flight must cover latency x throughput, e.g.
20 ms x 100 MB/s = 2 MB. The reader's budget (`--buffer-mb`; default min(48 MB, two buffers of two blocks of the
selected layers)) is half served, half read ahead on a background thread while the current half is served; the read
ahead sends one request per selected layer (and scale array) of a piece's span, all at once. So the bytes in flight
are about half the budget: give --buffer-mb >= 2 x latency x throughput (4 MB for 20 ms x 100 MB/s; 20 MB for
100 ms x 100 MB/s). A smaller budget also cuts a block into pieces smaller than a shard, and each piece then costs
an index request plus one request per chunk and layer.

    python bench/remote_read.py                                    # build a 1,500-row MiniLM store first
    python bench/remote_read.py --store /work/scratch/m1500.zarr   # copy this store (it is not modified)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.s3_server import CREDENTIALS, start_server  # noqa: E402

LATENCY_S, THROUGHPUT_MB_S = 0.020, 100  # the example in the docstring and the printout


def build_store(out: Path, rows: int) -> None:
    command = [sys.executable, "-m", "cachetune.pipeline.cli", "extract", "--backbone", "minilm", "--data", "movies",
               "--max-samples", str(rows), "--out", str(out)]
    print("building:", " ".join(command[2:]), flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        sys.exit(f"extract failed:\n{result.stderr[-2000:]}")


def upload(local: Path, endpoint: str) -> str:
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).put(str(local), "bench/store.zarr",
                                                                          recursive=True)
    return "s3://bench/store.zarr"


@contextmanager
def latency(seconds: float):
    """Every request zarr makes to an fsspec store (S3 here) waits `seconds` first: a round trip to a far bucket."""
    import asyncio

    from zarr.storage import FsspecStore

    get = FsspecStore.get

    async def delayed_get(self, *args, **kwargs):
        await asyncio.sleep(seconds)
        return await get(self, *args, **kwargs)

    FsspecStore.get = delayed_get if seconds else get
    try:
        yield
    finally:
        FsspecStore.get = get


def epoch_seconds(reader, buffer_mb: float | None, epoch: int) -> float:
    """Seconds to read one training epoch as `fit` does (the batches are collated, nothing trains)."""
    from cachetune.stages.runtime import Runtime
    from cachetune.stages.training.fit import FitSettings, train_batches

    settings = FitSettings(buffer_mb=buffer_mb)
    started = time.perf_counter()
    for _ in train_batches(reader, settings, epoch, Runtime.resolve("cpu", "fp32")):
        pass
    return time.perf_counter() - started


def fit_rate(cache: str, method: str, options: list[str], work: Path) -> float:
    """Training samples/s of `pipeline fit --method METHOD` on `cache`, its fastest of three epochs (metrics.json's
    history: an epoch of the probe is a fraction of a second, where one run's hiccup would decide)."""
    import json

    out = work / f"{method}-{'s3' if '://' in cache else 'local'}"
    command = [sys.executable, "-m", "cachetune.pipeline.cli", "fit", "--cache", cache, "--method", method,
               "--epochs", "3", "--out", str(out), *options]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"fit failed:\n{result.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["train_samples"] / min(epoch["seconds"] for epoch in metrics["history"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="copy this store instead of building one (it is not modified)")
    parser.add_argument("--rows", type=int, default=1500,
                        help="movie rows of the store built without --store [default: 1500]")
    parser.add_argument("--buffer-mb", default="8,24,48,96",
                        help="comma list of read-ahead budgets (MB) measured beside the default [default: 8,24,48,96]")
    parser.add_argument("--repeats", type=int, default=3,
                        help="epochs per budget and place; the fastest counts [default: 3]")
    parser.add_argument("--latency-ms", default="0,20",
                        help="comma list of delays (ms) added before each S3 request (0: loopback) [default: 0,20]")
    parser.add_argument("--fit-methods", default="linear,unipt",
                        help="methods to train 3 epochs each from local disk and from S3 (comma list; none: skip) "
                             "[default: linear,unipt]")
    args = parser.parse_args()
    os.environ.update({**CREDENTIALS, "HF_HUB_OFFLINE": "1"})
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)

    from cachetune.cache.reader import CacheReader
    from cachetune.cache.storage_options import storage_options

    with tempfile.TemporaryDirectory(prefix="remote-read-") as folder:
        local = Path(folder) / "store.zarr"
        if args.store:
            shutil.copytree(args.store, local)
        else:
            build_store(local, args.rows)
        server, endpoint = start_server()
        try:
            url = upload(local, endpoint)
            with storage_options([url], {"endpoint_url": endpoint}):
                readers = {"local": CacheReader(str(local), "train"), "s3": CacheReader(url, "train")}
                samples = len(readers["local"])
                default_mb = readers["local"].default_buffer_bytes / 2**20
                print(f"store: {samples} training samples, {len(readers['local'].layers)} layers, "
                      f"{readers['local'].token_bytes} bytes per token; default read-ahead budget {default_mb:.0f} MB "
                      f"(half of it read ahead)")
                print(f"{'latency ms':>10} {'--buffer-mb':>12} {'local samples/s':>16} {'s3 samples/s':>13} "
                      f"{'s3/local':>9}")
                budgets = [None] + [float(mb) for mb in args.buffer_mb.split(",") if mb]
                for where, reader in readers.items():  # warm: connections, page cache, metadata
                    epoch_seconds(reader, None, 0)
                for latency_ms in (float(ms) for ms in args.latency_ms.split(",") if ms):
                    with latency(latency_ms / 1000):
                        for budget in budgets:
                            best = {where: float("inf") for where in readers}
                            for epoch in range(args.repeats):
                                for where, reader in readers.items():
                                    best[where] = min(best[where], epoch_seconds(reader, budget, epoch))
                            local_rate, remote_rate = samples / best["local"], samples / best["s3"]
                            label = f"{default_mb:.0f} (default)" if budget is None else f"{budget:g}"
                            print(f"{latency_ms:10g} {label:>12} {local_rate:16.0f} {remote_rate:13.0f} "
                                  f"{remote_rate / local_rate:9.2f}", flush=True)
            methods = [m for m in args.fit_methods.split(",") if m and m != "none"]
            if methods:
                print(f"\n{'pipeline fit':>12} {'local samples/s':>16} {'s3 samples/s':>13} {'s3/local':>9}  "
                      "(fastest of 3 epochs each, default read-ahead, loopback)")
            for method in methods:
                local_rate = fit_rate(str(local), method, [], Path(folder))
                remote_rate = fit_rate(url, method, ["--storage-option", f"endpoint_url={endpoint}"], Path(folder))
                print(f"{method:>12} {local_rate:16.1f} {remote_rate:13.1f} {remote_rate / local_rate:9.2f}", flush=True)
        finally:
            server.terminate()
            server.wait(10)
    in_flight = LATENCY_S * THROUGHPUT_MB_S
    print(f"A real network needs bytes in flight >= latency x throughput ({LATENCY_S * 1000:.0f} ms x "
          f"{THROUGHPUT_MB_S} MB/s = {in_flight:g} MB). The reader reads half its --buffer-mb budget ahead (all of a "
          f"piece's layers at once), so give --buffer-mb >= 2 x latency x throughput ({2 * in_flight:g} MB here; "
          f"100 ms x 100 MB/s: 20 MB). Loopback has next to no latency; moto's server shares this machine's CPUs.")


if __name__ == "__main__":
    main()
