"""Extraction throughput and cache size against the obvious baseline, measured in one run.

Baseline: a bare `model(**batch, output_hidden_states=True)` loop over the same samples in their
file order, padded to --max-length, same batch size, results kept in memory (nothing written).
Ours: `pipeline extract` on the same samples: length-sorted batches within blocks, float16,
compressed, checksummed, written on a background thread. Also: cache bytes on disk against the
same features padded to --max-length in float32.

    python bench/extract_throughput.py --samples 2000 --max-length 128
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cache.info import describe_store  # noqa: E402
from pipeline.data import load_dataset, load_movies  # noqa: E402
from stages.backbones import load_backbone  # noqa: E402
from stages.extract import ExtractSettings, extract  # noqa: E402


def bare_loop(backbone, texts, batch_size, max_length) -> float:
    started = time.perf_counter()
    kept = 0
    for first in range(0, len(texts), batch_size):
        batch = backbone.tokenizer(texts[first:first + batch_size], truncation=True, max_length=max_length,
                                   padding="max_length", return_tensors="pt")
        with torch.inference_mode():
            hidden = backbone.model(**batch, output_hidden_states=True).hidden_states
        kept += sum(h.numel() for h in hidden)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--samples", type=int, default=2000, help="first N movie snippets")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    texts, labels, names = load_movies()
    texts, labels = texts[:args.samples], labels[:args.samples]
    backbone = load_backbone(args.backbone)
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / "movies.csv"
        with open(table, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["text", "label"])
            writer.writerows(zip(texts, (names[y] for y in labels)))
        dataset = load_dataset(str(table))
        baseline_seconds = bare_loop(backbone, texts, args.batch_size, args.max_length)
        settings = ExtractSettings(out=str(Path(folder) / "f.zarr"), max_length=args.max_length, batch_size=args.batch_size)
        started = time.perf_counter()
        extract(backbone, dataset, settings, log=lambda *_: None)
        ours_seconds = time.perf_counter() - started
        facts = describe_store(settings.out)
    n = len(texts)
    print(f"backbone {args.backbone}, {n} movie snippets, batch {args.batch_size}, max length {args.max_length}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"bare loop, padded to max length : {n / baseline_seconds:8.1f} samples/s ({baseline_seconds:.1f} s)")
    print(f"pipeline extract (incl. writing): {n / ours_seconds:8.1f} samples/s ({ours_seconds:.1f} s)")
    print(f"throughput ratio ours / bare     : {baseline_seconds / ours_seconds:8.2f}x   (goal >= 1.0)")
    print(f"cache bytes on disk              : {facts['bytes_on_disk'] / 1e6:8.1f} MB for {len(facts['layers'])} layers, "
          f"{facts['real_tokens']} real tokens")
    print(f"padded float32 at max length     : {facts['bytes_padded_fp32'] / 1e6:8.1f} MB")
    print(f"size ratio cache / padded fp32   : {facts['ratio_to_padded_fp32']:8.3f}    (goal <= 0.15)")


if __name__ == "__main__":
    main()
