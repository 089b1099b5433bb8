"""Stable person ids: adds, a merge and a split, through the engine and the people layer."""

from __future__ import annotations

import numpy as np
import pytest

from organizer.cluster import REFINE_SAMPLE, FaceChanges, Neighbours, People, average_linkage_split, batch_labels, match_ids
from organizer.config import ClusteringConfig
from organizer.incremental_dbscan import IncrementalDBSCAN

CFG = ClusteringConfig(eps=0.5, min_samples=2, doubt_margin=0.0)


def test_match_ids_rules():
    prev = {1: 10, 2: 10, 3: 10, 4: 11, 5: 11}
    # merge: 10 (3 faces) and 11 (2 faces) -> one group keeps 10
    ids, nxt = match_ids([[1, 2, 3, 4, 5]], prev, 12)
    assert ids == [10] and nxt == 12
    # split: the larger part keeps 10, the other gets a fresh id; untouched 11 keeps its id
    ids, nxt = match_ids([[1], [2, 3], [4, 5]], prev, 12)
    assert ids == [12, 10, 11] and nxt == 13
    # reserved ids are never handed out
    ids, _ = match_ids([[4, 5]], prev, 12, reserved={11})
    assert ids == [12]


class World:
    """Points on a line in 128-d (first coordinate), driven through engine + People."""

    refine = None  # People's refinement function (None: DBSCAN clusters taken whole)

    def __init__(self, cfg=CFG):
        self.cfg = cfg
        self.engine = IncrementalDBSCAN(cfg.eps, cfg.min_samples, dim=128)
        self.people = People(cfg, self.refine)
        self.vec: dict[int, np.ndarray] = {}
        self.next_id = 1
        self.store: dict[int, int | None] = {}

    def _point(self, x: float) -> np.ndarray:
        v = np.zeros(128)
        v[0] = x
        return v

    def _derive(self, upd, removed=()):
        live = self.engine.clusters()
        res = self.people.derive(
            {lab: live[lab] for lab in upd.touched_labels if lab in live},
            self.engine, photo=lambda f: f, quality=lambda f: 0.0, next_id=self.next_id,
            changes=FaceChanges(upd.changed_keys & set(self.vec), removed),
        )
        self.next_id = res.next_id
        for f, a in res.assignments.items():
            self.store[f] = a.cluster_id
        for f in list(self.store):
            if f not in self.vec:
                del self.store[f]
        return res

    def add(self, key: int, x: float):
        self.vec[key] = self._point(x)
        return self._derive(self.engine.insert([key], self.vec[key][None, :]))

    def remove(self, key: int):
        self.vec.pop(key)
        return self._derive(self.engine.delete([key]), [key])

    def ids(self, keys):
        return {self.people.cid.get(k) for k in keys}

    def full_assignments(self):
        """What a from-scratch derivation (as `organizer recluster` does) says of every face."""
        keys = sorted(self.vec)
        enc = np.stack([self.vec[k] for k in keys])
        labels = batch_labels(enc, self.cfg.eps, self.cfg.min_samples)
        people = People(self.cfg, self.refine)
        res = people.derive(
            {int(l): [k for k, ll in zip(keys, labels) if ll == l] for l in set(labels.tolist()) if l >= 0},
            Neighbours(np.array(keys), enc), photo=lambda f: f, quality=lambda f: 0.0,
            next_id=self.next_id, previous=dict(self.people.cid),
        )
        return {f: (a.cluster_id, a.doubtful, a.nearest_cluster) for f, a in res.assignments.items()}

    def batch_partition(self):
        keys = sorted(self.vec)
        enc = np.stack([self.vec[k] for k in keys])
        labels = batch_labels(enc, self.cfg.eps, self.cfg.min_samples)
        groups = {}
        for k, lab in zip(keys, labels):
            if lab >= 0:
                groups.setdefault(lab, set()).add(k)
        return {frozenset(g) for g in groups.values()}

    def partition_dbscan_size(self) -> int:
        """Size of the biggest DBSCAN cluster."""
        return max((len(m) for m in self.engine.clusters().values()), default=0)

    def partition(self):
        groups = {}
        for k, c in self.people.cid.items():
            if c is not None:
                groups.setdefault(c, set()).add(k)
        return {frozenset(g) for g in groups.values()}


def test_adds_merge_split_keep_ids():
    w = World()
    # person A: 3 faces around 0; person B: 2 faces around 5
    for k, x in [(1, 0.0), (2, 0.3), (3, 0.6)]:
        w.add(k, x)
    for k, x in [(4, 5.0), (5, 5.3)]:
        w.add(k, x)
    (a,) = w.ids([1, 2, 3])
    (b,) = w.ids([4, 5])
    assert a is not None and b is not None and a != b
    # adding a face to A changes nothing for B
    w.add(6, 0.9)
    assert w.ids([1, 2, 3, 6]) == {a} and w.ids([4, 5]) == {b}
    # a chain of faces bridges A and B: the merged person keeps A's id (the larger)
    for k, x in [(7, 1.3), (8, 1.7), (9, 2.1), (10, 2.5), (11, 2.9), (12, 3.3), (13, 3.7), (14, 4.1), (15, 4.5)]:
        w.add(k, x)
    assert w.ids(range(1, 16)) == {a}
    assert w.partition() == w.batch_partition()
    # removing the middle of the bridge splits it again: the larger part keeps a, the smaller a fresh id
    w.remove(11)
    left, right = w.ids([1, 2, 3, 6, 7, 8, 9, 10]), w.ids([12, 13, 14, 15, 4, 5])
    assert left == {a}
    assert len(right) == 1 and right != {a} and right != {None}
    assert w.partition() == w.batch_partition()
    # ids are never reused
    assert w.next_id > max(a, b, *right)


def test_incremental_equals_batch_on_random_sequence():
    rng = np.random.default_rng(7)
    w = World(ClusteringConfig(eps=0.5, min_samples=4, doubt_margin=0.2))
    alive = []
    for step in range(150):
        if alive and rng.random() < 0.3:
            k = alive.pop(int(rng.integers(len(alive))))
            w.remove(k)
        else:
            k = step + 100
            w.add(k, float(rng.choice([0.0, 1.1, 3.0])) + rng.normal(0, 0.2))
            alive.append(k)
        assert w.partition() == w.batch_partition(), step
        ours = {f: (a.cluster_id, a.doubtful, a.nearest_cluster) for f, a in w.people.assign.items()}
        assert ours == w.full_assignments(), step



@pytest.mark.parametrize("seed", range(5))
def test_face_between_two_people_is_doubtful_in_any_order(seed):
    """A face 0.42 from person A and 0.48 from person B (margin 0.2) is doubtful, whatever the
    order faces arrive or leave in; the incremental result always equals a from-scratch one."""
    w = World(ClusteringConfig(eps=0.5, min_samples=5, doubt_margin=0.2))
    points = {1: 0.0, 2: 0.1, 3: 0.15, 4: 0.2, 10: 0.3, 5: 1.2, 6: 1.3, 7: 1.35, 8: 1.4, 11: 1.5, 9: 0.72}
    order = list(points)
    np.random.default_rng(seed).shuffle(order)
    for k in order:
        w.add(k, points[k])
        assert {f: (a.cluster_id, a.doubtful, a.nearest_cluster) for f, a in w.people.assign.items()} == w.full_assignments()
    a, b, mid = w.people.assign[1].cluster_id, w.people.assign[5].cluster_id, w.people.assign[9]
    assert a != b and mid.cluster_id == a and mid.doubtful and mid.nearest_cluster == b
    w.remove(5)  # B loses a core and dissolves: nothing else is near the face any more
    assert {f: (x.cluster_id, x.doubtful, x.nearest_cluster) for f, x in w.people.assign.items()} == w.full_assignments()
    assert not w.people.assign[9].doubtful


class World2(World):
    """Points in a plane (first two coordinates of 128)."""

    def _point(self, x) -> np.ndarray:
        v = np.zeros(128)
        v[:2] = x
        return v


@pytest.mark.parametrize("seed", [1, 3, 4])
def test_groups_with_too_few_confident_faces_incrementally(seed):
    """A group whose faces are mostly doubtful (between people) has fewer confident faces than a
    person needs: all its faces go to doubtful, and back once it has enough. Incremental updates
    agree with a from-scratch derivation at every step, including when a group changes side."""
    rng = np.random.default_rng(seed)
    w = World2(ClusteringConfig(eps=0.5, min_samples=4, doubt_margin=0.3))
    centres = rng.uniform(0, 3, (8, 2))
    alive, few = [], 0
    for step in range(150):
        if len(alive) > 1 and rng.random() < 0.25:
            w.remove(alive.pop(int(rng.integers(len(alive)))))
        else:
            w.add(step + 100, centres[rng.integers(8)] + rng.normal(0, 0.2, 2))
            alive.append(step + 100)
        ours = {f: (a.cluster_id, a.doubtful, a.nearest_cluster) for f, a in w.people.assign.items()}
        assert ours == w.full_assignments(), step
        lonely = [a for a in w.people.assign.values() if a.reason and a.reason.startswith("fewer than 4")]
        few += bool(lonely)
        for c in {a.cluster_id for a in lonely}:
            assert all(w.people.assign[f].doubtful for f in w.people.members[c])
    assert few > 0, "the sequence never made a group with too few confident faces"


class WorldR(World):
    """Points given as 128-d vectors; refinement (average linkage) on, as by default."""

    refine = staticmethod(average_linkage_split)

    def _point(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)


def test_big_cluster_refined_on_a_sample_incrementally_equals_batch():
    """A DBSCAN cluster bigger than REFINE_SAMPLE: average linkage runs on a hashed sample of
    it, the other faces join the sampled group they are closest to. Person B, chained to the
    much bigger person A, is still split off, and updates agree with a batch run throughout."""
    rng = np.random.default_rng(11)
    cfg = ClusteringConfig()  # the defaults: eps 0.36, linkage threshold 0.38 (unit encodings)
    unit = 1 / 1.415  # raw dlib encodings are ~1.41 long: the layout below is in raw distances
    a = rng.normal(0, 1, 128)
    a *= 0.45 * unit / np.linalg.norm(a)
    b = -a  # 0.9 apart (raw)
    spread = 0.3 * unit / np.sqrt(128)
    w = WorldR(cfg)
    key = 0
    people_a, people_b = [], []
    order = ["a"] * 420 + ["b"] * 60
    rng.shuffle(order)
    chain = [a + (b - a) * t for t in np.linspace(0.1, 0.9, 9)]
    for step, who in enumerate(order):
        if step == 200:
            for v in chain:  # the bridge that makes DBSCAN join A and B
                w.add(key, v)
                key += 1
        centre = a if who == "a" else b
        w.add(key, centre + rng.normal(0, spread, 128))
        (people_a if who == "a" else people_b).append(key)
        key += 1
        if step in (150, 300, 479):
            assert step < 479 or w.partition_dbscan_size() > REFINE_SAMPLE, "the sampled path is tested"
            ours = {f: (x.cluster_id, x.doubtful, x.nearest_cluster) for f, x in w.people.assign.items()}
            assert ours == w.full_assignments(), step
    (ida,) = {w.people.cid[f] for f in people_a} - {None}
    idsb = {w.people.cid[f] for f in people_b} - {None}
    assert len(idsb) == 1 and ida not in idsb
    assert sum(w.people.cid[f] is not None for f in people_a + people_b) >= 0.95 * 480
    # the final DBSCAN cluster (A + chain + B) really went through the sampled split
    from organizer.cluster import split_cluster

    (big,) = [m for m in w.engine.clusters().values() if len(m) > REFINE_SAMPLE]
    sizes = []

    def recording(enc, photo, c):
        sizes.append(len(enc))
        return average_linkage_split(enc, photo, c)

    ids = np.array(big)
    groups, _ = split_cluster(ids, w.engine.vectors(big), np.array(big, dtype=object), cfg.eps, cfg, recording)
    assert sizes == [REFINE_SAMPLE] and len(groups) >= 2


def test_saved_nearest_faces_are_reused_only_when_they_fit():
    """People.load takes the nearest own/other faces saved at shutdown instead of recomputing
    them (minutes at 100k faces) - only when they were made for exactly these faces and ids."""
    rng = np.random.default_rng(5)
    w = World2(ClusteringConfig(eps=0.5, min_samples=3, doubt_margin=0.2))
    centres = rng.uniform(0, 3, (5, 2))
    for k in range(60):
        w.add(k, centres[k % 5] + rng.normal(0, 0.2, 2))
    saved = {f: (a.cluster_id, a.doubtful, a.reason, a.nearest_cluster) for f, a in w.people.assign.items()}
    near = w.people.near_state()

    def fresh(near_state):
        p = People(w.cfg)
        reused = p.load(saved, saved, w.engine, near=near_state)
        return reused, p

    recomputed = fresh(None)[1]
    reused, p = fresh(near)
    assert reused and p.own == recomputed.own == w.people.own and p.other == recomputed.other
    assert p.assign == recomputed.assign and p.raw == recomputed.raw
    stale = dict(near, cid=near["cid"].copy())
    stale["cid"][0] += 1  # ids changed since it was saved
    assert not fresh(stale)[0]
    fewer = {k: v[1:] for k, v in near.items()}  # a face came or went since
    assert not fresh(fewer)[0]


def _first_pass_both_ways(cfg, keys, x, photo, refine):
    """People from scratch over a built engine and over a query per face (the batch path):
    they must agree exactly, nearest faces and distances included, and so must a start that
    loads the people without their saved nearest faces. Returns the result."""
    eng = IncrementalDBSCAN.build(cfg.eps, cfg.min_samples, keys.tolist(), x, dim=x.shape[1], block=64)
    fast = People(cfg, refine)
    got = fast.derive(eng.clusters(), eng, photo=photo.get, quality=lambda f: 0.0, next_id=1, previous={})
    slow = People(cfg, refine)
    want = slow.derive(eng.clusters(), Neighbours(keys, x.astype(np.float32).astype(np.float64)),
                       photo=photo.get, quality=lambda f: 0.0, next_id=1, previous={})
    assert fast.own == slow.own and fast.other == slow.other
    assert got.assignments == want.assignments and got.clusters == want.clusters
    loaded = People(cfg, refine)
    saved = {f: (a.cluster_id, a.doubtful, a.reason, a.nearest_cluster) for f, a in slow.raw.items()}
    assert not loaded.load(saved, saved, eng)
    assert loaded.own == slow.own and loaded.other == slow.other
    return fast, got


def test_first_pass_over_a_built_engine_equals_a_query_per_face():
    """The first pass over a freshly built engine finds the nearest faces from the pairs inside
    each DBSCAN cluster plus the non-core faces' neighbourhoods, not a query per face."""
    rng = np.random.default_rng(21)
    cfg = ClusteringConfig()
    unit = 1 / 1.415
    centres = rng.normal(0, 1, (12, 128))
    centres *= 0.42 * unit / np.linalg.norm(centres, axis=1, keepdims=True)
    spread = 0.3 * unit / np.sqrt(128)
    vecs = [centres[rng.integers(12)] + rng.normal(0, spread, 128) for _ in range(500)]
    vecs += [c + (centres[1] - c) * t for c in centres[2:4] for t in np.linspace(0.15, 0.85, 6)]  # chains
    vecs += list(rng.normal(0, 0.42 * unit / np.sqrt(128), (60, 128)))  # strangers
    vecs += [v + rng.normal(0, 0.1 * spread, 128) for v in vecs[-20:]]  # strangers seen twice
    x = np.array(vecs)
    keys = np.sort(rng.permutation(5000)[: len(x)])
    photo = {int(k): int(k) // 3 for k in keys}  # some photos hold two or three faces
    _, got = _first_pass_both_ways(cfg, keys, x, photo, average_linkage_split)
    assert len(got.clusters) >= 10 and sum(a.doubtful for a in got.assignments.values()) >= 60


def test_first_pass_with_faces_near_two_clusters():
    """Points in a plane at the density where DBSCAN leaves many border and noise points: many
    pairs within eps join faces of different DBSCAN clusters (through a non-core face)."""
    rng = np.random.default_rng(4)
    cfg = ClusteringConfig(eps=0.5, min_samples=4, doubt_margin=0.2)
    x = np.zeros((700, 128))
    x[:, :2] = np.vstack([rng.uniform(0, 12, (500, 2)), rng.normal(0, 0.4, (200, 2)) + rng.uniform(0, 12, (1, 2))])
    keys = np.arange(len(x)) * 2 + 1
    photo = {int(k): int(k) // 5 for k in keys}
    people, got = _first_pass_both_ways(cfg, keys, x, photo, None)
    assert len(got.clusters) >= 10
    noise = {f for f, a in got.assignments.items() if a.cluster_id is None}
    across = [f for f, (d, g) in people.other.items() if g >= 0 and f not in noise]
    assert len(across) >= 10 and sum(people.other[f][1] >= 0 for f in noise) >= 10
