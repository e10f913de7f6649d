"""`SideNetwork`: a side network as a library object, in the manner of transformers' and PEFT's models.

Built for a cache (`for_cache`), trained in any loop (it is an nn.Module taking the cache's batches), saved and
loaded as the folder `pipeline fit` writes (`save_pretrained` / `from_pretrained`: config.json + model.safetensors),
and used on raw texts or images (`predict`, through the frozen backbone: stages/training/predict.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from cachetune.cache.errors import InputError
from cachetune.cache.hidden_states import CachedHiddenStates
from cachetune.cache.store import Cache

from ..runtime import Runtime
from ..methods import FeatureSpec, MethodConfig, build_model, config_from_options
from .fit import model_info, required_layers, spec_from_store
from .predict import load_matching_backbone, logits_to_records, predict_images, predict_texts
from .side_model import SideModel, load_side_model, save_side_model
from .target_scale import TargetScale


class SideNetwork(torch.nn.Module):
    """A side network (`model`), its method options (`config`), what it was built for (`spec`: hidden size, layers,
    labels, pooling, backbone folder) and the cache's facts (`info`: task, label names, the cache's key)."""

    def __init__(self, model: torch.nn.Module, config: MethodConfig, spec: FeatureSpec, info: dict):
        """Wraps a built method module; make one with `for_cache` or `from_pretrained`."""
        super().__init__()
        self.model, self.config, self.spec, self.info = model, config, spec, info
        self._backbone = None

    @classmethod
    def for_cache(cls, cache: Cache | str, method: str = "sherl", **options) -> "SideNetwork":
        """A new network of `method` (see `method_names()`) for the cache, with method options as keyword arguments
        (`r=4`). Raises InputError for an unknown method or option, or when the cache lacks the layers the method
        reads or the method cannot run on its backbone."""
        cache = cache if isinstance(cache, Cache) else Cache(cache)
        spec = spec_from_store(cache.root)
        try:
            config = config_from_options(method, options)
        except (KeyError, ValueError) as error:  # an unknown method or option: the message lists the valid ones
            raise InputError(str(error.args[0]) if error.args else str(error)) from None
        required_layers(config, spec, cache.path)
        return cls(build_model(config, spec), config, spec, model_info(cache.attrs, cache.path))

    @property
    def layers(self) -> list[int]:
        """The hidden_states indices this network reads, in the order it expects them (ask the cache for these)."""
        return type(self.model).required_layers(self.config, self.spec)

    @property
    def label_names(self) -> list[str]:
        """The class names, in the order of the logits' columns (empty for regression)."""
        return list(self.info["label_names"] or [])

    @property
    def target_scale(self) -> TargetScale:
        """How regression targets were standardised for training (the identity for a network from `for_cache`, which
        learns targets as given, and for classification): `target_scale.restore(outputs)` is in the data's units."""
        return TargetScale.of_info(self.info)

    def forward(self, hidden_states: CachedHiddenStates | torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: a cache batch ([B, K, T, W] codes, K = len(self.layers)), or float values [B, K, T, D];
        mask [B, T] bool (default: the batch's own) -> logits [B, num_labels] (regression: standardised predictions,
        see `target_scale`; `predict` restores them)."""
        if mask is None:
            if not isinstance(hidden_states, CachedHiddenStates):
                raise ValueError("give the mask [B, T] with a float tensor of hidden states")
            mask = hidden_states.mask
        return self.model(hidden_states, mask)

    def save_pretrained(self, folder: str | Path) -> None:
        """config.json + model.safetensors, as `pipeline fit` writes them (frozen backbone layers are not saved)."""
        save_side_model(SideModel(self.model, self.config, self.spec, self.info), Path(folder))

    @classmethod
    def from_pretrained(cls, folder: str | Path, backbone: str | None = None) -> "SideNetwork":
        """A folder written by save_pretrained or `pipeline fit`; backbone: its folder if it moved since extraction.
        Raises InputError for a missing or damaged folder."""
        side = load_side_model(folder, backbone)
        return cls(side.model, side.config, side.spec, side.info)

    @torch.no_grad()
    def predict(self, texts: list[str] | str | None = None, images: list[str | Path] | str | Path | None = None,
                pairs: list[str] | str | None = None, batch_size: int = 32) -> list[dict]:
        """Labels and probabilities ({"label", "probabilities"}; {"prediction"} for regression) for raw texts (with
        optional second texts `pairs`) or image files, through the frozen backbone the cache was extracted with
        (loaded once, and checked to be that backbone) and this network: the same path `pipeline predict` takes.
        A single string or path is one input. Runs on the device the network is on; image decode notes (EXIF
        orientation, 16-bit, transparency: stages/image_decode.py) and a note on texts cut at the trained max length
        go to standard error. Raises InputError for no input, the wrong kind of input or backbone."""
        if (texts is None) == (images is None):
            raise InputError("give texts=[...] or images=[...], one of the two")
        texts, images, pairs = ([x] if isinstance(x, (str, Path)) else x for x in (texts, images, pairs))
        modality = self.info["cache_key"].get("modality", "text")
        if (images is not None) != (modality == "image"):
            raise InputError(f"this side network was trained on {modality} features: give "
                             f"{'images' if modality == 'image' else 'texts'}")
        side = SideModel(self.model, self.config, self.spec, self.info)
        if self._backbone is None:
            self._backbone = load_matching_backbone(side)
        runtime = Runtime.resolve(str(next(self.model.parameters()).device), "fp32")
        training = self.model.training
        if images is not None:
            logits = predict_images(side, self._backbone, list(images), batch_size, runtime,
                                    log=lambda line: print(line, file=sys.stderr))  # decode notes, as the CLI
        else:
            logits = predict_texts(side, self._backbone, list(texts), pairs, batch_size, runtime,
                                   log=lambda line: print(line, file=sys.stderr))  # as the CLI
        self.model.train(training)  # predict runs in eval mode; a network being trained goes on training
        return logits_to_records(logits, self.info)
