"""Other batch clustering methods, for comparison with the service's DBSCAN.

Each method maps the usable encodings (n x 128) to labels (-1 = noise). The service always keeps
the exact incremental DBSCAN; these run only in batch (`organizer evaluate --algorithm`, `organizer
scan --algorithm`), and the people layer (cannot-link within a photo, doubt, stable ids) is applied
to their partition as to DBSCAN's. The average-linkage refinement is DBSCAN's own (a cure for its
chaining), so the other methods are scored as they come.

Parameters come from the clustering settings, so no method is tuned on the labelled sets:
agglomerative cuts average linkage at ``linkage_threshold`` (``eps`` when that is 0), chinese
whispers links faces closer than ``eps``, HDBSCAN needs ``min_samples`` faces for a cluster, and
KMeans picks k by silhouette over a range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ALGORITHMS = ("dbscan", "kmeans", "agglomerative", "hdbscan", "chinese_whispers")
DEFAULT = "dbscan"
# Average linkage over every face needs all n^2/2 distances (8 bytes each): 20k faces is 1.6 GB.
AGGLOMERATIVE_MAX = 20_000
# KMeans' k is chosen on at most this many faces (silhouette is O(n^2)); the final fit uses all.
KMEANS_SAMPLE = 3000


@dataclass
class KMeansCurve:
    """KMeans over a range of k: inertia (the elbow curve) and silhouette per k, and the k chosen."""

    ks: list[int] = field(default_factory=list)
    inertia: list[float] = field(default_factory=list)
    silhouette: list[float] = field(default_factory=list)
    sampled: int = 0  # faces the curve was computed on

    @property
    def best_k(self) -> int:
        return self.ks[int(np.argmax(self.silhouette))] if self.ks else 1


def k_range(n: int, points: int = 16) -> list[int]:
    """Candidate k: from 2 to n/2 (a person needs two photos), spaced geometrically."""
    hi = max(2, n // 2)
    return sorted({int(round(k)) for k in np.geomspace(2, hi, points)} & set(range(2, max(3, n))))


def kmeans_curve(enc: np.ndarray, ks: list[int] | None = None, seed: int = 0, sample: int = KMEANS_SAMPLE,
                 n_init: int = 3) -> KMeansCurve:
    """Inertia and silhouette for each k (by default :func:`k_range`), on at most ``sample`` faces."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(seed)
    x = enc if len(enc) <= sample else enc[np.sort(rng.choice(len(enc), sample, replace=False))]
    curve = KMeansCurve(sampled=len(x))
    for k in ks or k_range(len(x)):
        if not 2 <= k < len(x):
            continue
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
        curve.ks.append(k)
        curve.inertia.append(float(km.inertia_))
        curve.silhouette.append(float(silhouette_score(x, km.labels_)))
    return curve


def _kmeans(enc: np.ndarray, cfg) -> np.ndarray:
    from sklearn.cluster import KMeans

    if len(enc) < 3:
        return np.full(len(enc), -1, dtype=int)
    # KMeans' seeding depends on the order of its input: fit on the encodings in a canonical
    # (lexicographic) order, so the result is a function of the set of faces, as DBSCAN's is
    order = np.lexsort(enc.T[::-1])
    x = enc[order]
    k = kmeans_curve(x).best_k
    labels = np.empty(len(enc), dtype=int)
    labels[order] = KMeans(n_clusters=k, n_init=3, random_state=0).fit(x).labels_
    return labels


def _agglomerative(enc: np.ndarray, cfg) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    if len(enc) > AGGLOMERATIVE_MAX:
        raise ValueError(f"agglomerative clustering needs all pairwise distances: at most {AGGLOMERATIVE_MAX} "
                         f"faces, this store has {len(enc)} (use dbscan, hdbscan or chinese_whispers)")
    if len(enc) < 2:
        return np.full(len(enc), -1, dtype=int)
    threshold = cfg.linkage_threshold or cfg.eps
    model = AgglomerativeClustering(n_clusters=None, linkage="average", distance_threshold=threshold)
    return model.fit(enc).labels_.astype(int)


def _hdbscan(enc: np.ndarray, cfg) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    size = max(2, cfg.min_samples)
    if len(enc) < size:
        return np.full(len(enc), -1, dtype=int)
    return HDBSCAN(min_cluster_size=size, copy=True).fit(enc).labels_.astype(int)


def _chinese_whispers(enc: np.ndarray, cfg) -> np.ndarray:
    from .encode import chinese_whispers

    return chinese_whispers(enc, cfg.eps)


def _dbscan(enc: np.ndarray, cfg) -> np.ndarray:
    from .cluster import batch_labels

    return batch_labels(enc, cfg.eps, cfg.min_samples)


_METHODS = {"dbscan": _dbscan, "kmeans": _kmeans, "agglomerative": _agglomerative, "hdbscan": _hdbscan,
            "chinese_whispers": _chinese_whispers}


def cluster_labels(algorithm: str, enc: np.ndarray, cfg) -> np.ndarray:
    """Labels (-1 = noise) of ``algorithm`` over the encodings; a cluster of one face is noise
    (a person seen once is not a person)."""
    if algorithm not in _METHODS:
        raise ValueError(f"unknown clustering algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    labels = np.asarray(_METHODS[algorithm](np.asarray(enc, dtype=np.float64), cfg), dtype=int)
    if len(labels):
        values, counts = np.unique(labels, return_counts=True)
        labels[np.isin(labels, values[counts < 2])] = -1
    return labels


def refined(algorithm: str) -> bool:
    """Whether the average-linkage refinement applies (DBSCAN's cure for chaining only)."""
    return algorithm == "dbscan"
