"""Scales on a decoder's cache: per-layer RMS of the cached residual stream (median over real tokens, at the last
token) and its largest |x|; per method, the logits at init, the scale of what sherl feeds its frozen late layer and
of what synqt's queries are at each layer beside the stream's own; then the training loss of the first steps (AdamW
lr 1e-3, batch 32, gradient clipping at 1, no warm-up).

    python bench/decoder_scales.py STORE [METHODS] [STEPS] [lr=1e-3]
    python bench/decoder_scales.py artifacts/gemma/small/features.zarr linear,sherl,synqt,utuning,unipt 12
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.nn import functional as F

from cachetune.cache.reader import CacheReader, open_store
from cachetune.stages.methods import build_model, config_from_options
from cachetune.stages.methods.base import pool
from cachetune.stages.training.fit import spec_from_store

store = sys.argv[1]
methods = sys.argv[2].split(",") if len(sys.argv) > 2 else ["linear", "unipt", "utuning", "sherl", "synqt", "lst"]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 15
extra = dict(kv.split("=") for kv in sys.argv[4].split(",")) if len(sys.argv) > 4 and sys.argv[4] else {}
root = open_store(store)
spec = spec_from_store(root)
reader = CacheReader(store, "train")
batches = list(reader.batches(32, shuffle=True, seed=0))
first = batches[0]
states = first.hidden_states()
L = spec.num_layers
print("layer: median per-token RMS, last-token RMS median, max |x|")
for l in range(L + 1):
    h = states.layer(l)
    real = h[first.mask]
    rms = real.pow(2).mean(-1).sqrt()
    last = pool(h, first.mask, "last").pow(2).mean(-1).sqrt()
    print(f"H_{l}: {rms.median():.1f} {last.median():.1f} {real.abs().max():.0f}")

torch.manual_seed(0)
for method in methods:
    config = config_from_options(method, {k: v for k, v in extra.items() if k in config_from_options(method, {}).to_dict()})
    model = build_model(config, spec)
    layers = type(model).required_layers(config, spec)
    cols = [spec.cached_layers.index(l) for l in layers]
    model.eval()
    with torch.no_grad():
        s = first.hidden_states().select(cols)
        logits = model(s, first.mask)
        print(f"\n{method}: init logits std {logits.std():.3f}, max |logit| {logits.abs().max():.2f}")
        if method == "sherl":
            last = s.layer(-1)
            scale = model.frozen.stream_scale(last)  # None where the family feeds E' at unit scale
            restored = model.out(model.merge(s, last)) * (1 if scale is None else scale)
            out = model.frozen(restored, first.mask)
            raw = model.frozen(last, first.mask)
            r = lambda x: x[first.mask].pow(2).mean(-1).sqrt().median().item()  # noqa: E731
            print(f"  sherl feeds E' at RMS {r(restored):.2f}; H_(L-1) RMS {r(last):.1f}; late(restored) RMS {r(out):.2f};"
                  f" late(H_(L-1)) RMS {r(raw):.2f}; pooled late(restored) {pool(out, first.mask, 'last').pow(2).mean(-1).sqrt().median():.2f}")
        if method == "synqt":
            from cachetune.stages.methods.synqt import masked_mean
            previous = masked_mean(s.layer(0), first.mask)
            for i, syn in enumerate(model.synthesis):
                seed = model.queries[i].expand(32, -1, -1) + model.feature_scale * previous[:, None]
                scale = model.frozen.stream_scale(s.layer(i))
                scale = 1 if scale is None else pool(scale, first.mask, "last")[:, None]
                qin = syn(seed) * scale
                q, h, hh = (x / scale for x in model.frozen.query_pass(i, qin, s.layer(i), first.mask))
                previous = q.mean(1)
                if i % 3 == 0 or i == L - 1:
                    rr = lambda x: x.pow(2).mean(-1).sqrt().median().item()  # noqa: E731
                    print(f"  layer {i + 1}: queries fed at RMS {rr(qin):.2f}, h {rr(h):.1f}, hh {rr(hh):.1f}, Q_out {rr(q):.1f} (h, hh, Q_out back at unit scale where fed scaled);"
                          f" stream H_{i} RMS {s.layer(i)[first.mask].pow(2).mean(-1).sqrt().median():.1f}")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=float(extra.get("lr", 1e-3)), weight_decay=0.01)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        s = batch.hidden_states().select(cols)
        loss = F.cross_entropy(model(s, batch.mask), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(loss.item())
    print(f"  {method} first {steps} steps loss: " + " ".join(f"{x:.2f}" for x in losses))
