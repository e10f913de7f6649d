"""Does a loaded checkpoint fit the architecture config.json describes?

transformers builds the model from config.json, fills it with the checkpoint's tensors, gives every tensor the
checkpoint lacks random values, and only logs a report. A wrapper's key prefix (`module.`, `model.`), a renamed or a
dropped tensor would then give a complete store of random features. `check_checkpoint_fits` reads transformers' own
report (`from_pretrained(..., output_loading_info=True)`) and refuses, in one line, a tensor of another shape or a
missing tensor that the hidden states depend on. A missing tensor they never use is fine (a pooler or a task head
left out of a headless save), and so are unexpected ones (a task head, an LM head, a two-tower checkpoint's other
tower): the backbone is loaded headless.
"""
from __future__ import annotations

from collections import Counter

import torch

from cachetune.cache.errors import InputError


def check_checkpoint_fits(model, loading: dict, folder) -> None:
    """Raises InputError when the checkpoint at `folder` does not fit `model`, which from_pretrained built from it
    (with `output_loading_info=True, ignore_mismatched_sizes=True`; `loading` is that report: sets of
    missing_keys, unexpected_keys, and (name, checkpoint shape, model shape) mismatched_keys). One line: how many
    tensors, an example, and the fix (strip a wrapper's key prefix, re-save an incomplete checkpoint, or use the
    config.json saved with the weights)."""
    where = f"the checkpoint at {folder} does not fit config.json's {type(model).__name__}"
    mismatched = sorted(loading.get("mismatched_keys") or (), key=lambda entry: entry[0])
    if mismatched:
        name, saved, built = mismatched[0]
        raise InputError(f"{where}: {_count(mismatched)} of another shape (e.g. {name}: {tuple(saved)} in the "
                         f"checkpoint, {tuple(built)} in the model); use the config.json saved with these weights")
    missing = used_by_hidden_states(model, loading.get("missing_keys") or ())
    if not missing:
        return
    lacks = f"{where}: {_count(missing)} missing (e.g. {missing[0]}), which would be random weights"
    unexpected = sorted(loading.get("unexpected_keys") or ())
    prefix = wrapper_prefix(missing, unexpected, model.base_model_prefix)
    if prefix:
        example = next(key for key in unexpected if key.startswith(prefix) and key.endswith(missing[0]))
        raise InputError(f"{lacks}; the checkpoint's keys carry a prefix {prefix!r} (e.g. {example}): re-save the "
                         f"weights with {prefix!r} stripped from every key")
    if not unexpected:  # nothing in their place: the save itself is incomplete
        raise InputError(f"the checkpoint at {folder} lacks {_count(missing)} the model uses (e.g. {missing[0]}), "
                         "which would be random weights: an incomplete or truncated save; re-save or re-download the "
                         "complete checkpoint")
    raise InputError(f"{lacks}, and it has {len(unexpected)} the model does not use (e.g. {unexpected[0]}); the "
                     "weights belong to another architecture: use the config.json saved with them, or re-save the "
                     "model with save_pretrained")


def _count(tensors) -> str:
    return f"{len(tensors)} tensor{'s' if len(tensors) > 1 else ''}"


def wrapper_prefix(missing: list[str], unexpected: list[str], own_prefix: str = "") -> str | None:
    """The one key prefix that turns every missing key into an unexpected one ('module.' from DataParallel,
    'model.' from a Lightning module), else None. The model's own prefix (`bert.`), which transformers accepts, is
    left out of it: 'model.bert.' gives 'model.'."""
    wanted, found = set(missing), Counter()
    for key in unexpected:
        parts = key.split(".")
        cut = next((cut for cut in range(1, len(parts)) if ".".join(parts[cut:]) in wanted), None)
        if cut is not None:
            found[".".join(parts[:cut]) + "."] += 1
    if not found:
        return None
    prefix, explained = found.most_common(1)[0]
    if explained < len(wanted):
        return None
    own = f"{own_prefix}." if own_prefix else ""
    return prefix[:-len(own)] if own and prefix.endswith("." + own) else prefix


def used_by_hidden_states(model, missing) -> list[str]:
    """The missing keys (sorted) that name parameters the model's hidden states or last_hidden_state depend on,
    found by differentiating one small forward pass with respect to those parameters only (a pooler gets no
    gradient); all of them when that pass fails. A missing buffer is not judged: models rebuild theirs from the
    config (position ids, rotary tables)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    names = sorted(key for key in missing if key in parameters)
    if not names:
        return []
    tensors = list({id(parameters[name]): parameters[name] for name in names}.values())
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.requires_grad_(False)
    for tensor in tensors:
        tensor.requires_grad_(True)
    try:
        with torch.enable_grad():
            outputs = model(**probe_inputs(model), output_hidden_states=True)
            states = [*(outputs.hidden_states or ()), getattr(outputs, "last_hidden_state", None)]
            total = sum(state.float().sum() for state in states if state is not None)
            if not total.requires_grad:
                return []
            gradients = torch.autograd.grad(total, tensors, allow_unused=True)
    except Exception:  # a model the probe cannot run: every missing parameter counts, rather than random features
        return names
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    used = {id(tensor) for tensor, gradient in zip(tensors, gradients) if gradient is not None}
    return [name for name in names if id(parameters[name]) in used]


def probe_inputs(model) -> dict[str, torch.Tensor]:
    """The smallest input the model takes: three token ids [1, 3], or one blank image [1, C, H, W] of its size."""
    config = model.config
    if model.main_input_name == "pixel_values":
        size = config.image_size
        height, width = size if isinstance(size, (list, tuple)) else (size, size)
        return {"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), height, width)}
    return {model.main_input_name: torch.tensor([[1, 2, 3]])}
