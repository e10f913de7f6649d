"""Training-step speed and peak RSS of one side network under a glibc mmap/trim threshold (0: glibc's defaults).

Each setting must run in a fresh process (mallopt cannot be undone), so run the script once per setting:

    for mb in 0 1 64; do python bench/allocator.py --cache artifacts/features.zarr --method sherl --threshold-mb $mb; done
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="artifacts/features.zarr")
    parser.add_argument("--method", default="sherl")
    parser.add_argument("--set", dest="pairs", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threshold-mb", type=int, default=64, help="mmap and trim threshold; 0 leaves glibc's defaults")
    parser.add_argument("--samples", type=int, default=1600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.threshold_mb:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        for option, value in ((-3, args.threshold_mb << 20), (-1, args.threshold_mb << 20), (-8, 2)):
            libc.mallopt(option, value)

    import torch

    from cachetune.cache.reader import CacheReader, open_store
    from cachetune.stages.memory import current_rss_mb, peak_rss_mb, reset_peak
    from cachetune.stages.methods import build_model, config_from_options
    from cachetune.stages.runtime import CPU
    from cachetune.stages.training.evaluate import side_inputs
    from cachetune.stages.training.fit import required_layers, spec_from_store
    from cachetune.stages.training.training_loop import Learner, Schedule

    torch.set_num_threads(args.threads)
    spec = spec_from_store(open_store(args.cache))
    config = config_from_options(args.method, dict(pair.split("=", 1) for pair in args.pairs))
    reader = CacheReader(args.cache, "train", required_layers(config, spec, args.cache), limit=args.samples)
    torch.manual_seed(0)
    model = build_model(config, spec)
    learner = Learner(lambda inputs: model(*inputs), [p for p in model.parameters() if p.requires_grad], model,
                      lambda: {}, Schedule(1, 32, 1e-3, 0.01, 0.1, 0), len(reader), "classification")
    learner.start_epoch()
    reset_peak()
    start, began = current_rss_mb(), time.perf_counter()
    for batch in reader.batches(32, shuffle=True, seed=0):
        learner.step(side_inputs(batch, CPU), batch.labels)
    print(f"{args.method}, threshold {args.threshold_mb or 'glibc default'} MB, {args.threads} threads: "
          f"{len(reader) / (time.perf_counter() - began):.1f} samples/s, peak {peak_rss_mb() - start:.0f} MB above start")


if __name__ == "__main__":
    main()
