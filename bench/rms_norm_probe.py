"""Linear probes on single SmolLM2 layers, raw against RMS-normalised (stages.methods.base.rms_normalize), pooled by
the last real token and by the masked mean; 3 seeds, AdamW lr 1e-3, 20 epochs, on a cache made by `pipeline extract
--backbone smollm2 --layers all`. Shows where the massive activations sit (max |x| of the pooled vectors) and what
normalising changes. Cheap stand-in for bench/rms_norm.py when the machine cannot afford full side networks.

    python bench/rms_norm_probe.py    # reads artifacts/smol/features.zarr
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from torch.nn import functional as F
from cachetune.cache.reader import CacheReader
from cachetune.stages.methods.base import pool, rms_normalize
torch.manual_seed(0)
LAYERS = [6, 12, 16, 20, 24, 28, 29]
def pooled(split):
    reader = CacheReader("artifacts/smol/features.zarr", split, layers=LAYERS)
    xs, ys = [], []
    for batch in reader.batches(batch_size=100):
        f = batch.features.float()
        xs.append(torch.stack([torch.stack([pool(f[:, k], batch.mask, mode), pool(rms_normalize(f[:, k]), batch.mask, mode)], 1) for k in range(len(LAYERS)) for mode in ("last", "mean")], 1))
        ys.append(torch.as_tensor(batch.labels))
    return torch.cat(xs), torch.cat(ys)
t0 = time.time()
train, ytr = pooled("train"); test, yte = pooled("test")
print("read", round(time.time() - t0), "s", train.shape)
for slot, (layer, mode) in enumerate([(l, m) for l in LAYERS for m in ("last", "mean")]):
    row = []
    for normed in (0, 1):
        accs = []
        for seed in range(3):
            torch.manual_seed(seed)
            head = torch.nn.Linear(576, 2)
            opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
            x = train[:, slot, normed]
            for epoch in range(20):
                for idx in torch.randperm(len(x)).split(32):
                    loss = F.cross_entropy(head(x[idx]), ytr[idx]); opt.zero_grad(); loss.backward(); opt.step()
            accs.append((head(test[:, slot, normed]).argmax(1) == yte).float().mean().item())
        row.append(sum(accs) / 3)
    print(f"H_{layer} {mode:4s} max|x| {train[:, slot, 0].abs().max():8.0f}  raw {row[0]:.3f}  rms {row[1]:.3f}  diff {row[1]-row[0]:+.3f}", flush=True)
