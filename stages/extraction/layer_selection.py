"""`--layers all | last:K | every:K | for:METHOD,... | 0,3,6` -> hidden_states indices (0 = embeddings output,
L = last layer)."""
from __future__ import annotations

from cachetune.cache.errors import InputError

FORMS = "all, last:K, every:K, for:METHOD[,METHOD...] or a comma list of indices such as 0,3,6"


def layers_for_methods(names: list[str], num_layers: int, hidden_size: int) -> list[int]:
    """The union of the layers the named methods read at their defaults on a backbone of `num_layers` layers of
    width `hidden_size` (each method's `required_layers(config, spec)`)."""
    from cachetune.stages.methods import FeatureSpec, get_method, method_names

    unknown = [name for name in names if name not in method_names()]
    if unknown or not names:
        raise InputError(f"--layers for:{','.join(names)}: unknown method {unknown[0] if unknown else '(none)'}; "
                         f"the methods are {', '.join(method_names())}")
    spec = FeatureSpec(hidden_size=hidden_size, num_layers=num_layers, num_labels=2, pooling="cls", backbone_path="",
                       cached_layers=tuple(range(num_layers + 1)))
    needed = set()
    for name in names:
        method = get_method(name)
        needed.update(method.model_class.required_layers(method.config_class(), spec))
    return sorted(needed)


def parse_layers(spec: str, num_layers: int, hidden_size: int | None = None) -> list[int]:
    """Raises InputError for a form that is not one of FORMS or an index outside 0..num_layers."""
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers + 1))
    if spec.startswith("for:"):
        return layers_for_methods([name.strip() for name in spec[4:].split(",") if name.strip()], num_layers,
                                  hidden_size or 0)
    if spec.startswith("every:"):  # H_0, H_K, H_2K, ..., and always H_L
        step = spec[6:]
        if not step.isdigit() or not 1 <= int(step) <= num_layers:
            raise InputError(f"--layers {spec}: K must be a whole number 1..{num_layers} for this backbone ({num_layers} layers)")
        return sorted(set(range(0, num_layers + 1, int(step))) | {num_layers})
    if spec.startswith("last:"):
        count = spec[5:]
        if not count.isdigit() or not 1 <= int(count) <= num_layers + 1:
            raise InputError(f"--layers {spec}: K must be a whole number 1..{num_layers + 1} for this backbone "
                             f"({num_layers} layers + embeddings)")
        return list(range(num_layers + 1 - int(count), num_layers + 1))
    try:
        listed = [int(part) for part in spec.split(",")]  # int() takes surrounding spaces; an empty item is refused
    except ValueError:
        raise InputError(f"--layers {spec!r}: use {FORMS}") from None
    repeated = sorted({i for i in listed if listed.count(i) > 1})
    if repeated:
        raise InputError(f"--layers {spec}: layer {repeated[0]} is listed twice; list each layer once")
    indices = sorted(listed)
    bad = [i for i in indices if not 0 <= i <= num_layers]
    if bad:
        raise InputError(f"--layers {spec}: index {bad[0]} out of range; this backbone has "
                         f"hidden_states 0..{num_layers} (0 = embeddings)")
    return indices
