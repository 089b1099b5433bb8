"""Cluster: group face encodings into people with DBSCAN and give each person a stable id.

The partition comes from DBSCAN (euclidean on the 128-d encodings). Around it:

* cannot-link: two faces of one photo are never the same person; the one farther from the rest of
  the cluster becomes doubtful;
* doubt: a face is doubtful when DBSCAN calls it noise, when it is unusable (too small or
  blurred), or when the nearest other cluster is almost as close as its own (margin);
* stable ids: a new partition inherits ids from the previous one by overlap, so adding or
  removing a photo never renumbers an existing person (see :func:`match_ids`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import DBSCAN


@dataclass
class FaceAssignment:
    cluster_id: int | None  # the cluster (person) the face belongs to, None for noise/unusable
    doubtful: bool
    reason: str | None = None
    nearest_cluster: int | None = None


@dataclass
class ClusterResult:
    assignments: dict[int, FaceAssignment] = field(default_factory=dict)
    clusters: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (size, representative face)
    next_id: int = 1


def batch_labels(enc: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Reference DBSCAN labels (-1 = noise) over all encodings.

    scikit-learn gives a border point (within eps of cores of two clusters) to whichever cluster
    its expansion reached first, which depends on input order. We give it to the cluster of its
    nearest core point instead (ties: the lower index), as the incremental engine does, so
    the result depends only on the set of faces.
    """
    if len(enc) == 0:
        return np.zeros(0, dtype=int)
    db = DBSCAN(eps=eps, min_samples=min_samples, metric="euclidean").fit(enc)
    labels = db.labels_.copy()
    core = db.core_sample_indices_
    border = np.flatnonzero((labels >= 0) & ~np.isin(np.arange(len(enc)), core))
    if len(border) and len(core):
        cores = enc[core]
        for b in border:
            labels[b] = labels[core[int(np.argmin(np.linalg.norm(cores - enc[b], axis=1)))]]
    return labels


def match_ids(
    groups: Sequence[Sequence[int]], previous: dict[int, int | None], next_id: int
) -> tuple[list[int], int]:
    """Give each group (list of face ids) a cluster id, reusing previous ids by overlap.

    A previous id goes to the group holding most of its old members (so after a merge the merged
    cluster keeps the id of the larger part, after a split the larger part keeps it); ties go to
    the larger group, then the smaller id. Groups left without an id get fresh ones from
    ``next_id`` upwards; ids are never reused.
    """
    candidates = []  # (-overlap, -group size, old id, group index)
    for gi, members in enumerate(groups):
        counts = Counter(previous.get(f) for f in members)
        counts.pop(None, None)
        for old, n in counts.items():
            candidates.append((-n, -len(members), old, gi))
    candidates.sort()
    ids: list[int | None] = [None] * len(groups)
    taken: set[int] = set()
    for _, _, old, gi in candidates:
        if ids[gi] is None and old not in taken:
            ids[gi] = old
            taken.add(old)
    # fresh ids in a deterministic order: bigger groups first, then by smallest face id
    order = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), min(groups[g])))
    for gi in order:
        if ids[gi] is None:
            ids[gi] = next_id
            next_id += 1
    return [int(i) for i in ids], next_id


def _representative(members: np.ndarray, enc: np.ndarray, sharpness: np.ndarray, size: np.ndarray) -> int:
    """Index (into members) of the most central, sharpest face.

    Among the most central half of the cluster (distance to the centroid), pick the face with the
    best sharpness x size score, so the folder icon is a clear, typical face.
    """
    sub = enc[members]
    d = np.linalg.norm(sub - sub.mean(axis=0), axis=1)
    central = np.argsort(d, kind="stable")[: max(1, (len(members) + 1) // 2)]
    score = np.log1p(sharpness[members][central]) + np.log1p(size[members][central])
    return int(members[central[int(np.argmax(score))]])


def assign_clusters(
    ids: np.ndarray,
    groups_of: np.ndarray,
    enc: np.ndarray,
    labels: np.ndarray,
    previous: dict[int, int | None],
    next_id: int,
    doubt_margin: float,
    sharpness: np.ndarray | None = None,
    size: np.ndarray | None = None,
) -> ClusterResult:
    """Turn DBSCAN ``labels`` over faces ``ids`` into stable clusters with doubt flags.

    ``groups_of`` names the photo (content hash) of each face, for the cannot-link rule.
    """
    n = len(ids)
    result = ClusterResult(next_id=next_id)
    if n == 0:
        return result
    sharpness = np.ones(n) if sharpness is None else sharpness
    size = np.ones(n) if size is None else size
    labels = np.array(labels, copy=True)
    doubt_reason: dict[int, str] = {}

    # cannot-link: keep, per photo and cluster, only the face closest to the rest of the cluster
    for lab in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == lab)
        photos = Counter(groups_of[members])
        if all(c == 1 for c in photos.values()):
            continue
        centroid = enc[members].mean(axis=0)
        for photo, c in photos.items():
            if c == 1:
                continue
            same = [m for m in members if groups_of[m] == photo]
            same.sort(key=lambda m: float(np.linalg.norm(enc[m] - centroid)))
            for m in same[1:]:
                labels[m] = -1
                doubt_reason[m] = "another face in the same photo matched this person better"

    cluster_labels = [lab for lab in np.unique(labels) if lab >= 0]
    groups = [ids[labels == lab].tolist() for lab in cluster_labels]
    new_ids, result.next_id = match_ids(groups, previous, next_id)
    cid_of_label = dict(zip(cluster_labels, new_ids))
    cid = np.array([cid_of_label.get(lab, -1) for lab in labels])

    # nearest and second-nearest cluster per face (distance to the closest member of each)
    clustered = np.flatnonzero(cid >= 0)
    own = np.full(n, np.inf)
    other = np.full(n, np.inf)
    other_cid = np.full(n, -1)
    if len(clustered):
        for start in range(0, n, 1024):
            block = slice(start, min(n, start + 1024))
            d = np.sqrt(
                np.maximum(
                    (enc[block] ** 2).sum(1)[:, None]
                    + (enc[clustered] ** 2).sum(1)[None, :]
                    - 2 * enc[block] @ enc[clustered].T,
                    0,
                )
            )
            rows = np.arange(block.start, block.stop)
            d[rows[:, None] == clustered[None, :]] = np.inf  # a face is not its own neighbour
            same = cid[rows][:, None] == cid[clustered][None, :]
            own[block] = np.where(same, d, np.inf).min(axis=1)
            d_other = np.where(same, np.inf, d)
            j = d_other.argmin(axis=1)
            other[block] = d_other[np.arange(len(rows)), j]
            other_cid[block] = cid[clustered][j]

    for i in range(n):
        fid = int(ids[i])
        if cid[i] >= 0:
            doubtful = bool(other[i] - own[i] < doubt_margin)
            reason = None
            if doubtful:
                reason = f"almost as close to cluster {int(other_cid[i])} as to its own"
            result.assignments[fid] = FaceAssignment(
                int(cid[i]), doubtful, reason, int(other_cid[i]) if doubtful else int(cid[i])
            )
        else:
            nearest = int(other_cid[i]) if np.isfinite(other[i]) else None
            reason = doubt_reason.get(i, "no confident match with any person")
            result.assignments[fid] = FaceAssignment(None, True, reason, nearest)

    for lab, c in cid_of_label.items():
        members = np.flatnonzero(cid == c)
        confident = [m for m in members if not result.assignments[int(ids[m])].doubtful]
        pick = np.array(confident if confident else members)
        rep = _representative(pick, enc, sharpness, size)
        result.clusters[c] = (len(members), int(ids[rep]))
    return result
