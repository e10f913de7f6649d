"""Method options from `--set key=value` and an optional YAML/JSON file; --set wins."""
from __future__ import annotations

import json
from pathlib import Path

from cachetune.cache.errors import InputError


def collect_options(pairs: tuple[str, ...], config_file: str | None) -> dict:
    options = {}
    if config_file:
        path = Path(config_file)
        if not path.exists():
            raise InputError(f"--config {config_file}: file not found")
        try:
            if path.suffix.lower() == ".json":
                options = json.loads(path.read_text())
            else:
                import yaml

                options = yaml.safe_load(path.read_text()) or {}
        except Exception as error:
            raise InputError(f"--config {config_file}: cannot parse ({str(error).splitlines()[0]}); give a YAML or JSON mapping") from None
        if not isinstance(options, dict):
            raise InputError(f"--config {config_file}: expected a mapping of option names to values")
        options.pop("method", None)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {pair!r}: use key=value, e.g. --set r=4")
        options[key.strip()] = value.strip()
    return options
