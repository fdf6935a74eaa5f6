"""PCA-whitening and L2 normalisation of features, as DeepCluster before k-means (Caron et al. 2018)."""

from __future__ import annotations

import numpy as np


def fit_pca_whitening(x: np.ndarray, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """PCA-whitening fitted on ``x`` (N, D): project on the top ``dim`` components, scale each to unit variance.

    Eigen power -0.5 as DeepCluster's ``faiss.PCAMatrix(D, dim, eigen_power=-0.5)``.
    Returns ``mean`` (D,), ``proj`` (D, dim) with the whitening folded in, ``eigenvalues`` (dim,).
    """
    from sklearn.decomposition import PCA

    n, d = x.shape
    if dim > min(n, d):
        raise ValueError(
            f"embed.pca_dim: {dim} components need at least that many samples and dimensions "
            f"(have {n} samples of {d} dims; raise embed.pca_sample or lower embed.pca_dim)"
        )
    pca = PCA(n_components=dim, whiten=False, random_state=seed).fit(x.astype(np.float64))
    ev = np.maximum(pca.explained_variance_, 1e-12 * max(pca.explained_variance_[0], 1e-30))
    proj = pca.components_.T / np.sqrt(ev)[None, :]  # (D, dim)
    return {"mean": pca.mean_.astype(np.float32), "proj": proj.astype(np.float32), "eigenvalues": ev.astype(np.float32)}


def apply_pca(x: np.ndarray, pca: dict[str, np.ndarray]) -> np.ndarray:
    """(N, D) -> (N, dim) whitened."""
    return ((x - pca["mean"]) @ pca["proj"]).astype(np.float32)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)
