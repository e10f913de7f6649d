"""`--reduce pca:K`: per layer, a PCA basis fitted on a seeded sample of the training split's real tokens.

A token x [D] is stored as its K coefficients c = (x - mu) P^T (P [K, D]: the top K principal directions, rows
orthonormal) and read back as x_hat = c P + mu, on the training device, so every method runs unchanged on
x_hat. The basis and mean are float32 arrays in the store (`projection/layer_XX_basis`, `projection/layer_XX_mean`,
crc32c-checksummed like the features).
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import InputError

SAMPLE_TOKENS = 32768  # real training tokens the basis is fitted on (seeded)


def parse_reduce(reduce: str | None, width: int | None = None) -> int | None:
    """'pca:K' -> K (None for None). Raises InputError for another form, or K not in 1..width-1."""
    if reduce is None:
        return None
    kind, _, count = reduce.partition(":")
    if kind != "pca" or not count.isdigit() or int(count) < 1:
        raise InputError(f"--reduce {reduce!r}: use pca:K with K principal components per token (e.g. pca:96)")
    if width is not None and int(count) >= width:
        raise InputError(f"--reduce {reduce}: K must be below the hidden size {width} (K >= the width stores no fewer "
                         f"values than the layer itself); use pca:{width // 4} for a quarter")
    return int(count)


def sample_rows(lengths: np.ndarray, token_start: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Sorted store rows of `count` real tokens drawn uniformly (seeded) from every real token of a split."""
    rows = np.concatenate([np.arange(s, s + n) for s, n in zip(token_start, lengths)]) if len(lengths) else np.zeros(0, int)
    if len(rows) > count:
        rows = np.random.default_rng(seed).choice(rows, count, replace=False)
    return np.sort(rows)


def fit_pca(x: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """x [N, D] -> (basis P [K, D] float32, rows the top-K eigenvectors of the covariance, by falling eigenvalue;
    mean mu [D] float32). Covariance and eigendecomposition in float64 (torch.linalg.eigh)."""
    values = torch.from_numpy(np.asarray(x, np.float64))
    mean = values.mean(0)
    centred = values - mean
    covariance = centred.T @ centred / max(len(values) - 1, 1)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    basis = vectors[:, -components:].flip(1).T  # [K, D]
    return basis.float().numpy(), mean.float().numpy()


def project(x: np.ndarray, basis: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """x [N, D] -> coefficients c = (x - mu) P^T [N, K] float32."""
    return (np.asarray(x, np.float32) - mean) @ basis.T


def reconstruct(c: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """c [B, L, T, K], basis [L, K, D], mean [L, D] -> x_hat = c P_l + mu_l [B, L, T, D]."""
    return torch.einsum("bltk,lkd->bltd", c, basis) + mean[None, :, None, :]
