"""A sweep's grid: the configurations `pipeline sweep` trains, from command-line lists or a YAML file.

A grid names methods, method options (each applied to the methods that have it), learning rates, weight decays
and seeds; its configurations are every combination. In YAML (a file of its own, or the `sweep` section of
params.yaml):

    methods: [lst, unipt, sherl]     # or a mapping with per-method option lists: {lst: {r: [4, 8]}, linear: {}}
    set: {r: [4, 8]}                 # options for every method above that has them
    lr: [3.0e-4, 1.0e-3, 3.0e-3]
    weight-decay: [0.01]
    seeds: [0, 1, 2]
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from cachetune.cache.errors import InputError

from ..methods import MethodConfig, config_from_options, get_method, method_names

GRID_KEYS = ("methods", "set", "lr", "weight-decay", "seeds")


@dataclass(frozen=True)
class SweepRun:
    config: MethodConfig
    options: tuple[tuple[str, str], ...]  # the method options the grid set, as named in the run's name
    lr: float
    weight_decay: float
    seed: int
    name_weight_decay: bool = False  # the grid varies weight decay, so names carry it

    @property
    def group(self) -> str:
        """The run's name without its seed: the runs a report averages over seeds."""
        parts = [self.config.method, *(f"{key}={value}" for key, value in self.options), f"lr={self.lr:g}"]
        if self.name_weight_decay:
            parts.append(f"wd={self.weight_decay:g}")
        return "-".join(parts)

    @property
    def name(self) -> str:
        return f"{self.group}-seed={self.seed}"


@dataclass
class Grid:
    methods: dict[str, dict[str, list]]  # method -> its own option -> values
    options: dict[str, list]  # option -> values, for every method that has the option
    lrs: list[float]
    weight_decays: list[float]
    seeds: list[int]

    def runs(self) -> list[SweepRun]:
        """Every configuration, seeds innermost; an option a method lacks is left out of its configurations."""
        unused = [key for key in self.options if not any(key in _fields(method) for method in self.methods)]
        if unused:
            raise InputError(f"no method in the sweep ({', '.join(self.methods)}) has option(s) {', '.join(unused)}; "
                             "see each method's options in `pipeline methods` and its docstring")
        runs = []
        for method, own in self.methods.items():
            axes = {key: values for key, values in self.options.items() if key in _fields(method)}
            axes.update(own)
            for values in itertools.product(*axes.values()):
                options = dict(zip(axes, values))
                try:
                    config = config_from_options(method, options)
                except ValueError as error:
                    raise InputError(str(error)) from None
                named = tuple((key, _text(value)) for key, value in options.items())
                for lr, weight_decay, seed in itertools.product(self.lrs, self.weight_decays, self.seeds):
                    runs.append(SweepRun(config, named, lr, weight_decay, seed, len(self.weight_decays) > 1))
        names = [run.name for run in runs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise InputError(f"the grid lists the same configuration twice ({repeated[0]}); remove the repeated value")
        return runs


def _fields(method: str) -> set[str]:
    return {field.name for field in dataclasses.fields(get_method(method).config_class)} - {"method"}


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _check_methods(names) -> list[str]:
    names = [str(name).strip() for name in names if str(name).strip()]
    unknown = [name for name in names if name not in method_names()]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(method_names())}")
    if not names:
        raise InputError("the sweep names no methods; pass --methods, e.g. --methods lst,unipt")
    return names


def _numbers(values, kind, what: str) -> list:
    items = values.split(",") if isinstance(values, str) else values if isinstance(values, list) else [values]
    try:
        numbers = [kind(item) for item in items if str(item).strip()]
    except (TypeError, ValueError):
        raise InputError(f"{what} {values!r}: expected {kind.__name__}s separated by commas, e.g. "
                         f"{'3e-4,1e-3' if kind is float else '0,1,2'}") from None
    if not numbers:
        raise InputError(f"{what} is empty; give at least one value")
    return list(dict.fromkeys(numbers))


def _option_values(values) -> list:
    """A command-line value splits on commas (r=4,8); in YAML a list is the values, a scalar one value."""
    if isinstance(values, str):
        return [part.strip() for part in values.split(",") if part.strip()]
    return values if isinstance(values, list) else [values]


def _option_mapping(mapping, where: str) -> dict[str, list]:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise InputError(f"{where}: expected a mapping of option names to value lists, e.g. {{r: [4, 8]}}")
    return {str(key): _option_values(values) for key, values in mapping.items()}


def read_grid_file(path: str) -> dict:
    """The grid in a YAML or JSON file: the whole file, or its `sweep` section (so params.yaml serves)."""
    import yaml

    file = Path(path)
    if not file.exists():
        raise InputError(f"--grid {path}: file not found")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise InputError(f"--grid {path}: cannot parse ({str(error).splitlines()[0]}); give a YAML mapping") from None
    if isinstance(data, dict) and isinstance(data.get("sweep"), dict):
        data = data["sweep"]
    if not isinstance(data, dict):
        raise InputError(f"--grid {path}: expected a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise InputError(f"--grid {path}: unknown key(s) {', '.join(map(str, unknown))}; use {', '.join(GRID_KEYS)}")
    return data


def make_grid(file: dict, methods=None, pairs: tuple[str, ...] = (), lrs=None, weight_decays=None, seeds=None,
              default_lr: float = 1e-3, default_weight_decay: float = 0.01, default_seed: int = 0) -> Grid:
    """The grid of a file's values, each overridden by the command line's where it gives one."""
    listed = methods if methods is not None else file.get("methods")
    own = {}
    if isinstance(listed, dict):
        own = {str(name): entry for name, entry in listed.items()}
        listed = list(own)
    names = _check_methods(listed.split(",") if isinstance(listed, str) else listed or [])
    options = _option_mapping(file.get("set"), "set")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {pair!r}: use key=value1,value2, e.g. --set r=4,8")
        options[key.strip()] = _option_values(value.strip())
    return Grid(methods={name: _option_mapping(own.get(name), f"methods.{name}") for name in names},
                options=options,
                lrs=_numbers(lrs if lrs is not None else file.get("lr", default_lr), float, "lr"),
                weight_decays=_numbers(weight_decays if weight_decays is not None
                                       else file.get("weight-decay", default_weight_decay), float, "weight-decay"),
                seeds=_numbers(seeds if seeds is not None else file.get("seeds", default_seed), int, "seeds"))
