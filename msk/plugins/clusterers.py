"""Built-in clusterers for DeepCluster's pseudo-labels: faiss k-means (the paper's choice) and
scikit-learn's mini-batch k-means (a reference implementation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from msk.core.hookspecs import hookimpl
from msk.core.specs import ClustererSpec


@dataclass
class ClusterResult:
    """Assignments of ``N`` points to ``k`` clusters.

    :param labels: int64 ``[N]`` in ``0..k-1``.
    :param centroids: float32 ``[k, D]``.
    :param inertia: sum of squared distances to the assigned centroid.
    """

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float


def _check(x: np.ndarray, k: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    if not 1 <= k <= len(x):
        raise ValueError(f"k={k} clusters need at least {k} points; got {len(x)}")
    return x


class FaissKMeans:
    """Lloyd's k-means from faiss (CPU, or GPU where faiss-gpu and a GPU are present)."""

    def __init__(self, niter: int = 20, nredo: int = 1, gpu: bool = False, verbose: bool = False):
        self.niter, self.nredo, self.gpu, self.verbose = niter, nredo, gpu, verbose

    def fit(self, x: np.ndarray, k: int, seed: int = 0) -> ClusterResult:
        import faiss

        x = _check(x, k)
        km = faiss.Kmeans(x.shape[1], k, niter=self.niter, nredo=self.nredo, seed=seed,
                          gpu=self.gpu, verbose=self.verbose, min_points_per_centroid=1,
                          max_points_per_centroid=1_000_000)
        km.train(x)
        assert km.centroids is not None  # set by train()
        dist, labels = km.index.search(x, 1)
        return ClusterResult(labels[:, 0].astype(np.int64), km.centroids.copy(), float(dist.sum()))


class SklearnMiniBatchKMeans:
    """scikit-learn's mini-batch k-means."""

    def __init__(self, batch_size: int = 4096, n_init: int = 1):
        self.batch_size, self.n_init = batch_size, n_init

    def fit(self, x: np.ndarray, k: int, seed: int = 0) -> ClusterResult:
        from sklearn.cluster import MiniBatchKMeans

        x = _check(x, k)
        km = MiniBatchKMeans(k, batch_size=self.batch_size, n_init=self.n_init, random_state=seed)
        labels = km.fit_predict(x)
        return ClusterResult(labels.astype(np.int64), km.cluster_centers_.astype(np.float32),
                             float(km.inertia_))


@hookimpl
def msk_clusterers() -> list[ClustererSpec]:
    return [
        ClustererSpec("faiss-kmeans", lambda name, **o: FaissKMeans(**o),
                      "faiss k-means (CPU or GPU); DeepCluster default"),
        ClustererSpec("sklearn-minibatch-kmeans", lambda name, **o: SklearnMiniBatchKMeans(**o),
                      "scikit-learn mini-batch k-means"),
    ]
