"""Cluster: group face encodings into people with DBSCAN and give each person a stable id.

The partition comes from DBSCAN (euclidean on the 128-d encodings): kept exactly and
incrementally by :mod:`organizer.incremental` in the service, recomputed with scikit-learn by
`organizer recluster`. Everything derived from it is *local*, so both paths give the same folders:

* people: each DBSCAN cluster is refined on its own (:func:`split_cluster`: refinement against
  chaining, eps-connected parts, a person seen once is not a person, cannot-link inside a photo);
* doubt: a face is doubtful when it is noise, unusable (too small or blurred), or when a face of
  another person lies within eps and is less than ``doubt_margin`` farther than the nearest face
  of its own person; its "nearest person" hint looks no farther than ``2 * eps``;
* stable ids: new groups inherit ids from the previous partition by overlap (:func:`match_ids`),
  so adding or removing a photo never renumbers an existing person.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import DBSCAN

RefineFn = Callable[[np.ndarray, np.ndarray, object], np.ndarray]

REASON_NOISE = "no confident match with any person"
REASON_SAME_PHOTO = "another face in the same photo matched this person better"
REASON_UNUSABLE = "face too small or too blurred to recognise reliably"


@dataclass
class FaceAssignment:
    cluster_id: int | None  # the person the face belongs to, None for noise/unusable
    doubtful: bool
    reason: str | None = None
    nearest_cluster: int | None = None


@dataclass
class ClusterResult:
    assignments: dict[int, FaceAssignment] = field(default_factory=dict)
    clusters: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (size, representative face)
    removed: set[int] = field(default_factory=set)  # cluster ids that no longer exist
    next_id: int = 1


def batch_labels(enc: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Reference DBSCAN labels (-1 = noise) over all encodings, with the engine's border rule.

    scikit-learn gives a border point (within eps of cores of two clusters) to whichever cluster
    its expansion reached first, which depends on input order. We give it to the cluster of its
    nearest core point (ties: the lower index), as the incremental engine does, so the result
    depends only on the set of faces.
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


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0))


def split_cluster(
    ids: np.ndarray, enc: np.ndarray, photo: np.ndarray, eps: float, cfg, refine: RefineFn | None
) -> tuple[list[list[int]], dict[int, str]]:
    """People inside one DBSCAN cluster: (groups of face ids, {face id: reason} for the rest).

    A pure function of the cluster's members (ids ascending), so it can be re-run on the clusters
    a new photo touched and still agree with a batch run.
    """
    m = len(ids)
    sub = np.asarray(refine(enc, photo, cfg), dtype=int) if refine and m > 2 else np.zeros(m, dtype=int)
    noise: dict[int, str] = {int(ids[i]): REASON_NOISE for i in np.flatnonzero(sub < 0)}
    groups: list[list[int]] = []
    d = _pairwise(enc, enc)
    for s in np.unique(sub[sub >= 0]):
        idx = np.flatnonzero(sub == s)
        # keep parts eps-connected, so every member has a face of its own person within eps
        n_parts, part = connected_components(d[np.ix_(idx, idx)] <= eps, directed=False)
        for p in range(n_parts):
            members = idx[part == p]
            if len(members) < 2:
                noise[int(ids[members[0]])] = REASON_NOISE
                continue
            # cannot-link: one face per photo; keep the one closest to the rest of the group
            keep = []
            by_photo: dict[object, list[int]] = {}
            for i in members:
                by_photo.setdefault(photo[i], []).append(i)
            for same in by_photo.values():
                if len(same) == 1:
                    keep.append(same[0])
                    continue
                others = [j for j in members if photo[j] != photo[same[0]]]
                ref = others if others else list(members)
                score = [float(d[i, ref].mean()) for i in same]
                best = same[int(np.argmin(score))]
                keep.append(best)
                for i in same:
                    if i != best:
                        noise[int(ids[i])] = REASON_SAME_PHOTO
            if len(keep) < 2:
                for i in keep:
                    noise[int(ids[i])] = REASON_NOISE
                continue
            groups.append(sorted(int(ids[i]) for i in keep))
    return groups, noise


def match_ids(
    groups: Sequence[Sequence[int]],
    previous: dict[int, int | None],
    next_id: int,
    reserved: Iterable[int] = (),
) -> tuple[list[int], int]:
    """Give each group (list of face ids) a cluster id, reusing previous ids by overlap.

    A previous id goes to the group holding most of its old members (so after a merge the merged
    cluster keeps the id of the larger part, after a split the larger part keeps it); ties go to
    the larger group, then the smaller id. ``reserved`` ids belong to clusters outside this
    update. Groups left without an id get fresh ones from ``next_id`` upwards; ids are never reused.
    """
    taken: set[int] = set(reserved)
    candidates = []  # (-overlap, -group size, old id, group index)
    for gi, members in enumerate(groups):
        counts = Counter(previous.get(f) for f in members)
        counts.pop(None, None)
        for old, n in counts.items():
            candidates.append((-n, -len(members), old, gi))
    candidates.sort()
    ids: list[int | None] = [None] * len(groups)
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


def representative(members: Sequence[int], vec: Callable[[int], np.ndarray], quality: Callable[[int], float]) -> int:
    """The most central, sharpest face: best quality among the most central half."""
    members = sorted(members)
    sub = np.stack([vec(f) for f in members])
    d = np.linalg.norm(sub - sub.mean(axis=0), axis=1)
    central = np.argsort(d, kind="stable")[: max(1, (len(members) + 1) // 2)]
    return members[max(central, key=lambda i: (quality(members[i]), -i))]


class Neighbours:
    """Radius queries over a fixed set of encodings (brute force, blocked): the batch path."""

    def __init__(self, ids: np.ndarray, enc: np.ndarray):
        self.ids = np.asarray(ids)
        self.enc = enc
        self.sq = (enc * enc).sum(1)

    def within(self, vec: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        d = np.sqrt(np.maximum(self.sq + vec @ vec - 2 * self.enc @ vec, 0))
        hit = np.flatnonzero(d <= radius)
        return self.ids[hit], d[hit]


class People:
    """Derives people (stable ids, doubt) from a DBSCAN partition, fully or for what changed."""

    def __init__(self, cfg, refine: RefineFn | None = None):
        self.cfg = cfg
        self.refine = refine
        self.cid: dict[int, int | None] = {}  # face -> cluster id (None: noise)
        self.assign: dict[int, FaceAssignment] = {}

    def derive(
        self,
        clusters: dict[int, list[int]],
        vec: Callable[[int], np.ndarray],
        photo: Callable[[int], object],
        quality: Callable[[int], float],
        neighbours: Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray]],
        all_faces: Iterable[int],
        previous: dict[int, int | None],
        next_id: int,
        touched_faces: Iterable[int] | None = None,
        moved_vectors: Iterable[np.ndarray] = (),
    ) -> ClusterResult:
        """Recompute people for the given DBSCAN ``clusters`` (label -> face ids).

        Full run: pass every cluster and ``touched_faces=None``. Incremental run: pass only the
        clusters an update touched, ``touched_faces`` = faces whose DBSCAN label changed or that
        were inserted, and ``moved_vectors`` = encodings of deleted faces; doubt is then
        recomputed only within ``2 * eps`` of anything that changed.
        """
        eps, margin = self.cfg.eps, self.cfg.doubt_margin
        full = touched_faces is None
        all_faces = set(all_faces)
        for gone in [f for f in self.cid if f not in all_faces]:
            self.cid.pop(gone, None)
            self.assign.pop(gone, None)
        groups: list[list[int]] = []
        reasons: dict[int, str] = {}
        in_scope: set[int] = set()
        for label in sorted(clusters):
            members = sorted(clusters[label])
            in_scope.update(members)
            ids = np.array(members)
            enc = np.stack([vec(f) for f in members])
            ph = np.array([photo(f) for f in members], dtype=object)
            g, r = split_cluster(ids, enc, ph, eps, self.cfg, self.refine)
            groups += g
            reasons.update(r)
        scope_faces = set(touched_faces or ()) | in_scope if not full else all_faces
        old_ids_in_scope = {previous.get(f) for f in scope_faces} - {None}
        # ids still used by faces outside this update must not be handed to a group inside it
        reserved = set() if full else {c for f, c in self.cid.items() if c is not None and f not in scope_faces}
        new_ids, next_id = match_ids(groups, previous, next_id, reserved)
        result = ClusterResult(next_id=next_id)
        before = {f: self.cid.get(f) for f in scope_faces}
        for f in scope_faces:
            self.cid[f] = None
        for gid, members in zip(new_ids, groups):
            for f in members:
                self.cid[f] = gid
        changed = [f for f in scope_faces if before.get(f, -1) != self.cid.get(f)] if not full else list(all_faces)

        # doubt: recompute for faces near anything that changed
        if full:
            recheck = set(all_faces)
        else:
            recheck = set(scope_faces)
            probes = [vec(f) for f in changed] + list(moved_vectors)
            for v in probes:
                near, _ = neighbours(v, 2 * eps)
                recheck.update(int(x) for x in near)
        recheck &= all_faces
        for f in recheck:
            self.assign[f] = self._doubt(f, vec(f), neighbours, reasons.get(f))

        # clusters: size and representative for every id whose membership may have changed
        live = Counter(c for c in self.cid.values() if c is not None)
        affected_ids = {self.cid[f] for f in recheck if self.cid.get(f) is not None} | set(new_ids)
        for c in sorted(affected_ids):
            members = [f for f, cc in self.cid.items() if cc == c]
            confident = [f for f in members if not self.assign[f].doubtful] or members
            result.clusters[c] = (live[c], representative(confident, vec, quality))
        result.removed = old_ids_in_scope - set(live)
        result.assignments = {f: self.assign[f] for f in recheck}
        return result

    def _doubt(self, f: int, v: np.ndarray, neighbours, reason: str | None) -> FaceAssignment:
        eps, margin = self.cfg.eps, self.cfg.doubt_margin
        near, dist = neighbours(v, 2 * eps)
        own_c = self.cid.get(f)
        best: dict[int, float] = {}
        for g, d in zip(near.tolist(), dist.tolist()):
            c = self.cid.get(g)
            if g == f or c is None:
                continue
            if d < best.get(c, np.inf):
                best[c] = d
        if own_c is None:
            hint = min(best, key=lambda c: (best[c], c)) if best else None
            return FaceAssignment(None, True, reason or REASON_NOISE, hint)
        own = best.pop(own_c, np.inf)
        others = {c: d for c, d in best.items() if d <= eps}
        if others:
            other_c = min(others, key=lambda c: (others[c], c))
            if others[other_c] - own < margin:
                return FaceAssignment(own_c, True, f"almost as close to cluster {other_c} as to its own", other_c)
        return FaceAssignment(own_c, False, None, own_c)
