"""The feature step every shallow baseline shares: normalise, flatten, centre, optionally PCA/whiten.

Baselines take raw ROIs (n, 32, 32) like the paper's network does, so the evaluation calls every
method the same way and no method sees a differently scaled image. The intensity map is the
network's own :func:`normalise_rois` (fitted on the training ROIs, then frozen), so a baseline is
compared with ours on exactly the same pixels. Features are float64 so that PCA, the
eigen-solvers and the least-squares solves of the shallow methods are not limited by float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nodule_pipeline.hashing.network import NormalisationStats, normalise_rois


def check_training_inputs(images: np.ndarray, labels: np.ndarray, min_rows: int = 2) -> np.ndarray:
    """Validate training ROIs against their labels; returns the labels as int64 (n,)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} ROIs but {len(labels)} labels")
    if len(labels) < min_rows:
        raise ValueError(f"need at least {min_rows} training ROIs, got {len(labels)}")
    if not np.issubdtype(labels.dtype, np.integer) and not np.all(np.mod(labels, 1) == 0):
        raise ValueError("labels must be integer class ids")
    return labels.astype(np.int64)


def check_two_classes(labels: np.ndarray, method: str) -> np.ndarray:
    """The sorted classes of ``labels``; a method that learns from label contrasts refuses fewer than two."""
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"{method} needs at least two classes in the training labels")
    return classes


def check_bits(bits: int) -> int:
    """Code length must be a positive integer (the index packs multiples of 8; any length hashes)."""
    if int(bits) != bits or bits < 1:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    return int(bits)


def flatten_rois(images: np.ndarray, stats: NormalisationStats | None = None) -> tuple[np.ndarray, NormalisationStats]:
    """ROIs -> (n, 1024) float64 in [0, 1] with the network's intensity map (fitted when ``stats`` is None)."""
    if np.size(images) == 0:
        if stats is None:
            raise ValueError("cannot fit the normalisation on zero ROIs")
        return np.zeros((0, 32 * 32)), stats
    normalised, stats = normalise_rois(images, stats)
    return normalised.reshape(len(normalised), -1).astype(np.float64), stats


def pca_basis(centred: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Top principal directions (d, k) and their variances (k,) of already centred rows (n, d).

    Eigen-decomposition of the d x d covariance (d = 1024 here), so k may exceed n - 1: the extra
    directions span the null space with variance 0, which keeps bits > n legal. Each direction's
    sign is fixed (largest-magnitude entry positive) so the basis, and hence the codes, does not
    flip between LAPACK builds.
    """
    n, d = centred.shape
    if not 1 <= n_components <= d:
        raise ValueError(f"n_components must be in 1..{d} (the feature dimension), got {n_components}")
    covariance = centred.T @ centred / max(n - 1, 1)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(-values, kind="stable")[:n_components]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    pivots = np.abs(vectors).argmax(axis=0)
    vectors = vectors * np.sign(vectors[pivots, np.arange(vectors.shape[1])])
    return vectors, values


@dataclass(frozen=True)
class FeatureMap:
    """A frozen raw-ROI -> feature map: intensity normalisation, centring, optional PCA and whitening."""

    normalisation: NormalisationStats
    mean: np.ndarray  # (1024,)
    components: np.ndarray | None = None  # (1024, k) principal directions, or None for all pixels
    scale: np.ndarray | None = None  # (k,) divisor per output dimension (whitening), or None

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0] if self.components is None else self.components.shape[1])

    def transform(self, images: np.ndarray) -> np.ndarray:
        """Raw ROIs (m, 32, 32) -> features (m, dim) float64, with the maps fitted on training ROIs."""
        flat, _ = flatten_rois(images, self.normalisation)
        features = flat - self.mean
        if self.components is not None:
            features = features @ self.components
        if self.scale is not None:
            features = features / self.scale
        return features


def fit_feature_map(
    images: np.ndarray, n_components: int | None = None, whiten: bool = False
) -> tuple[FeatureMap, np.ndarray]:
    """Fit the map on training ROIs; returns it with the training features (n, dim) it produces.

    ``n_components=None`` keeps all 1024 centred pixels. ``whiten`` divides each principal
    component by its standard deviation (components with ~0 variance are left unscaled).
    """
    flat, stats = flatten_rois(images)
    mean = flat.mean(axis=0)
    centred = flat - mean
    if n_components is None:
        if whiten:
            raise ValueError("whitening needs n_components (PCA)")
        return FeatureMap(stats, mean), centred
    components, variances = pca_basis(centred, n_components)
    features = centred @ components
    scale = None
    if whiten:
        std = np.sqrt(variances)
        scale = np.where(std > 1e-8 * max(float(std.max(initial=0.0)), 1e-300), std, 1.0)
        features = features / scale
    return FeatureMap(stats, mean, components, scale), features


@dataclass(frozen=True)
class ProjectionHash:
    """Codes = sign of a linear projection of the features: the trained form of LSH, ITQ and MLH.

    ``encode`` gives bit j = (features @ projection + offset)[:, j] > 0; features are centred, so
    without an offset 0 splits each projection near its training median for the roughly symmetric
    projections LSH and ITQ use; MLH learns its offsets (the bias of its affine hash functions).
    """

    features: FeatureMap
    projection: np.ndarray  # (dim, bits)
    method: str
    offset: np.ndarray | None = None  # (bits,) added before the sign, or None for 0

    @property
    def bits(self) -> int:
        return int(self.projection.shape[1])

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Raw ROIs (m, 32, 32) -> codes (m, bits) bool."""
        scores = self.features.transform(images) @ self.projection
        return (scores if self.offset is None else scores + self.offset) > 0
