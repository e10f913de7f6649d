"""Regression targets as a network learns them: standardised by the training rows' mean and std.

A head whose output must reach ~1000 cannot get there under AdamW at lr 1e-3 (its bias moves ~1e-3 a step), and an
MSE of ~1e6 is no loss for Adam's steps: so the network predicts (y - mean) / std, and every prediction a user or a
metric sees is restored to the data's units (output * std + mean). A model folder records the scale in config.json
("target_scale"); a folder without it (saved before it was recorded, or a classifier) is read with the identity.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

INFO_KEY = "target_scale"


@dataclass(frozen=True)
class TargetScale:
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def of_targets(cls, task: str, targets: np.ndarray) -> TargetScale:
        """The scale to train on `targets` [N] (the training rows, in the data's units) with: the identity for
        classification or no rows; std 1 when every target is the same."""
        if task != "regression" or len(targets) == 0:
            return cls()
        targets = np.asarray(targets, dtype=np.float64)
        std = float(targets.std())
        return cls(float(targets.mean()), std if std > 0 else 1.0)

    @classmethod
    def of_info(cls, info: dict) -> TargetScale:
        """The scale a model folder's info records (the identity when none is). ValueError for one that is not a
        finite mean and a positive finite std (an edited config.json)."""
        recorded = info.get(INFO_KEY)
        if recorded is None:
            return cls()
        scale = cls(float(recorded["mean"]), float(recorded["std"]))
        if not (math.isfinite(scale.mean) and math.isfinite(scale.std) and scale.std > 0):
            raise ValueError(f"{INFO_KEY} {recorded} is not a finite mean and a positive std")
        return scale

    def to_info(self) -> dict:
        """{"target_scale": {"mean", "std"}} to record in a model folder's info and metrics ({} for the identity)."""
        return {} if self.is_identity else {INFO_KEY: asdict(self)}

    @property
    def is_identity(self) -> bool:
        return self == TargetScale()

    def standardise(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets [B] in the data's units -> what the network learns to predict; class labels pass unchanged."""
        return targets if self.is_identity else (targets.float() - self.mean) / self.std

    def restore(self, outputs: np.ndarray) -> np.ndarray:
        """The network's outputs [N, 1] -> predictions in the data's units; logits pass unchanged."""
        return outputs if self.is_identity else outputs * self.std + self.mean

    def describe(self) -> str:
        return f"targets standardised (mean {self.mean:.4g}, std {self.std:.4g}); the train loss is on that scale"
