"""SHERL or SynQT on a wide-stream backbone (Gemma 3) with the family adapter's two scale hooks on or off: a short run
of N optimizer steps (AdamW 1e-3, 10% warm-up then linear decay, batch 32, gradient clipping 1.0, as `fit`), the
mean training loss every 10 steps, then validation accuracy on the first 512 or so rows. One seed; for telling a
method that learns from one that does not, not for final accuracy (use `pipeline sweep --seeds`).

Variants: cur (the adapter as it is), noscale (no `stream_scale`), nohead (`head_input` the identity), none (both
off). BENCHMARKS.md, "Gemma 3 270M at 2,000 training rows".

    METHOD=synqt python bench/wide_stream_variants.py artifacts/gemma/big/features.zarr noscale 60
"""
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cachetune.cache.reader import CacheReader, open_store  # noqa: E402
from cachetune.stages.families.decoder import GEMMA3  # noqa: E402
from cachetune.stages.methods import build_model, config_from_options  # noqa: E402
from cachetune.stages.training.fit import spec_from_store  # noqa: E402


def main(store: str, variant: str, steps: int, method: str) -> None:
    if variant in ("noscale", "none"):
        GEMMA3.stream_scale = lambda hidden: None
    if variant in ("nohead", "none"):
        GEMMA3.head_input = lambda pooled: pooled
    spec = spec_from_store(open_store(store))
    torch.manual_seed(0)
    config = config_from_options(method, {})
    model = build_model(config, spec)
    layers = type(model).required_layers(config, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    warm = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / (steps - warm)))
    started, losses, epoch = time.time(), [], 0
    while len(losses) < steps:
        for batch in CacheReader(store, "train").batches(32, shuffle=True, seed=epoch):
            model.train()
            loss = F.cross_entropy(model(batch.hidden_states().select(layers), batch.mask), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if len(losses) % 10 == 0:
                print(f"{method} {variant} step {len(losses)}: mean loss of the last 10 {sum(losses[-10:]) / 10:.3f} "
                      f"({time.time() - started:.0f} s)", flush=True)
            if len(losses) >= steps:
                break
        epoch += 1
    model.eval()
    right = seen = 0
    with torch.no_grad():
        for batch in CacheReader(store, "validation").batches(64):
            right += (model(batch.hidden_states().select(layers), batch.mask).argmax(-1) == batch.labels).sum().item()
            seen += len(batch.labels)
            if seen >= 512:
                break
    print(f"{method} {variant}: validation accuracy {right / seen:.4f} on {seen} rows", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), os.environ.get("METHOD", "synqt"))
