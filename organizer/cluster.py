"""Cluster: group face encodings into people with DBSCAN and give each person a stable id.

The partition comes from DBSCAN (euclidean on the 128-d encodings): kept exactly and
incrementally by :mod:`organizer.incremental_dbscan` in the service, recomputed with scikit-learn
by `organizer recluster` (both driven by :mod:`organizer.clustering`). Everything derived from it
is *local*, so both paths give the same folders:

* people: each DBSCAN cluster is refined on its own (:func:`split_cluster`: refinement against
  chaining, eps-connected parts, a person seen once is not a person, cannot-link inside a photo);
* doubt: a face is doubtful when it is noise, unusable (too small or blurred), or when a face of
  another person lies within eps and is less than ``doubt_margin`` farther than the nearest face
  of its own person; its "nearest person" hint looks no farther than ``eps``;
* stable ids: new groups inherit ids from the previous partition by overlap (:func:`match_ids`),
  so adding or removing a photo never renumbers an existing person.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
from scipy.sparse.csgraph import connected_components

from .incremental_dbscan import Partition, radius_query, screen_limits

RefineFn = Callable[[np.ndarray, np.ndarray, object], np.ndarray]

# Average linkage needs all pairwise distances of a cluster (m^2 memory and time): on bigger
# clusters it runs on a fixed sample of this many faces (a few ms), and the other faces join the
# sampled group they are closest to on average. Chaining between two people still shows: a second
# person with a few percent of a cluster's faces is in the sample with a dozen or more.
REFINE_SAMPLE = 400

REASON_NOISE = "no confident match with any person"
REASON_SAME_PHOTO = "another face in the same photo matched this person better"
REASON_UNUSABLE = "face too small or too blurred to recognise reliably"
REASON_FEW = "fewer than {} confident photos of this person so far"


@dataclass(slots=True)  # one per face, twice (raw and final): slots save ~100 bytes each
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
    from sklearn.cluster import DBSCAN  # here, not at the top: importing scikit-learn takes seconds
    # and only the batch reference (`organizer recluster`) needs it

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


def average_linkage_split(enc: np.ndarray, photo: np.ndarray, cfg) -> np.ndarray:
    """Refinement against chaining: split one DBSCAN cluster with average-linkage
    agglomerative clustering cut at ``cfg.linkage_threshold``.

    DBSCAN joins two people when a few in-between faces link them; average linkage merges two
    groups only when their faces are close *on average*, so a thin chain does not hold them
    together. Deterministic, and a function of the cluster's members only.

    Faces of one photo are *not* pushed apart here: a large distance between two faces raises the
    average between every pair of groups holding them, and split one person in two when a photo
    showed them twice (a mirror, a photo on the wall). ``split_cluster`` keeps one face per photo
    in each group afterwards instead.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    d = _pairwise(enc, enc)
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(d, checks=False), method="average")
    return fcluster(z, t=cfg.linkage_threshold, criterion="distance") - 1


def _hash_ids(ids: np.ndarray) -> np.ndarray:
    """splitmix64 of the face ids: a fixed, well-mixed order in which to sample a cluster."""
    z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def refinement_sample(ids: np.ndarray, k: int = REFINE_SAMPLE) -> np.ndarray:
    """Indices of the ``k`` members whose hashed face id is smallest (all of them when m <= k).

    A uniform sample that depends only on the member set, so a batch run and an update agree;
    an insert changes it only when the new face hashes below the k-th (probability k/m), so the
    refinement of a big cluster is recomputed rarely (see ``_REFINED``)."""
    if len(ids) <= k:
        return np.arange(len(ids))
    return np.sort(np.argpartition(_hash_ids(ids), k)[:k])


# Refinement results by (function, threshold, sampled face ids): a pure function of these (face
# ids are never reused and a face's encoding and photo never change), so a cache hit is exact.
_REFINED: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_REFINED_MAX = 1024


def _refine_sampled(ids: np.ndarray, enc_of, photo: np.ndarray, cfg, refine: RefineFn) -> np.ndarray:
    """Refinement labels for every member; average linkage itself runs on the sample."""
    m = len(ids)
    s = refinement_sample(ids)
    key = (refine, getattr(cfg, "linkage_threshold", None), ids[s].tobytes())
    sub_s = _REFINED.get(key)
    if sub_s is None:
        sub_s = np.asarray(refine(enc_of(s), photo[s], cfg), dtype=int)
        _REFINED[key] = sub_s
        if len(_REFINED) > _REFINED_MAX:
            _REFINED.popitem(last=False)
    else:
        _REFINED.move_to_end(key)
    if len(s) == m:
        return sub_s
    if (sub_s == sub_s[0]).all():
        return np.full(m, sub_s[0], dtype=int)
    # the sample split: every other face joins the sampled group it is closest to on average
    # (the average-linkage criterion); ties go to the lower group label
    enc = enc_of(np.arange(m))
    groups = np.unique(sub_s[sub_s >= 0])
    d = _pairwise(enc, enc[s])
    mean = np.stack([d[:, sub_s == g].mean(1) for g in groups], axis=1)
    sub = groups[np.argmin(mean, axis=1)]
    sub[s] = sub_s
    return sub


def split_cluster(
    ids: np.ndarray, enc, photo: np.ndarray, eps: float, cfg, refine: RefineFn | None
) -> tuple[list[list[int]], dict[int, str]]:
    """People inside one DBSCAN cluster: (groups of face ids, {face id: reason} for the rest).

    ``enc`` is the members' encodings, or a function of member indices returning them (so a big
    cluster that stays whole never has all its encodings gathered).
    A pure function of the cluster's members (ids ascending), so it can be re-run on the clusters
    a new photo touched and still agree with a batch run. Average linkage runs on at most
    ``REFINE_SAMPLE`` faces (:func:`refinement_sample`), so its cost is bounded; the rest is O(m)
    unless refinement splits the cluster (only split parts are re-checked for eps-connectivity).
    """
    ids = np.asarray(ids)
    m = len(ids)
    enc_of = enc if callable(enc) else (lambda idx, enc=np.asarray(enc): enc[idx])
    refinable = refine is not None and m > 2
    sub = _refine_sampled(ids, enc_of, photo, cfg, refine) if refinable else np.zeros(m, dtype=int)
    noise: dict[int, str] = {int(ids[i]): REASON_NOISE for i in np.flatnonzero(sub < 0)}
    groups: list[list[int]] = []
    whole = bool((sub == 0).all())
    for s in np.unique(sub[sub >= 0]):
        idx = np.flatnonzero(sub == s)
        if whole:
            parts = [idx]
        elif len(idx) > REFINE_SAMPLE:
            # too big to check every pair; a group this size is its own proof of identity
            parts = [idx]
        else:
            # keep parts eps-connected, so every member has a face of its own person within eps
            sq = _pairwise(enc_of(idx), enc_of(idx)) <= eps
            n_parts, part = connected_components(sq, directed=False)
            parts = [idx[part == p] for p in range(n_parts)]
        for members in parts:
            if len(members) < 2:
                noise[int(ids[members[0]])] = REASON_NOISE
                continue
            keep = _one_face_per_photo(members, enc_of, photo, ids, noise)
            if len(keep) < 2:
                for i in keep:
                    noise[int(ids[i])] = REASON_NOISE
                continue
            groups.append(ids[np.asarray(keep)].tolist() if whole else sorted(int(ids[i]) for i in keep))
    return groups, noise


def _one_face_per_photo(members: np.ndarray, enc_of, photo: np.ndarray, ids, noise) -> list[int]:
    """Cannot-link: one person appears once per photo. Of several faces of one photo in a group,
    keep the one closest (mean distance) to the group's faces from other photos."""
    if len(set(photo[members].tolist())) == len(members):
        return members
    by_photo: dict[object, list[int]] = {}
    for i in members.tolist():
        by_photo.setdefault(photo[i], []).append(i)
    if all(len(v) == 1 for v in by_photo.values()):
        return members.tolist()
    keep = []
    for ph, same in by_photo.items():
        if len(same) == 1:
            keep.append(same[0])
            continue
        others = np.array([j for j in members.tolist() if photo[j] != ph] or members.tolist())
        oenc = enc_of(others)
        score = [float(np.linalg.norm(oenc - enc_of(np.array([i]))[0], axis=1).mean()) for i in same]
        best = same[int(np.argmin(score))]
        keep.append(best)
        for i in same:
            if i != best:
                noise[int(ids[i])] = REASON_SAME_PHOTO
    return sorted(keep)


def match_ids(
    groups: Sequence[Sequence[int]],
    previous: dict[int, int | None],
    next_id: int,
    reserved: Iterable[int] = (),
    overlaps: Sequence[Counter] | None = None,
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
        # ``overlaps``: the same counts, computed by the caller (vectorised)
        counts = Counter(previous.get(f) for f in members) if overlaps is None else overlaps[gi]
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
    order = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), int(min(groups[g]))))
    for gi in order:
        if ids[gi] is None:
            ids[gi] = next_id
            next_id += 1
    return [int(i) for i in ids], next_id


def representative(members: Sequence[int], vecs: Callable[[list[int]], np.ndarray], quality: Callable[[int], float]) -> int:
    """The most central, sharpest face: best quality among the most central half.
    (People passes a fixed sample of at most ``REFINE_SAMPLE`` faces of a big cluster.)"""
    members = sorted(members)
    sub = vecs(members)
    d = np.linalg.norm(sub - sub.mean(axis=0), axis=1)
    central = np.argsort(d, kind="stable")[: max(1, (len(members) + 1) // 2)]
    return members[max(central, key=lambda i: (quality(members[i]), -i))]


class FaceIndex(Protocol):
    """The faces the people layer works on: their encodings and radius queries over them.
    :class:`~organizer.incremental_dbscan.IncrementalDBSCAN` (the service) and
    :class:`Neighbours` (a batch run) provide it."""

    def __contains__(self, face: int) -> bool: ...

    def keys(self) -> Iterable[int]: ...

    def vectors(self, faces: Sequence[int]) -> np.ndarray: ...

    def within_many(self, vecs: np.ndarray, radius: float) -> list[tuple[np.ndarray, np.ndarray]]: ...

    def partition(self) -> Partition | None:
        """The DBSCAN partition of every face at ``cfg.eps`` and ``cfg.min_samples``, if known."""


class FaceChanges(NamedTuple):
    """What changed since the last derivation (an incremental run)."""

    touched: set[int]  # faces inserted, or whose DBSCAN label changed
    removed: Sequence[int]  # faces deleted


class Neighbours:
    """A :class:`FaceIndex` over a fixed set of encodings (brute force, blocked): the batch path.
    Same arithmetic as the engine's (:func:`~organizer.incremental_dbscan.radius_query`)."""

    def __init__(self, ids: np.ndarray, enc: np.ndarray):
        self.ids = np.asarray(ids)
        self.enc = np.asarray(enc, dtype=np.float64)
        self.x32 = self.enc.astype(np.float32)
        self.sq = np.einsum("ij,ij->i", self.x32, self.x32)
        self._row = {int(f): i for i, f in enumerate(self.ids.tolist())}

    def __contains__(self, face: int) -> bool:
        return face in self._row

    def keys(self) -> Iterable[int]:
        return self._row.keys()

    def vectors(self, faces: Sequence[int]) -> np.ndarray:
        return self.enc[[self._row[f] for f in faces]]

    def within(self, vec: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        return self.within_many(np.asarray(vec, dtype=np.float64)[None, :], radius)[0]

    def within_many(self, vecs: np.ndarray, radius: float) -> list[tuple[np.ndarray, np.ndarray]]:
        return radius_query(self.x32, self.sq, self.ids, vecs, radius)

    def partition(self) -> None:
        return None  # a batch run's clusters may come from another method


_NONE = (np.inf, -1)


def _room_for(arr: np.ndarray, f: int, fill) -> np.ndarray:
    """``arr`` (indexed by face id), grown with ``fill`` if needed so that ``arr[f]`` exists."""
    if f < len(arr):
        return arr
    grown = np.full((max(f + 1, 2 * len(arr)),) + arr.shape[1:], fill, dtype=arr.dtype)
    grown[: len(arr)] = arr
    return grown

# Radius queries screen distances in float32 (squared-distance error well under 1e-5 for
# encodings of norm ~1); faces whose squared distance is within this of the best are re-measured.
_TIE2 = 4e-5


class _Candidates:
    """Candidate nearest faces (face, kind 0 own / 1 other, candidate, exact distance); picks the
    nearest of each kind per face, ties to the smaller candidate id (as ``People._closest``)."""

    def __init__(self):
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, kind: int, faces: np.ndarray, cands: np.ndarray, dist: np.ndarray) -> None:
        if len(faces):
            self.parts.append((faces, np.full(len(faces), kind), cands, dist))

    def nearest(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(own distance, own face, other distance, other face) for each face of ``arr``
        (ascending): inf and -1 where there is none."""
        d = np.full((len(arr), 2), np.inf)
        g = np.full((len(arr), 2), -1, dtype=np.int64)
        if self.parts:
            face, kind, cand, dist = (np.concatenate(c) for c in zip(*self.parts))
            order = np.lexsort((cand, dist, kind, face))
            face, kind, cand, dist = face[order], kind[order], cand[order], dist[order]
            first = np.r_[True, (face[1:] != face[:-1]) | (kind[1:] != kind[:-1])]
            pos = np.searchsorted(arr, face[first])
            d[pos, kind[first]] = dist[first]
            g[pos, kind[first]] = cand[first]
        return d[:, 0], g[:, 0], d[:, 1], g[:, 1]


class People:
    """Derives people (stable ids, doubt) from a DBSCAN partition, fully or for what changed.

    For doubt it keeps, per face, its nearest face of the same person (``own``) and its nearest
    face of another person (``other``, for noise: of any person) within ``eps``; an update
    refreshes them from the distances to the faces that changed, and recomputes a face only when
    its own person changed or one of its recorded nearest faces changed or left.
    """

    def __init__(self, cfg, refine: RefineFn | None = None):
        self.cfg = cfg
        self.refine = refine
        self._index: FaceIndex | None = None  # the faces of the last derive/load
        self.cid: dict[int, int | None] = {}  # face -> cluster id (None: noise)
        self.assign: dict[int, FaceAssignment] = {}
        self.members: dict[int, set[int]] = {}  # cluster id -> faces
        self.own: dict[int, tuple[float, int]] = {}  # face -> (distance, face) of its own person
        self.other: dict[int, tuple[float, int]] = {}  # face -> (distance, face) of another person
        self._refs: dict[int, set[int]] = {}  # face -> faces that record it as own/other nearest
        self._reason: dict[int, str] = {}
        # A person needs as many confident faces as a DBSCAN core needs neighbours: a group whose
        # other faces are all doubtful is not yet a person (one stranger's photo in a folder of
        # its own). ``raw`` is each face's decision before that rule; ``assign`` the final one.
        self.min_confident = max(2, cfg.min_samples)
        self.raw: dict[int, FaceAssignment] = {}
        self._confident: dict[int, int] = {}  # cluster id -> faces whose raw decision is confident
        self._lonely: set[int] = set()  # cluster ids with fewer than min_confident confident faces
        self._cid_arr = np.full(1024, -2, dtype=np.int64)  # cid by face id (-1 noise, -2 unknown)
        self._near_d = np.full((1024, 2), np.inf)  # own and other distance by face id (vectorised)

    def _set_cid(self, f: int, c: int | None) -> None:
        old = self.cid.get(f)
        if old is not None:
            self.members[old].discard(f)
            if not self.members[old]:
                del self.members[old]
        self.cid[f] = c
        if c is not None:
            self.members.setdefault(c, set()).add(f)
        self._cid_arr = _room_for(self._cid_arr, f, -2)
        self._cid_arr[f] = -1 if c is None else c

    def _cids(self, faces: np.ndarray) -> np.ndarray:
        """Cluster id per face id (-1: noise, -2: unknown), vectorised."""
        out = np.full(len(faces), -2, dtype=np.int64)
        inside = faces < len(self._cid_arr)
        out[inside] = self._cid_arr[faces[inside]]
        return out

    def _exact(self, f: int, faces) -> np.ndarray:
        """Exact (float64) distances from face ``f`` to ``faces``."""
        v = self._vecs([f])[0]
        return np.sqrt(((self._vecs(list(faces)) - v) ** 2).sum(1))

    def _closest(self, f: int, near: np.ndarray, dist: np.ndarray) -> tuple[float, int]:
        """(exact distance, face) of the nearest of ``near`` to ``f``, ties to the smaller face id.
        ``dist`` is approximate (float32 screening): the few faces that could be the nearest are
        measured exactly, so the batch and incremental paths agree to the last bit."""
        if len(near) == 0:
            return _NONE
        lo = float(dist.min())
        close = np.flatnonzero(dist * dist <= lo * lo + _TIE2)
        exact = self._exact(f, near[close].tolist())
        j = np.lexsort((near[close], exact))[0]
        return float(exact[j]), int(near[close][j])

    def load(self, saved: dict[int, tuple], faces: Iterable[int], index: FaceIndex,
             near: dict[str, np.ndarray] | None = None) -> bool:
        """Resume from a saved clustering (clean store): ids and doubt from the store. The nearest
        own/other faces (needed for later updates) come from ``near`` (:meth:`near_state` saved at
        the last shutdown) when it was made for exactly these faces and ids - they are a function
        of those alone - and are recomputed otherwise (:meth:`_nearest_all`). True if reused."""
        faces = sorted(faces)
        self._index = index
        for f in faces:
            cid, doubtful, reason, hint = saved[f]
            self._set_cid(f, cid)
            self.assign[f] = FaceAssignment(cid, doubtful, reason, hint)
            if reason and cid is None:
                self._reason[f] = reason
        arr = np.asarray(faces, dtype=np.int64)
        reuse = (near is not None and np.array_equal(near.get("faces"), arr)
                 and np.array_equal(near.get("cid"), self._cids(arr)))
        if reuse:
            self._set_near_all(faces, near["own_d"], near["own_f"], near["other_d"], near["other_f"])
        else:
            self._nearest_all(faces)
        for f in faces:
            self._set_raw(f, self._decide(f))
        self._lonely = {c for c in self.members if self._confident.get(c, 0) < self.min_confident}
        return reuse

    def near_state(self) -> dict[str, np.ndarray]:
        """The nearest own/other faces of every face, as arrays (saved at shutdown for :meth:`load`)."""
        faces = np.asarray(sorted(self.cid), dtype=np.int64)
        own = [self.own.get(f, _NONE) for f in faces.tolist()]
        other = [self.other.get(f, _NONE) for f in faces.tolist()]
        return {
            "faces": faces, "cid": self._cids(faces),
            "own_d": np.array([d for d, _ in own], dtype=np.float64), "own_f": np.array([g for _, g in own], dtype=np.int64),
            "other_d": np.array([d for d, _ in other], dtype=np.float64), "other_f": np.array([g for _, g in other], dtype=np.int64),
        }

    def _set_raw(self, f: int, a: FaceAssignment | None) -> None:
        old = self.raw.get(f)
        for x, step in ((old, -1), (a, 1)):
            if x is not None and x.cluster_id is not None and not x.doubtful:
                n = self._confident.get(x.cluster_id, 0) + step
                if n:
                    self._confident[x.cluster_id] = n
                else:
                    self._confident.pop(x.cluster_id, None)
        if a is None:
            self.raw.pop(f, None)
        else:
            self.raw[f] = a

    def _final(self, f: int) -> FaceAssignment:
        a = self.raw[f]
        if a.cluster_id is not None and not a.doubtful and a.cluster_id in self._lonely:
            return FaceAssignment(a.cluster_id, True, REASON_FEW.format(self.min_confident), None)
        return a

    def _set_near(self, f: int, own: tuple[float, int], other: tuple[float, int]) -> None:
        for old in (self.own.get(f, _NONE)[1], self.other.get(f, _NONE)[1]):
            if old >= 0 and old in self._refs:
                self._refs[old].discard(f)
        self.own[f], self.other[f] = own, other
        self._near_d = _room_for(self._near_d, f, np.inf)
        self._near_d[f] = own[0], other[0]
        for new in (own[1], other[1]):
            if new >= 0:
                self._refs.setdefault(new, set()).add(f)

    def _vecs(self, faces: Sequence[int]) -> np.ndarray:
        return self._index.vectors(faces)

    def _recompute(self, faces: list[int], keep: bool = False) -> list:
        """Nearest own/other face of each face from scratch, in chunks (bounded memory);
        returns the radius query results when ``keep``."""
        kept = []
        for start in range(0, len(faces), 512):
            chunk = faces[start : start + 512]
            found = self._index.within_many(self._vecs(chunk), self.cfg.eps)
            self._nearest_from(chunk, found)
            if keep:
                kept += found
        return kept

    def _set_near_all(self, faces: list[int], own_d, own_f, other_d, other_f) -> None:
        for f, od, of, xd, xf in zip(faces, own_d.tolist(), own_f.tolist(), other_d.tolist(), other_f.tolist()):
            self._set_near(f, (od, of), (xd, xf))

    def _nearest_all(self, faces: list[int]) -> None:
        """Nearest own/other face of every face (``faces``, ascending), from scratch.

        With the index's DBSCAN partition (at our eps or wider) no query per face is needed: two
        faces within eps lie in one DBSCAN cluster unless one of them is not core (cores within
        eps are one cluster), so the distances inside each cluster plus the neighbourhoods of the
        non-core faces (a few neighbours each; after a build the engine answers them from its
        cache) hold every pair within eps. The result is the same as a query per face."""
        arr = np.asarray(faces, dtype=np.int64)
        part = self._index.partition()
        if part is None or part.eps < self.cfg.eps or not np.array_equal(part.keys, arr):
            self._recompute(faces)
            return
        found = _Candidates()
        order = np.argsort(part.label, kind="stable")
        cuts = np.flatnonzero(np.diff(part.label[order])) + 1
        for group in np.split(order, cuts):
            if len(group) > 1 and part.label[group[0]] >= 0:
                self._inside(arr[group], found)
        self._across(arr, part, found)
        self._set_near_all(faces, *found.nearest(arr))

    def _inside(self, ids: np.ndarray, found: "_Candidates") -> None:
        """Candidates for the nearest own/other faces among the faces ``ids`` of one DBSCAN
        cluster: the nearest of each kind by float32 distance, and any within ``_TIE2`` of it."""
        x = self._vecs(ids.tolist())
        x32 = x.astype(np.float32)
        sq = np.einsum("ij,ij->i", x32, x32)
        cid = self._cids(ids)
        person = cid >= 0
        eps = self.cfg.eps
        hi, lo = screen_limits(eps)
        step = max(1, (1 << 22) // len(ids))  # rows per block: 16 MB of float32 distances
        for s in range(0, len(ids), step):
            e = min(len(ids), s + step)
            d2 = x32[s:e] @ x32.T
            d2 *= -2.0
            d2 += sq[None, :]
            d2 += sq[s:e, None]
            near = d2 <= hi
            i, j = np.divmod(np.flatnonzero(near & (d2 > lo)), len(ids))
            near[i, j] = ((x[s + i] - x[j]) ** 2).sum(1) <= eps * eps  # exactly, as a query does
            near[np.arange(e - s), np.arange(s, e)] = False
            same = cid[s:e, None] == cid[None, :]
            for kind, mask in ((0, near & same & person[s:e, None]), (1, near & ~same & person[None, :])):
                dm = np.where(mask, d2, np.inf)
                tie = mask & (dm <= dm.min(1)[:, None] + _TIE2)
                i, j = np.divmod(np.flatnonzero(tie), len(ids))
                found.add(kind, ids[s + i], ids[j], np.sqrt(((x[j] - x[s + i]) ** 2).sum(1)))

    def _across(self, arr: np.ndarray, part: Partition, found: "_Candidates") -> None:
        """Candidates from the pairs within eps whose faces lie in different DBSCAN clusters
        (or in none): all of them have a non-core face, so its neighbourhood holds them."""
        sparse = arr[~part.core]
        for start in range(0, len(sparse), 512):
            chunk = sparse[start : start + 512]
            hits = self._index.within_many(self._vecs(chunk.tolist()), self.cfg.eps)
            f = np.repeat(chunk, [len(k) for k, _ in hits])
            g = np.concatenate([np.asarray(k, dtype=np.int64) for k, _ in hits])
            lf, lg = part.label[np.searchsorted(arr, f)], part.label[np.searchsorted(arr, g)]
            cross = ((lf != lg) | (lf < 0)) & (f != g)
            a, b = np.concatenate([f[cross], g[cross]]), np.concatenate([g[cross], f[cross]])
            ca, cb = self._cids(a), self._cids(b)
            ok = cb >= 0
            a, b = a[ok], b[ok]
            d = np.sqrt(((self._vecs(b.tolist()) - self._vecs(a.tolist())) ** 2).sum(1)) if len(a) else np.zeros(0)
            kind = np.where(ca[ok] == cb[ok], 0, 1)
            for k in (0, 1):
                found.add(k, a[kind == k], b[kind == k], d[kind == k])

    def _nearest_from(self, faces: list[int], found: list) -> None:
        for f, (near, dist) in zip(faces, found):
            mine = self.cid.get(f)
            cids = self._cids(near)
            ok = (cids >= 0) & (near != f)
            own = _NONE
            if mine is not None:
                sel = ok & (cids == mine)
                own = self._closest(f, near[sel], dist[sel])
                ok &= cids != mine
            self._set_near(f, own, self._closest(f, near[ok], dist[ok]))

    def _decide(self, f: int) -> FaceAssignment:
        eps, margin = self.cfg.eps, self.cfg.doubt_margin
        c = self.cid.get(f)
        od, og = self.other.get(f, _NONE)
        other_c = self.cid.get(og) if og >= 0 else None
        if c is None:
            return FaceAssignment(None, True, self._reason.get(f, REASON_NOISE), other_c)
        own_d = self.own.get(f, _NONE)[0]
        if og >= 0 and od <= eps and od - own_d < margin:
            return FaceAssignment(c, True, f"almost as close to cluster {other_c} as to its own", other_c)
        return FaceAssignment(c, False, None, c)

    def derive(
        self,
        clusters: dict[int, list[int]],
        index: FaceIndex,
        photo: Callable[[int], object],
        quality: Callable[[int], float],
        next_id: int,
        previous: dict[int, int | None] | None = None,
        changes: FaceChanges | None = None,
    ) -> ClusterResult:
        """Recompute people for the given DBSCAN ``clusters`` (label -> face ids) of ``index``.

        Full run (no ``changes``): every cluster of the index; ids are inherited from ``previous``
        (face -> cluster id). Incremental run: the clusters an update touched, and the ``changes``
        since the last run; ids are inherited from the current state, and nothing costs O(all
        faces). Both runs go through the same steps, so they agree.
        """
        self._index = index
        full = changes is None
        # the live faces: an update asks only `in` of them, so the index itself does (no O(n) copy)
        live = set(index.keys()) if full else index
        removed = ({f for f in self.cid if f not in live} if full
                   else {f for f in changes.removed if f in self.cid})
        old_cid = self._forget(removed)
        groups, reasons, in_scope = self._split(clusters, photo)
        # The faces in scope as one sorted array; from here on, work on a touched cluster of
        # thousands of faces is vectorised, and only faces whose person changes cost Python time.
        if full:
            scope = np.asarray(sorted(live), dtype=np.int64)
        else:  # members of live clusters are live faces; only touched faces may have left
            extra = [f for f in changes.touched if f in live]
            scope = np.unique(np.concatenate(in_scope + [np.asarray(extra, dtype=np.int64)]))
        current = self._cids(scope)  # before this update (-2: a new face)
        new_ids, next_id, old_ids = self._match(groups, scope, current, (previous or {}) if full else None,
                                                next_id, old_cid)
        changed = self._relabel(scope, current, groups, new_ids, reasons, full)
        touched = self._refresh_nearest(changed, removed, live, full)
        result = ClusterResult(next_id=next_id)
        touched |= self._redecide(touched, old_cid, live, full, result)
        self._summarise(touched, new_ids, live, quality, result)
        result.removed = {c for c in old_ids if c not in self.members}
        return result

    def _forget(self, removed: set[int]) -> dict[int, int | None]:
        """Drop removed faces; returns their cluster ids."""
        old_cid = {f: self.cid.get(f) for f in removed}
        for f in removed:
            self._set_raw(f, None)
            self._set_cid(f, None)
            self._set_near(f, _NONE, _NONE)
            for d in (self.cid, self.assign, self.own, self.other, self._reason):
                d.pop(f, None)
            self._cid_arr[f] = -2
        return old_cid

    def _split(self, clusters: dict[int, list[int]], photo) -> tuple[list[np.ndarray], dict[int, str], list[np.ndarray]]:
        """People in each DBSCAN cluster: (groups, noise reasons, each cluster's sorted members)."""
        groups: list[np.ndarray] = []
        reasons: dict[int, str] = {}
        in_scope: list[np.ndarray] = []
        for label in sorted(clusters):
            ids = np.asarray(sorted(clusters[label]), dtype=np.int64)
            in_scope.append(ids)
            ph = np.array([photo(f) for f in ids.tolist()], dtype=object)
            g, r = split_cluster(ids, lambda idx, ids=ids: self._vecs(ids[idx].tolist()), ph, self.cfg.eps,
                                 self.cfg, self.refine)
            groups += [np.asarray(x, dtype=np.int64) for x in g]
            reasons.update(r)
        return groups, reasons, in_scope

    def _match(self, groups, scope, current, previous, next_id, old_cid) -> tuple[list[int], int, set[int]]:
        """Ids for the groups: (ids, next free id, ids in use before). ``previous`` (a full run):
        the ids to inherit; None: the current state's (an update, which must leave the ids of
        faces outside it alone)."""
        if previous is not None:
            old_ids = {previous.get(f) for f in scope.tolist()} | set(old_cid.values())
            overlaps = [Counter(previous.get(f) for f in g.tolist()) for g in groups]
            reserved: set[int] = set()
        else:  # read the current state from the array
            old_ids = set(np.unique(current[current >= 0]).tolist()) | set(old_cid.values())
            overlaps = []
            for g in groups:
                c, n = np.unique(self._cids(g), return_counts=True)
                overlaps.append(Counter({int(a): int(b) for a, b in zip(c, n) if a >= 0}))
            # ids still used by faces outside this update must not be handed to a group inside it
            inside, n_inside = np.unique(current[current >= 0], return_counts=True)
            whole = {int(c) for c, n in zip(inside, n_inside) if n == len(self.members[int(c)])}
            reserved = set(self.members) - whole
        old_ids.discard(None)
        new_ids, next_id = match_ids(groups, previous or {}, next_id, reserved, overlaps=overlaps)
        return new_ids, next_id, old_ids

    def _relabel(self, scope, current, groups, new_ids, reasons, full: bool) -> list[int]:
        """Give the faces in scope their new ids and noise reasons; returns the faces to
        re-examine (a full run: all of them; an update: those whose id changed)."""
        new = np.full(len(scope), -1, dtype=np.int64)
        for gid, members in zip(new_ids, groups):
            new[np.searchsorted(scope, members)] = gid
        moved = np.flatnonzero(current != new)
        reason = self._reason
        for f, c in zip(scope[moved].tolist(), new[moved].tolist()):
            self._set_cid(f, c if c >= 0 else None)
            if c >= 0:
                reason.pop(f, None)
        for f in scope[new < 0].tolist():
            reason[f] = reasons.get(f, REASON_NOISE)
        return scope.tolist() if full else scope[moved].tolist()

    def _refresh_nearest(self, changed: list[int], removed: set[int], live, full: bool) -> set[int]:
        """Nearest own/other faces: recompute the changed faces and (an update) the faces whose
        recorded nearest faces changed or left, and patch the other neighbours of changed faces.
        Returns every face whose nearest faces may have changed."""
        changed_set = set(changed)
        if full:
            self._nearest_all(changed)
            return changed_set
        redo: set[int] = set()
        for x in removed | changed_set:
            redo |= self._refs.pop(x, set())
        redo = {f for f in redo - changed_set if f in live}
        near_changed = self._recompute(changed, keep=True)
        patched = self._patch_neighbours(changed, near_changed, changed_set | redo, live)
        self._recompute(sorted(redo))
        return changed_set | redo | patched

    def _patch_neighbours(self, changed: list[int], found: list, skip: set[int], live) -> set[int]:
        """Neighbours of changed faces that a changed face is now nearer to than their recorded
        nearest face of its kind (own/other person); returns them."""
        patched: set[int] = set()
        for f, (near, dist) in zip(changed, found):
            cf = self.cid[f]
            if cf is None:
                continue
            # only neighbours that f may be nearer to than their recorded nearest (vectorised
            # screen over what can be thousands of neighbours in a big cluster)
            mine = self._cids(near) == cf
            inside = near < len(self._near_d)
            best_d = np.full(len(near), np.inf)
            best_d[inside] = np.where(mine[inside], self._near_d[near[inside], 0], self._near_d[near[inside], 1])
            maybe = np.flatnonzero((near != f) & (dist * dist <= best_d * best_d + _TIE2))
            for g, same in zip(near[maybe].tolist(), mine[maybe].tolist()):
                if g in skip or g not in live:
                    continue
                own, other = self.own.get(g, _NONE), self.other.get(g, _NONE)
                d = float(self._exact(g, [f])[0])
                if (d, f) < (own if same else other):
                    self._set_near(g, (d, f), other) if same else self._set_near(g, own, (d, f))
                    patched.add(g)
        return patched

    def _redecide(self, touched: set[int], old_cid: dict, live, full: bool, result: ClusterResult) -> set[int]:
        """Doubt for the touched faces, and for every face of a group that crossed the
        min_confident line; changed decisions (a full run: all) go into ``result``. Returns the
        faces decided."""
        live_touched = {f for f in touched if f in live}
        check = {c for c in old_cid.values() if c is not None}
        for f in live_touched:
            old = self.raw.get(f)
            if old is not None and old.cluster_id is not None:
                check.add(old.cluster_id)
            a = self._decide(f)
            self._set_raw(f, a)
            if a.cluster_id is not None:
                check.add(a.cluster_id)
        final = set(live_touched)
        for c in check:
            lonely = c in self.members and self._confident.get(c, 0) < self.min_confident
            if lonely != (c in self._lonely):
                final |= self.members.get(c, set())  # the whole group changes side
            if lonely:
                self._lonely.add(c)
            else:
                self._lonely.discard(c)
        for f in final:
            a = self._final(f)
            if full or self.assign.get(f) != a:
                result.assignments[f] = a
            self.assign[f] = a
        return final

    def _summarise(self, touched: set[int], new_ids: list[int], live, quality, result: ClusterResult) -> None:
        """Size and representative of every cluster whose membership or doubt changed."""
        affected = {self.cid[f] for f in touched if f in live and self.cid.get(f) is not None} | set(new_ids)
        for c in sorted(affected):
            members = self.members.get(c, set())
            if not members:
                continue
            ids = np.sort(np.fromiter(members, np.int64, len(members)))
            sample = ids[refinement_sample(ids)].tolist()  # all of them, up to REFINE_SAMPLE
            confident = [f for f in sample if not self.assign[f].doubtful] or sample
            result.clusters[c] = (len(members), representative(confident, self._vecs, quality))
