"""`--layers all | last:K | 0,3,6` -> hidden_states indices (0 = embeddings output, L = last layer)."""
from __future__ import annotations

from cache.errors import InputError


def parse_layers(spec: str, num_layers: int) -> list[int]:
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers + 1))
    if spec.startswith("last:"):
        count = spec[5:]
        if not count.isdigit() or not 1 <= int(count) <= num_layers + 1:
            raise InputError(f"--layers {spec}: K must be 1..{num_layers + 1} for this backbone ({num_layers} layers + embeddings)")
        return list(range(num_layers + 1 - int(count), num_layers + 1))
    try:
        indices = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise InputError(f"--layers {spec!r}: use all, last:K or a comma list of indices such as 0,3,6") from None
    bad = [i for i in indices if not 0 <= i <= num_layers]
    if bad or not indices:
        raise InputError(f"--layers {spec}: index {bad[0] if bad else '?'} out of range; this backbone has "
                         f"hidden_states 0..{num_layers} (0 = embeddings)")
    return indices
