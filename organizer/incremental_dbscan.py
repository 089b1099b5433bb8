"""Exact incremental DBSCAN: the partition scikit-learn's DBSCAN gives, kept up to date point by point.

Written by hand because no maintained library does exact *and* fast inserts and deletions (the
README's "Clustering" section says which were tried, and the figures). For the current points
the engine keeps:

* the number of points within ``eps`` of each point (itself included): a point is *core* when it
  has at least ``min_samples`` (scikit-learn's definition);
* clusters = connected components of cores (cores within ``eps`` are linked);
* for each non-core point, its nearest core within ``eps`` (ties: the smaller key): a *border*
  point belongs to that core's cluster; a point with no core within ``eps`` is noise. (scikit-
  learn gives it to whichever cluster reached it first; the nearest core is deterministic.)

Points are kept in float32, the precision dlib computes encodings in. Neighbour search is an
exact brute force over that matrix with a float64 re-check near the boundary, so distances
compare to ``eps`` exactly (an approximate index could miss a neighbour and change the partition).
Clusters keep their label when untouched; a merge keeps the label of the larger cluster, a split
gives the largest part the old label.
"""

from __future__ import annotations

import logging
import os

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

_SLACK = 1e-4  # float32 screening margin (absolute, on distances of order 1)


class Partition(NamedTuple):
    """Every stored point's DBSCAN state, by key (ascending)."""

    eps: float
    keys: np.ndarray
    label: np.ndarray  # -1: noise
    core: np.ndarray


@dataclass
class Update:
    """What an insert or delete changed."""

    changed_keys: set[int] = field(default_factory=set)  # label changed, inserted or removed
    touched_labels: set[int] = field(default_factory=set)  # labels (after) whose members changed
    removed_labels: set[int] = field(default_factory=set)  # labels that no longer exist


class IncrementalDBSCAN:
    def __init__(self, eps: float, min_samples: int, dim: int = 128, capacity: int = 1024):
        self.eps = float(eps)
        self.min_samples = int(min_samples)
        self.dim = dim
        self._x32 = np.zeros((capacity, dim), dtype=np.float32)
        self._sq = np.full(capacity, np.inf, dtype=np.float32)  # inf marks a free row
        self._key = np.full(capacity, -1, dtype=np.int64)
        self._count = np.zeros(capacity, dtype=np.int32)
        self._core = np.zeros(capacity, dtype=bool)
        self._ncore = np.full(capacity, -1, dtype=np.int64)  # row of nearest core (non-core points)
        self._ncd = np.full(capacity, np.inf)
        self._label = np.full(capacity, -1, dtype=np.int64)
        self._row: dict[int, int] = {}
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._members: dict[int, set[int]] = {}  # label -> rows
        # neighbourhoods of the points inserted by the last insert() (kept up to date within it),
        # by their float32 bytes: the people layer asks for exactly these next, and a query costs
        # a pass over the whole matrix (memory-bound: ~7 ms at 100k faces)
        self._fresh: dict[bytes, tuple[list[int], list[float]] | None] = {}
        self._fresh_rows: dict[int, tuple[list[int], list[float]]] = {}
        self._next_label = 0

    # ---- storage ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, key: int) -> bool:
        return key in self._row

    def keys(self) -> Iterable[int]:
        """The keys of the stored points (a live view: copy it before inserting or deleting)."""
        return self._row.keys()

    def _grow(self) -> None:
        old = len(self._key)
        new = old + max(1024, old // 4)  # not doubling: at 100k faces a doubled copy is 100 MB more
        for name, fill in (("_x32", 0.0), ("_sq", np.inf), ("_key", -1), ("_count", 0),
                           ("_core", False), ("_ncore", -1), ("_ncd", np.inf), ("_label", -1)):
            arr = getattr(self, name)
            grown = np.full((new,) + arr.shape[1:], fill, dtype=arr.dtype)
            grown[:old] = arr
            setattr(self, name, grown)
        self._free.extend(range(new - 1, old - 1, -1))

    def _alloc(self, key: int, vec: np.ndarray) -> int:
        if not self._free:
            self._grow()
        r = self._free.pop()
        self._x32[r] = vec
        self._sq[r] = float(self._x32[r] @ self._x32[r])
        self._key[r] = key
        self._count[r] = 1
        self._core[r] = False
        self._ncore[r] = -1
        self._ncd[r] = np.inf
        self._label[r] = -1
        self._row[key] = r
        return r

    # ---- queries -------------------------------------------------------------------------------
    def _within_rows(self, vec64: np.ndarray, radius: float, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Rows (alive) within ``radius`` of vec (exactly) and their distances: float32-accurate
        (:func:`radius_query`), or exact (float64) with ``exact``."""
        rows, d = radius_query(self._x32, self._sq, None, vec64, radius)[0]
        return (rows, self._exact(rows, vec64)) if exact else (rows, d)

    def _exact(self, rows: np.ndarray, vec64: np.ndarray) -> np.ndarray:
        """Exact (float64) distances from ``vec64`` to ``rows``."""
        return np.sqrt(_sq_dist(self._x32, rows, vec64))

    def within(self, vec: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """Keys of stored points within ``radius`` of ``vec`` and their (float32-accurate) distances."""
        rows, d = self._within_rows(np.asarray(vec, dtype=np.float64), radius)
        return self._key[rows], d

    def within_many(self, vectors: np.ndarray, radius: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`within` for several vectors at once, with float32-accurate distances (membership
        is exact): see :func:`radius_query`. Points just inserted are answered from their
        insertion query."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
        if radius != self.eps or not self._fresh:
            return radius_query(self._x32, self._sq, self._key, vectors, radius)
        hits = [self._fresh.get(v.astype(np.float32).tobytes()) for v in vectors]
        rest = [i for i, h in enumerate(hits) if h is None]
        found = radius_query(self._x32, self._sq, self._key, vectors[rest], radius) if rest else []
        out = [None if h is None else (self._key[np.asarray(h[0], dtype=np.int64)], np.asarray(h[1]))
               for h in hits]
        for i, res in zip(rest, found):
            out[i] = res
        return out

    def vectors(self, keys: Sequence[int]) -> np.ndarray:
        """Encodings of ``keys`` as one (n, dim) array."""
        row = self._row
        return self._x32[[row[k] for k in keys]].astype(np.float64)

    def vector(self, key: int) -> np.ndarray:
        return self._x32[self._row[key]].astype(np.float64)

    def label(self, key: int) -> int:
        return int(self._label[self._row[key]])

    def is_core(self, key: int) -> bool:
        return bool(self._core[self._row[key]])

    def labels(self) -> dict[int, int]:
        return {k: int(self._label[r]) for k, r in self._row.items()}

    def clusters(self) -> dict[int, list[int]]:
        return {lab: sorted(int(self._key[r]) for r in rows) for lab, rows in self._members.items()}

    def partition(self) -> Partition:
        rows = np.flatnonzero(self._key >= 0)
        rows = rows[np.argsort(self._key[rows])]
        return Partition(self.eps, self._key[rows], self._label[rows], self._core[rows])

    def members(self, label: int) -> list[int]:
        rows = self._members.get(label, ())
        return np.sort(self._key[np.fromiter(rows, np.int64, len(rows))]).tolist()

    # ---- bookkeeping helpers ------------------------------------------------------------------
    def _set_label(self, r: int, lab: int, upd: Update) -> None:
        old = int(self._label[r])
        if old == lab:
            return
        if old >= 0:
            self._members[old].discard(r)
            upd.touched_labels.add(old)
        if lab >= 0:
            self._members.setdefault(lab, set()).add(r)
            upd.touched_labels.add(lab)
        self._label[r] = lab
        upd.changed_keys.add(int(self._key[r]))

    def _new_label(self) -> int:
        lab = self._next_label
        self._next_label += 1
        self._members[lab] = set()
        return lab

    def _better(self, d: float, r: int, than_d: float, than_r: int) -> bool:
        """Nearest-core order: smaller distance, then smaller key."""
        if than_r < 0:
            return True
        return (d, self._key[r]) < (than_d, self._key[than_r])

    def _nearest_core(self, r: int) -> tuple[int, float]:
        rows, d = self._within_rows(self._x32[r].astype(np.float64), self.eps, exact=True)
        best, best_d = -1, np.inf
        for q, dq in zip(rows.tolist(), d.tolist()):
            if q != r and self._core[q] and self._better(dq, q, best_d, best):
                best, best_d = q, dq
        return best, best_d

    def _settle_border(self, r: int, upd: Update) -> None:
        """Give non-core row r the label of its nearest core (or noise)."""
        best, best_d = self._nearest_core(r)
        self._ncore[r], self._ncd[r] = best, best_d
        self._set_label(r, int(self._label[best]) if best >= 0 else -1, upd)

    def _finish(self, upd: Update) -> Update:
        for lab in list(upd.touched_labels):
            if lab in self._members and not self._members[lab]:
                del self._members[lab]
                upd.removed_labels.add(lab)
        upd.touched_labels = {lab for lab in upd.touched_labels if lab in self._members}
        return upd

    # ---- insert ------------------------------------------------------------------------------
    def insert(self, keys: Sequence[int], vectors: np.ndarray) -> Update:
        """Add points (stored in float32, see the module docstring)."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32)).astype(np.float64)
        self._fresh, self._fresh_rows = {}, {}
        keys = [int(k) for k in keys]
        for key in keys:
            if key in self._row:
                raise KeyError(f"key {key} is already present")
        if len(set(keys)) != len(keys):
            raise KeyError("duplicate keys in one insert")
        # one pass over the matrix for all the new points (a photo's faces): the pass is
        # memory-bound, so k points at once cost little more than one
        existing = radius_query(self._x32, self._sq, None, vectors, self.eps)
        upd = Update()
        added: list[int] = []
        for key, vec, (rows, dist) in zip(keys, vectors, existing):
            self._insert_one(key, vec, upd, rows, dist, added)
        return self._finish(upd)

    def _insert_one(self, key: int, vec: np.ndarray, upd: Update, rows: np.ndarray, dist: np.ndarray,
                    added: list[int]) -> None:
        """Insert one point; ``rows``/``dist``: its neighbours among the points that were there
        before this insert() call, ``added``: rows inserted earlier in the call."""
        r = self._alloc(key, vec)
        upd.changed_keys.add(key)
        if added:
            earlier = np.asarray(added, dtype=np.int64)
            d = self._exact(earlier, vec)
            near = d <= self.eps
            rows, dist = np.concatenate([rows, earlier[near]]), np.concatenate([dist, d[near]])
        added.append(r)
        rows, dist = np.append(rows, r), np.append(dist, 0.0)
        self._remember(r, rows, dist)
        rows = rows[rows != r]
        self._count[r] = len(rows) + 1
        self._count[rows] += 1
        new_cores = []
        if self._count[r] >= self.min_samples:
            new_cores.append((r, rows))
        promoted = rows[(~self._core[rows]) & (self._count[rows] >= self.min_samples)]  # r is not in rows
        if len(promoted):  # neighbours that just became core: one matrix pass for all of them
            found = radius_query(self._x32, self._sq, None, self._x32[promoted].astype(np.float64), self.eps)
            new_cores += [(q, qr[qr != q]) for q, (qr, _) in zip(promoted.tolist(), found)]
        for c, nrows in new_cores:
            self._make_core(c, nrows, upd)
        if not self._core[r]:  # then it has fewer than min_samples neighbours: measure them exactly
            best, best_d = -1, np.inf
            for q, dq in zip(rows.tolist(), self._exact(rows, vec).tolist()):
                if self._core[q] and self._better(dq, q, best_d, best):
                    best, best_d = q, dq
            self._ncore[r], self._ncd[r] = best, best_d
            self._set_label(r, int(self._label[best]) if best >= 0 else -1, upd)

    def _remember(self, r: int, rows: np.ndarray, dist: np.ndarray) -> None:
        """Keep the neighbourhood of inserted row r (itself included, as a query returns it) and
        add r to those of the points inserted before it in the same call."""
        mine = self._x32[r].tobytes()
        if self._fresh_rows:
            earlier = np.fromiter(self._fresh_rows, np.int64, len(self._fresh_rows))
            at = np.flatnonzero(np.isin(rows, earlier) & (rows != r))
            for q, d in zip(rows[at].tolist(), dist[at].tolist()):
                entry = self._fresh_rows[q]
                entry[0].append(r)
                entry[1].append(d)
        entry = (rows.tolist(), dist.tolist())
        self._fresh_rows[r] = entry
        # two identical vectors in one call share a key: neither is answered from here
        self._fresh[mine] = None if mine in self._fresh else entry

    def _make_core(self, c: int, nrows: np.ndarray, upd: Update) -> None:
        self._core[c] = True
        self._ncore[c], self._ncd[c] = c, 0.0
        core_nb = nrows[self._core[nrows]]
        labels = set(np.unique(self._label[core_nb]).tolist()) - {-1}
        if labels:
            # merge: the largest cluster keeps its label (ties: the smaller label)
            keep = max(labels, key=lambda lab: (len(self._members[lab]), -lab))
            for lab in labels - {keep}:
                for q in list(self._members[lab]):
                    self._set_label(q, keep, upd)
        else:
            keep = self._new_label()
        self._set_label(c, keep, upd)
        # border points near the new core may now be closer to it (ties: the smaller key);
        # only they need exact distances
        nrows = nrows[~self._core[nrows]]
        ndist = self._exact(nrows, self._x32[c].astype(np.float64))
        nc = self._ncore[nrows]
        cur_key = np.where(nc >= 0, self._key[np.maximum(nc, 0)], np.iinfo(np.int64).max)
        ncd = self._ncd[nrows]
        closer = ~self._core[nrows] & ((ndist < ncd) | ((ndist == ncd) & (self._key[c] < cur_key)))
        for q, dq in zip(nrows[closer].tolist(), ndist[closer].tolist()):
            self._ncore[q], self._ncd[q] = c, dq
            self._set_label(q, keep, upd)

    # ---- delete ------------------------------------------------------------------------------
    def delete(self, keys: Iterable[int]) -> Update:
        self._fresh, self._fresh_rows = {}, {}
        upd = Update()
        for key in keys:
            self._delete_one(int(key), upd)
        return self._finish(upd)

    def _delete_one(self, key: int, upd: Update) -> None:
        r = self._row.pop(key)
        rows, _ = self._within_rows(self._x32[r].astype(np.float64), self.eps)
        rows = rows[rows != r]
        was_core, lab = bool(self._core[r]), int(self._label[r])
        if lab >= 0:
            self._members[lab].discard(r)
            upd.touched_labels.add(lab)
        upd.changed_keys.add(key)
        # free the row
        self._key[r], self._sq[r], self._core[r], self._label[r] = -1, np.inf, False, -1
        self._ncore[r], self._ncd[r], self._count[r] = -1, np.inf, 0
        self._free.append(r)
        self._count[rows] -= 1
        demoted = rows[self._core[rows] & (self._count[rows] < self.min_samples)]
        broken = {int(self._label[q]) for q in demoted.tolist()}
        if was_core:
            broken.add(lab)
        self._core[demoted] = False
        for q in demoted.tolist():
            self._ncore[q], self._ncd[q] = -1, np.inf
        for b in sorted(broken - {-1}):
            self._rebuild_cluster(b, upd)

    def _rebuild_cluster(self, lab: int, upd: Update) -> None:
        """Recompute one cluster after cores left it: it may split or dissolve."""
        members = np.array(sorted(self._members.get(lab, ())), dtype=np.int64)
        cores = members[self._core[members]] if len(members) else members
        groups: list[np.ndarray] = []
        if len(cores):
            from scipy.sparse import csr_matrix
            from scipy.sparse.csgraph import connected_components

            x = self._x32[cores].astype(np.float64)
            sq = (x * x).sum(1)
            d2 = sq[:, None] + sq[None, :] - 2 * x @ x.T
            cand = d2 <= (self.eps + _SLACK) ** 2
            i, j = np.nonzero(np.triu(cand, 1))
            exact = np.sqrt(((x[i] - x[j]) ** 2).sum(1)) <= self.eps
            i, j = i[exact], j[exact]
            graph = csr_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(len(cores), len(cores)))
            n, comp = connected_components(graph, directed=False)
            groups = [cores[comp == g] for g in range(n)]
            # the largest part keeps the label (ties: the part with the smallest key)
            groups.sort(key=lambda g: (-len(g), int(self._key[g].min())))
        for gi, g in enumerate(groups):
            new = lab if gi == 0 else self._new_label()
            for q in g.tolist():
                self._set_label(q, new, upd)
        for q in members[~self._core[members]].tolist() if len(members) else []:
            nc = int(self._ncore[q])
            if nc >= 0 and self._key[nc] >= 0 and self._core[nc]:
                self._set_label(q, int(self._label[nc]), upd)
            else:
                self._settle_border(q, upd)

    # ---- bulk build --------------------------------------------------------------------------
    @classmethod
    def build(cls, eps: float, min_samples: int, keys: Sequence[int], vectors: np.ndarray,
              dim: int = 128, block: int = 128) -> "IncrementalDBSCAN":
        """Start-up from the store: one blocked self-join (:class:`_SelfJoin`) instead of n inserts."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(keys), dim)
        n = len(keys)
        cap = n + _spare(n)  # room for new faces; grows by a quarter later
        eng = cls(eps, min_samples, dim, capacity=cap)
        if n == 0:
            return eng
        eng._x32[:n] = vectors
        eng._sq[:n] = np.einsum("ij,ij->i", eng._x32[:n], eng._x32[:n])
        eng._key[:n] = np.asarray(keys, dtype=np.int64)
        eng._row = {int(k): i for i, k in enumerate(keys)}
        eng._free = list(range(cap - 1, n - 1, -1))
        eng._adopt(_SelfJoin(eng._x32[:n], eng._sq[:n], eps, min_samples).run(block))
        return eng

    def _adopt(self, join: "_Joined") -> None:
        """Take the DBSCAN state of the first n rows from their self-join."""
        n = len(join.count)
        self._count[:n] = join.count
        self._core[:n] = join.core
        self._label_cores(join.core, join.root)
        self._attach_borders(join.pairs)
        labelled = np.flatnonzero(self._label[:n] >= 0)
        labels = self._label[labelled]
        order = np.argsort(labels, kind="stable")
        cuts = np.flatnonzero(np.diff(labels[order])) + 1
        self._members = {int(labels[g[0]]): set(labelled[g].tolist()) for g in np.split(order, cuts) if len(g)}
        # the people layer asks for the neighbourhoods of exactly these points next
        self._fresh = _neighbourhoods(self._x32, np.flatnonzero(~join.core), join.pairs)

    def _label_cores(self, core: np.ndarray, root: np.ndarray) -> None:
        """One label per union-find root, numbered in the order of the clusters' first rows."""
        cores = np.flatnonzero(core)
        roots, first, which = np.unique(root[cores], return_index=True, return_inverse=True)
        rank = np.empty(len(roots), dtype=np.int64)
        rank[np.argsort(first)] = np.arange(len(roots))
        self._label[cores] = rank[which]
        self._ncore[cores], self._ncd[cores] = cores, 0.0
        self._next_label = len(roots)

    def _attach_borders(self, pairs: "_Pairs") -> None:
        """Each non-core point joins the cluster of its nearest core (ties: the smaller key)."""
        to_core = self._core[pairs.b]
        a, c, d = pairs.a[to_core], pairs.b[to_core], pairs.dist[to_core]
        order = np.lexsort((self._key[c], d, a))
        a, c, d = a[order], c[order], d[order]
        first = np.flatnonzero(np.r_[True, a[1:] != a[:-1]]) if len(a) else np.zeros(0, dtype=np.int64)
        a, c, d = a[first], c[first], d[first]
        self._label[a] = self._label[c]
        self._ncore[a], self._ncd[a] = c, d


class _Pairs(NamedTuple):
    """Neighbour pairs (both directions) of the non-core points, with exact distances."""

    a: np.ndarray  # rows of non-core points
    b: np.ndarray  # their neighbours (rows)
    dist: np.ndarray


class _Joined(NamedTuple):
    """What a :class:`_SelfJoin` found."""

    count: np.ndarray  # points within eps of each point, itself included
    core: np.ndarray  # count >= min_samples
    root: np.ndarray  # union-find root: cores with one root form one cluster
    pairs: _Pairs


class _SelfJoin:
    """DBSCAN of a fixed point set in one pass over the upper triangle of its distance matrix.

    Written by hand: scikit-learn's DBSCAN lists every neighbour of every point (gigabytes at
    library size, where one person may have thousands of faces within eps of each other), and its
    border rule depends on the input order (see the module docstring).

    Rows are taken ``block`` at a time against themselves and every later row: one float32 matrix
    product per block, with the pairs near the eps boundary re-checked in float64. When a block is
    done its rows' neighbour counts are final (earlier rows added theirs as column sums), and a
    later row counted often enough is core for good (counts only grow). Core-core links whose ends
    are both known to be core go to a union-find at once, reduced per block to a few edges
    (:meth:`_link`), so the millions of pairs inside a big cluster are never listed. The other
    pairs are kept: one end of such a pair is not yet known to be core, so it has fewer than
    ``min_samples`` - 1 neighbours so far (or is a non-core row), and there are few of them.
    """

    def __init__(self, x32: np.ndarray, sq: np.ndarray, eps: float, min_samples: int):
        n = len(x32)
        self.x32, self.eps, self.min_samples = x32, eps, min_samples
        self.hi, self.lo = screen_limits(eps)
        # one matrix product gives squared distances directly: [x, |x|^2, 1] . [-2y, 1, |y|^2]
        ones = np.ones((n, 1), np.float32)
        self.left = np.hstack([x32, sq[:, None], ones])
        self.right = np.hstack([-2 * x32, ones, sq[:, None]]).T.copy()
        self.count = np.zeros(n, dtype=np.int64)
        self.parent = np.arange(n)
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []  # undecided pairs (rows, rows)

    def run(self, block: int) -> _Joined:
        n = len(self.x32)
        for start in range(0, n, block):
            self._block(start, min(n, start + block))
        return self._finish()

    def _block(self, start: int, stop: int) -> None:
        """Rows start..stop against rows start..n."""
        near = self._near(start, stop)
        width = stop - start
        # counts by bit-packing rows and summing columns in bytes (several times faster than
        # count_nonzero along an axis)
        self.count[start:stop] += np.bitwise_count(np.packbits(near, axis=1)).sum(1, dtype=np.int64)
        self.count[stop:] += np.add.reduce(near[:, width:].view(np.uint8), axis=0,
                                           dtype=np.uint8 if width < 256 else np.int64)
        # core for good: final rows by their count, later rows by theirs plus themselves
        known = np.concatenate([self.count[start:stop], self.count[stop:] + 1]) >= self.min_samples
        noncore = np.flatnonzero(~known[:width])
        later = width + np.flatnonzero(~known[width:])
        for rows, cols in ((noncore, slice(None)), (slice(None), later)):
            part = near[rows, cols]
            i, j = np.divmod(np.flatnonzero(part), part.shape[1])
            self.kept.append((start + np.arange(width)[rows][i], start + np.arange(near.shape[1])[cols][j]))
        near[noncore] = False
        near[:, noncore] = False
        near[:, later] = False
        self._link(near, start)

    def _near(self, start: int, stop: int) -> np.ndarray:
        """Which of rows start..n lie within eps of each row start..stop (exactly)."""
        d2 = self.left[start:stop] @ self.right[:, start:]
        near = d2 <= self.hi
        edge = np.flatnonzero(near & (d2 > self.lo))
        if len(edge):
            i, j = np.divmod(edge, near.shape[1])
            near[i, j] = self._dist(start + i, start + j) <= self.eps
        return near

    def _dist(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Exact (float64) distances between rows a and rows b, pairwise."""
        return np.sqrt(((self.x32[a].astype(np.float64) - self.x32[b]) ** 2).sum(1))

    def _link(self, links: np.ndarray, start: int) -> None:
        """Join the clusters of the rows start.. and the columns (rows start..n) ``links`` marks.

        Each linked column joins the last row it is linked to; then any link whose ends are
        still apart joins its row's first such column, until none is left (in a dense block, one
        or two rounds), so the union-find sees about one edge per column instead of every link."""
        width = len(links)
        weight = np.arange(1, width + 1, dtype=np.uint8 if width < 256 else np.int64)
        last = np.maximum.reduce(links.view(np.uint8) * weight[:, None], axis=0)
        cols = np.flatnonzero(last)
        if not len(cols):
            return
        rows = np.arange(start, start + width)
        _union(self.parent, cols + start, rows[last[cols].astype(np.int64) - 1])
        cols = np.arange(start, start + links.shape[1])
        while True:
            apart = links & (_roots(self.parent, rows)[:, None] != _roots(self.parent, cols)[None, :])
            bad = np.flatnonzero(apart.any(1))
            if not len(bad):
                return
            _union(self.parent, rows[bad], cols[apart[bad].argmax(1)])

    def _finish(self) -> _Joined:
        n = len(self.x32)
        core = self.count >= self.min_samples
        a = np.concatenate([i for i, _ in self.kept])
        b = np.concatenate([j for _, j in self.kept])
        pair = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
        a, b = pair // n, pair % n
        a, b = a[a != b], b[a != b]
        both = core[a] & core[b]
        _union(self.parent, a[both], b[both])
        a, b = np.concatenate([a[~both], b[~both]]), np.concatenate([b[~both], a[~both]])
        keep = ~core[a]  # each pair from the side of its non-core point(s)
        a, b = a[keep], b[keep]
        return _Joined(self.count, core, _roots(self.parent, np.arange(n)), _Pairs(a, b, self._dist(a, b)))


def _neighbourhoods(x32: np.ndarray, points: np.ndarray, pairs: _Pairs) -> dict[bytes, tuple[list[int], list[float]] | None]:
    """The neighbourhoods of ``points`` (rows, themselves included, ascending) as
    :meth:`IncrementalDBSCAN.within_many` answers them from its cache, by the points' float32
    bytes; ``pairs`` holds every neighbour of each of them."""
    a = np.concatenate([pairs.a, points])
    b = np.concatenate([pairs.b, points])
    d = np.concatenate([pairs.dist, np.zeros(len(points))])
    if not len(a):
        return {}
    order = np.lexsort((b, a))
    a, b, d = a[order], b[order], d[order]
    cuts = np.flatnonzero(np.diff(a)) + 1
    out: dict[bytes, tuple[list[int], list[float]] | None] = {}
    for rows, rb, rd in zip(np.split(a, cuts), np.split(b, cuts), np.split(d, cuts)):
        mine = x32[rows[0]].tobytes()
        # two identical vectors share a key: neither is answered from here
        out[mine] = None if mine in out else (rb.tolist(), rd.tolist())
    return out


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of a[k] and b[k] for every k in a union-find parent array (the smaller root
    becomes the parent)."""
    while len(a):
        ra, rb = _roots(parent, a), _roots(parent, b)
        apart = ra != rb
        if not apart.any():
            return
        np.minimum.at(parent, np.maximum(ra[apart], rb[apart]), np.minimum(ra[apart], rb[apart]))
        a, b = a[apart], b[apart]


def screen_limits(radius: float) -> tuple[float, float]:
    """(hi, lo) for squared distances computed in float32: above hi a point is outside ``radius``,
    at most lo inside; in between it must be re-measured in float64."""
    return (radius + _SLACK) ** 2, max(radius - _SLACK, 0.0) ** 2


def _sq_dist(x32: np.ndarray, rows: np.ndarray, vec64: np.ndarray) -> np.ndarray:
    """Exact squared distances (float64) from ``vec64`` to ``x32[rows]``."""
    return ((x32[rows].astype(np.float64) - vec64) ** 2).sum(axis=1)


def radius_query(x32: np.ndarray, sq: np.ndarray, keys: np.ndarray | None,
                 vectors: np.ndarray, radius: float, block: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each vector, the keys (``keys=None``: the row numbers) of the rows within ``radius``
    and their distances.

    One float32 matrix product per ``block`` vectors screens all rows (rows with an infinite
    squared norm ``sq`` are free and never match). Membership is exact: candidates near the
    radius are re-measured in float64. Other distances keep float32 accuracy (squared-distance
    error far below 1e-5), which is all ranking needs; callers that break ties re-measure.
    """
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    hi, lo = screen_limits(radius)
    out = []
    for start in range(0, len(vectors), block):
        v64 = vectors[start : start + block]
        v32 = v64.astype(np.float32)
        # for a few vectors X @ V.T is 1.5x faster than V @ X.T (OpenBLAS handles a transposed
        # right operand with few rows poorly); for many, the transposing copy costs more
        d2 = np.ascontiguousarray((x32 @ v32.T).T) if len(v32) <= 8 else v32 @ x32.T
        d2 *= -2.0
        d2 += sq[None, :]
        d2 += (v32 * v32).sum(1)[:, None]
        for row, vec in zip(d2, v64):
            cand = np.flatnonzero(row <= hi)
            dc = np.maximum(row[cand], 0.0).astype(np.float64)
            edge = np.flatnonzero(dc > lo)
            if len(edge):
                dc[edge] = _sq_dist(x32, cand[edge], vec)
                keep = dc <= radius * radius
                cand, dc = cand[keep], dc[keep]
            out.append((cand if keys is None else keys[cand], np.sqrt(dc)))
    return out


def _spare(n: int) -> int:
    """Free rows kept beyond n points."""
    return max(1024, n // 8)


def _roots(parent: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Roots of ``a`` in a union-find parent array (with path compression)."""
    a = np.asarray(a)
    r = parent[a]
    while True:
        rr = parent[r]
        if np.array_equal(rr, r):
            parent[a] = r
            return r
        r = rr


def save_state(eng: IncrementalDBSCAN, path) -> None:
    """Persist the engine (points and their DBSCAN state) atomically to an .npz file."""
    rows = np.flatnonzero(eng._key >= 0)
    ncore = eng._ncore[rows]
    save_arrays(path, lambda fh: _write_state(fh, eng, rows, ncore))


def save_arrays(path, write) -> None:
    """Write an .npz file atomically: ``write(fh)`` into a temporary file, fsync, rename."""
    tmp = f"{path}.tmp.npz"
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())  # a power cut after the rename must not leave a cut file behind
    os.replace(tmp, path)


def load_arrays(path) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz file; None when missing or unreadable (the caller recomputes)."""
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except Exception as exc:  # cut short, not a zip: recompute
        log.warning("ignoring %s (%s: %s)", path, type(exc).__name__, exc)
        return None


def _write_state(fh, eng: IncrementalDBSCAN, rows: np.ndarray, ncore: np.ndarray) -> None:
    np.savez(
        fh,
        params=np.array([eng.eps, eng.min_samples, eng.dim], dtype=np.float64),
        keys=eng._key[rows],
        # padded with room for new points, so loading needs no second copy of the matrix
        x=np.concatenate([eng._x32[rows], np.zeros((_spare(len(rows)), eng.dim), np.float32)]),
        count=eng._count[rows],
        core=eng._core[rows],
        ncore_key=np.where(ncore >= 0, eng._key[np.maximum(ncore, 0)], -1),
        ncd=eng._ncd[rows],
        label=eng._label[rows],
        next_label=np.array([eng._next_label]),
    )


def load_state(path, eps: float, min_samples: int, dim: int = 128) -> IncrementalDBSCAN | None:
    """Load a saved engine; None when missing, unreadable or made with other parameters."""
    try:
        with np.load(path) as z:
            params = z["params"]
            if tuple(params) != (float(eps), float(min_samples), float(dim)):
                return None
            keys, x = z["keys"], z["x"]
            n = len(keys)
            if x.dtype != np.float32:  # a state saved before points were kept in float32
                return None
            eng = IncrementalDBSCAN(eps, min_samples, dim, capacity=max(len(x), n + 1))
            if len(x) > n and x.shape[1] == dim:
                eng._x32 = x  # the padded matrix as loaded (rows past n are zeros)
            else:
                eng._x32[:n] = x
            eng._sq[:n] = np.einsum("ij,ij->i", eng._x32[:n], eng._x32[:n])
            eng._key[:n] = keys
            eng._count[:n] = z["count"]
            eng._core[:n] = z["core"]
            eng._ncd[:n] = z["ncd"]
            eng._label[:n] = z["label"]
            eng._next_label = int(z["next_label"][0])
            ncore_key = z["ncore_key"]
    except FileNotFoundError:
        return None
    except Exception as exc:  # cut short, empty, not a zip, wrong shapes: rebuild from the store
        log.warning("ignoring the saved clustering state %s (%s: %s); rebuilding it",
                    path, type(exc).__name__, exc)
        return None
    eng._row = {int(k): i for i, k in enumerate(keys.tolist())}
    eng._free = list(range(len(eng._key) - 1, n - 1, -1))
    eng._ncore[:n] = [eng._row.get(int(k), -1) if k >= 0 else -1 for k in ncore_key.tolist()]
    for r in np.flatnonzero(eng._label[:n] >= 0).tolist():
        eng._members.setdefault(int(eng._label[r]), set()).add(r)
    return eng
