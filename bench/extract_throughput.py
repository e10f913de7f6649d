"""Extraction throughput against bare forward loops measured in the same run, and cache size.

Rows, all over the same first --samples movie snippets, same batch size, max length and device, each timed
from the texts (tokenizing included) to the last result on the host:
  padded   bare `model(**batch, output_hidden_states=True)`, file order, padded to --max-length
  sorted   bare forward over length-sorted batches padded to the batch's longest (the honest baseline)
  +copies  the sorted loop, also copying each layer's real tokens to the host as float16
  extract  `pipeline extract` (stages.extraction.extract.extract) into a fresh store, once per --dtypes entry; also
           shown without its start-up (everything before the first forward batch)
Ratios are against `sorted` and `+copies`. --write-only replaces the backbone by random tensors of the
backbone's shapes, so the write path (batching, gather, cast, copies, compression, checksums, disk) is timed
alone, once per codec, in GB/s of stored features and samples/s.

    python bench/extract_throughput.py --samples 2000 --max-length 128 --skip-padded
    python bench/extract_throughput.py --device cuda --batch-size 128 --samples 10568
    python bench/extract_throughput.py --write-only --samples 10568 --codecs lz4,none
    python bench/extract_throughput.py --samples 2000 --skip-padded --dtypes float16,fp8,int8   # 8-bit encoding's cost
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cachetune.cache.info import describe_store  # noqa: E402
from cachetune.pipeline.data import load_dataset, load_movies  # noqa: E402
from cachetune.stages.extraction import extract as extract_module  # noqa: E402
from cachetune.stages.backbones import Backbone, load_backbone  # noqa: E402
from cachetune.stages.extraction.extract import ExtractSettings, extract  # noqa: E402
from cachetune.stages.extraction.layer_selection import parse_layers  # noqa: E402
from cachetune.stages.runtime import Runtime  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def padded_loop(backbone, texts, batch_size, max_length, device, layers, precision="fp32") -> None:
    for first in range(0, len(texts), batch_size):
        batch = backbone.tokenizer(texts[first:first + batch_size], truncation=True, max_length=max_length,
                                   padding="max_length", return_tensors="pt").to(device)
        with torch.inference_mode(), Runtime(torch.device(device), precision).autocast():
            backbone.model(**batch, output_hidden_states=True)
    synchronize(device)


def sorted_loop(backbone, texts, batch_size, max_length, device, layers, copies=False, precision="fp32") -> None:
    """Length-sorted batches, padded to each batch's longest; with copies, real tokens to the host in float16."""
    encoded = backbone.tokenizer(texts, truncation=True, max_length=max_length)
    order = np.argsort([-len(ids) for ids in encoded["input_ids"]], kind="stable")
    kept = []
    for first in range(0, len(texts), batch_size):
        features = [{name: values[i] for name, values in encoded.items()} for i in order[first:first + batch_size]]
        batch = backbone.tokenizer.pad(features, return_tensors="pt").to(device)
        with torch.inference_mode():
            with Runtime(torch.device(device), precision).autocast():
                hidden = backbone.model(**batch, output_hidden_states=True).hidden_states
            if copies:
                mask = batch["attention_mask"].bool()
                kept.append([hidden[i][mask].to(torch.float16).cpu() for i in layers])
    synchronize(device)


class RandomEncoder(torch.nn.Module):
    """Stands in for the backbone: returns fixed random hidden states of the backbone's shapes (contiguous
    views, as a real model's are), costing no compute."""

    def __init__(self, config, batch_size: int, max_length: int):
        super().__init__()
        self.config = config
        self.register_buffer("states", torch.randn(config.num_hidden_layers + 1, batch_size * max_length * config.hidden_size))

    def forward(self, input_ids, output_hidden_states=True, **_):
        shape = (*input_ids.shape, self.config.hidden_size)
        return types.SimpleNamespace(hidden_states=tuple(s[:int(np.prod(shape))].view(shape) for s in self.states))


def timed(function, *args, **kwargs) -> float:
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started


def timed_extract(backbone, dataset, settings) -> tuple[float, float]:
    """(seconds end to end, seconds before the first forward batch) of `extract` into a fresh store."""
    first_batch = []
    original = extract_module.split_forward

    def watched(*args):
        forward = original(*args)

        def first(samples):
            if not first_batch:
                first_batch.append(time.perf_counter())
            return forward(samples)

        return first

    extract_module.split_forward = watched
    try:
        started = time.perf_counter()
        extract(backbone, dataset, settings, log=lambda *_: None)
        synchronize(torch.device(settings.device))
        return time.perf_counter() - started, first_batch[0] - started
    finally:
        extract_module.split_forward = original


def write_table(folder: Path, texts, labels, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "movies.csv"
    with open(table, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, (names[y] for y in labels)))
    return table


def write_only(args, backbone, dataset, folder: Path, n: int) -> None:
    fake = Backbone(backbone.path, RandomEncoder(backbone.model.config, args.batch_size, args.max_length).eval(),
                    backbone.tokenizer, "random-" + backbone.weights_sha256, backbone.pooling)
    print(f"write path alone: backbone replaced by random tensors of {args.backbone}'s shapes "
          f"({backbone.num_layers + 1} hidden states x {backbone.hidden_size}), layers {args.layers}, device {args.device}")
    for codec, dtype in ((c, d) for c in args.codecs.split(",") for d in args.dtypes.split(",")):
        settings = ExtractSettings(out=str(folder / f"w-{codec}-{dtype}.zarr"), layers=args.layers, max_length=args.max_length,
                                   batch_size=args.batch_size, device=args.device, codec=codec, dtype=dtype)
        seconds, startup = timed_extract(fake, dataset, settings)
        facts = describe_store(settings.out)
        stored = facts["real_tokens"] * len(facts["layers"]) * backbone.hidden_size * 2
        steady = seconds - startup
        print(f"  codec {codec:4s} {dtype:7s}: {n / seconds:9.1f} samples/s, {stored / seconds / 1e9:6.3f} GB/s of float16 features "
              f"end to end ({seconds:.1f} s); without start-up ({startup:.1f} s): {n / steady:9.1f} samples/s, "
              f"{stored / steady / 1e9:6.3f} GB/s; {facts['bytes_on_disk'] / 1e6:.1f} MB on disk "
              f"({facts['bytes_on_disk'] / stored:.3f} of raw)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--samples", type=int, default=2000, help="first N movie snippets")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="the forward pass of every row (autocast)")
    parser.add_argument("--codec", default="lz4", help="for `pipeline extract`")
    parser.add_argument("--dtypes", default="float16",
                        help="comma list of stored dtypes (float16, float32, int8, fp8): one `pipeline extract` row each; "
                             "with --write-only, one row per codec and dtype")
    parser.add_argument("--rounds", type=int, default=4, help="rows take turns on this many parts of the texts")
    parser.add_argument("--skip-padded", action="store_true", help="leave out the padded loop (slow on a CPU)")
    parser.add_argument("--write-only", action="store_true", help="time the write path alone, backbone replaced")
    parser.add_argument("--codecs", default="lz4,zstd,none", help="with --write-only")
    args = parser.parse_args()

    texts, labels, names = load_movies()
    texts, labels = texts[:args.samples], labels[:args.samples]
    n, device = len(texts), torch.device(args.device)
    backbone = load_backbone(args.backbone)
    backbone.model.to(device)
    layers = parse_layers(args.layers, backbone.num_layers)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if args.write_only:
            dataset = load_dataset(str(write_table(folder, texts, labels, names)))
            return write_only(args, backbone, dataset, folder, n)
        sorted_loop(backbone, texts[:args.batch_size], args.batch_size, args.max_length, device, layers, True)  # warm-up
        # Rows take turns on R consecutive parts of the texts (the order rotating each round), so a machine whose
        # load changes over minutes slows every row alike; each row's time is its sum over the rounds.
        parts = np.array_split(np.arange(n), args.rounds)
        dtypes = args.dtypes.split(",")
        extracts = {f"extract {dtype}": dtype for dtype in dtypes}  # row name -> dtype
        total = {name: 0.0 for name in (["padded"] if not args.skip_padded else []) + ["sorted", "+copies", *extracts]}
        startup, size = dict.fromkeys(dtypes, 0.0), {}
        for round_, part in enumerate(parts):
            chunk = [texts[i] for i in part]
            dataset = load_dataset(str(write_table(folder / f"part{round_}", chunk, labels[part], names)))
            settings = {dtype: ExtractSettings(out=str(folder / f"f{round_}-{dtype}.zarr"), layers=args.layers,
                                               max_length=args.max_length, batch_size=args.batch_size, device=args.device,
                                               precision=args.precision, codec=args.codec, dtype=dtype) for dtype in dtypes}
            loop = (backbone, chunk, args.batch_size, args.max_length, device, layers)
            rows = {"padded": lambda: timed(padded_loop, *loop, precision=args.precision),
                    "sorted": lambda: timed(sorted_loop, *loop, precision=args.precision),
                    "+copies": lambda: timed(sorted_loop, *loop, copies=True, precision=args.precision),
                    **{f"extract {d}": (lambda d=d: timed_extract(backbone, dataset, settings[d])) for d in dtypes}}
            names_now = list(total)[round_ % len(total):] + list(total)[:round_ % len(total)]
            for name in names_now:
                result = rows[name]()
                if name in extracts:
                    result, first = result
                    startup[extracts[name]] += first
                total[name] += result
            for dtype in dtypes:
                facts = describe_store(settings[dtype].out)
                size[dtype] = {key: size.get(dtype, {}).get(key, 0) + facts[key]
                               for key in ("bytes_on_disk", "bytes_padded_fp32", "real_tokens")}
        best = total
    print(f"backbone {args.backbone}, {n} movie snippets, batch {args.batch_size}, max length {args.max_length}, "
          f"layers {args.layers}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} torch threads, precision {args.precision}, codec {args.codec}, "
          f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    labels_of = {"padded": "bare loop, padded to max length", "sorted": "bare loop, length-sorted (forward only)",
                 "+copies": "length-sorted + real tokens to host fp16",
                 **{f"extract {d}": f"pipeline extract --dtype {d} (end to end)" for d in dtypes}}
    for name in ("padded", "sorted", "+copies", *extracts):
        if name in best:
            print(f"{labels_of[name]:46s}: {n / best[name]:9.1f} samples/s ({best[name]:.1f} s)   "
                  f"x{best['sorted'] / best[name]:.2f} of sorted, x{best['+copies'] / best[name]:.2f} of +copies")
    for dtype in dtypes:
        steady = best[f"extract {dtype}"] - startup[dtype]
        print(f"{'  ' + dtype + ' without start-up':46s}: {n / steady:9.1f} samples/s ({steady:.1f} s; start-up "
              f"{startup[dtype]:.1f} s)   x{best['sorted'] / steady:.2f} of sorted, x{best['+copies'] / steady:.2f} of +copies")
    for dtype in dtypes:
        bytes_ = size[dtype]
        print(f"cache bytes on disk, {dtype}: {bytes_['bytes_on_disk'] / 1e6:.1f} MB for {len(layers)} layers, "
              f"{bytes_['real_tokens']} real tokens; padded float32 at max length: {bytes_['bytes_padded_fp32'] / 1e6:.1f} MB "
              f"(ratio {bytes_['bytes_on_disk'] / bytes_['bytes_padded_fp32']:.3f})")


if __name__ == "__main__":
    main()
