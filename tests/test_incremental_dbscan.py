"""The incremental engine keeps exactly scikit-learn's DBSCAN partition under inserts and deletes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import DBSCAN

from organizer.incremental_dbscan import IncrementalDBSCAN


def assert_same_as_sklearn(eng: IncrementalDBSCAN, points: dict[int, np.ndarray]) -> None:
    keys = sorted(points)
    if not keys:
        assert len(eng) == 0
        return
    # the engine keeps points in float32 (dlib's precision): the reference sees the same values
    X = np.stack([points[k] for k in keys]).astype(np.float32).astype(np.float64)
    db = DBSCAN(eps=eng.eps, min_samples=eng.min_samples).fit(X)
    core = {keys[i] for i in db.core_sample_indices_}
    assert core == {k for k in keys if eng.is_core(k)}
    assert {k for k, l in zip(keys, db.labels_) if l < 0} == {k for k in keys if eng.label(k) < 0}
    ours: dict[int, set[int]] = {}
    theirs: dict[int, set[int]] = {}
    for k, l in zip(keys, db.labels_):
        if k in core:
            ours.setdefault(eng.label(k), set()).add(k)
            theirs.setdefault(l, set()).add(k)
    assert {frozenset(v) for v in ours.values()} == {frozenset(v) for v in theirs.values()}
    # border points: in the cluster of their nearest core (ties: smaller key)
    core_keys = sorted(core)
    C = np.stack([points[k] for k in core_keys]) if core_keys else np.zeros((0, X.shape[1]))
    for k, l in zip(keys, db.labels_):
        if k in core or l < 0:
            continue
        d = np.sqrt(((C - points[k]) ** 2).sum(1))
        near = min((dd, ck) for dd, ck in zip(d.tolist(), core_keys) if dd <= eng.eps)
        assert eng.label(k) == eng.label(near[1])
    # clusters() agrees with label()
    for lab, members in eng.clusters().items():
        assert all(eng.label(k) == lab for k in members)


ops_2d = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 9), st.integers(0, 9)),
        st.tuples(st.just("del"), st.integers(0, 10_000), st.just(0)),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops_2d, min_samples=st.integers(1, 5))
def test_2d_grid_with_exact_eps_ties(ops, min_samples):
    # integer grid, eps = 1.0: many pairs lie exactly at distance eps
    eng = IncrementalDBSCAN(1.0, min_samples, dim=2)
    points: dict[int, np.ndarray] = {}
    for i, (op, a, b) in enumerate(ops):
        if op == "add":
            points[i] = np.array([a, b], dtype=float)
            eng.insert([i], points[i][None, :])
        elif points:
            k = sorted(points)[a % len(points)]
            del points[k]
            eng.delete([k])
        assert_same_as_sklearn(eng, points)
    keys = sorted(points)
    if keys:
        for block in (128, 3):  # one block, and many (rows settled across blocks)
            built = IncrementalDBSCAN.build(1.0, min_samples, keys, np.stack([points[k] for k in keys]), dim=2,
                                            block=block)
            assert_same_as_sklearn(built, points)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_people=st.integers(1, 6), min_samples=st.integers(2, 4))
def test_128d_face_like_inserts_and_deletes(seed, n_people, min_samples):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_people, 128))
    centers *= 0.45 / np.linalg.norm(centers, axis=1, keepdims=True)  # people ~0.6-0.9 apart
    eng = IncrementalDBSCAN(0.5, min_samples)
    points: dict[int, np.ndarray] = {}
    for i in range(60):
        if points and rng.random() < 0.25:
            k = sorted(points)[int(rng.integers(len(points)))]
            del points[k]
            eng.delete([k])
        else:
            spread = 0.25 if rng.random() < 0.85 else 0.6  # some strangers / outliers
            v = centers[rng.integers(n_people)] + rng.normal(scale=spread / np.sqrt(128), size=128)
            points[i] = v
            eng.insert([i], v[None, :])
        assert_same_as_sklearn(eng, points)
    keys = sorted(points)
    for block in (128, 5):
        built = IncrementalDBSCAN.build(0.5, min_samples, keys, np.stack([points[k] for k in keys]), block=block)
        assert_same_as_sklearn(built, points)


def test_untouched_clusters_keep_labels_and_update_reports():
    eng = IncrementalDBSCAN(1.0, 2, dim=2)
    eng.insert([1, 2], np.array([[0.0, 0], [0.5, 0]]))
    eng.insert([3, 4], np.array([[10.0, 0], [10.5, 0]]))
    a, b = eng.label(1), eng.label(3)
    upd = eng.insert([5], np.array([[0.9, 0.0]]))
    assert eng.label(5) == a and eng.label(3) == b
    assert upd.touched_labels == {a} and upd.changed_keys == {5}
    # a bridge merges them: the larger cluster (a, 3 points) keeps its label
    bridge = list(range(6, 16))  # x = 1.8, 2.7, ..., 9.9: 0.9 apart
    upd = eng.insert(bridge, np.array([[0.9 + 0.9 * i, 0.0] for i in range(1, 11)]))
    assert eng.label(3) == a and b in upd.removed_labels
    # deleting a bridge point splits it: the larger part (9 points) keeps the label
    upd = eng.delete([12])
    assert eng.label(1) == a and eng.label(11) == a
    assert eng.label(3) != a and eng.label(3) == eng.label(13)
    assert eng.label(3) in upd.touched_labels


def test_saved_state_round_trip(tmp_path):
    from organizer.incremental_dbscan import load_state, save_state

    rng = np.random.default_rng(3)
    pts = {i: rng.integers(0, 8, size=2).astype(float) for i in range(60)}
    eng = IncrementalDBSCAN.build(1.0, 3, list(pts), np.stack(list(pts.values())), dim=2)
    eng.delete([5, 6, 7])
    for k in (5, 6, 7):
        del pts[k]
    save_state(eng, tmp_path / "state.npz")
    assert load_state(tmp_path / "state.npz", 1.5, 3, dim=2) is None  # other parameters: not used
    loaded = load_state(tmp_path / "state.npz", 1.0, 3, dim=2)
    assert loaded.labels() == eng.labels()
    # the loaded engine keeps working exactly
    for i in range(100, 140):
        pts[i] = rng.integers(0, 8, size=2).astype(float)
        loaded.insert([i], pts[i][None, :])
    loaded.delete([10, 11, 12, 13])
    for k in (10, 11, 12, 13):
        del pts[k]
    assert_same_as_sklearn(loaded, pts)


def test_neighbourhoods_of_just_inserted_points_match_a_fresh_query():
    """within_many answers points of the last insert from their insertion query (kept up to
    date as later points of the same call arrive); it must equal a query over the matrix."""
    from organizer.incremental_dbscan import radius_query

    rng = np.random.default_rng(3)
    centre = rng.normal(0, 0.05, 128)
    base = centre + rng.normal(0, 0.02, (40, 128))
    eng = IncrementalDBSCAN(0.5, 3)
    eng.insert(range(40), base)
    new = np.vstack([centre + rng.normal(0, 0.02, (4, 128)), base[:1], base[:1]])  # and two duplicates
    eng.insert(range(100, 106), new)
    got = eng.within_many(new, 0.5)
    want = radius_query(eng._x32, eng._sq, eng._key, new, 0.5)
    for (gk, gd), (wk, wd) in zip(got, want):
        assert sorted(gk.tolist()) == sorted(wk.tolist())
        order_g, order_w = np.argsort(gk), np.argsort(wk)
        assert np.allclose(gd[order_g] ** 2, wd[order_w] ** 2, atol=1e-5)  # float32-accurate squares
    assert eng._fresh  # the shortcut was really used for the four distinct new points
    eng.delete([100])
    assert not eng._fresh


def test_build_answers_the_neighbourhoods_of_non_core_points_as_a_query_would():
    """After a build, within_many answers non-core points from the self-join's pairs (the people
    layer's first pass asks for them); the answer must equal a query over the matrix."""
    from organizer.incremental_dbscan import radius_query

    rng = np.random.default_rng(5)
    centres = rng.normal(0, 0.3, (6, 128))
    people = centres[rng.integers(6, size=150)] + rng.normal(0, 0.02, (150, 128))
    strangers = rng.normal(0, 0.3, (40, 128))
    pairs = strangers[:10] + rng.normal(0, 0.01, (10, 128))  # noise points with one neighbour
    x = np.vstack([people, strangers, pairs, strangers[-1:]])  # and a duplicate
    keys = rng.permutation(1000)[: len(x)].tolist()
    eng = IncrementalDBSCAN.build(0.5, 3, keys, x, block=16)
    noncore = [i for i, k in enumerate(keys) if not eng.is_core(k)]
    assert len(noncore) == 51
    got = eng.within_many(x[noncore], 0.5)
    want = radius_query(eng._x32, eng._sq, eng._key, x[noncore], 0.5)
    for (gk, gd), (wk, wd) in zip(got, want):
        assert sorted(gk.tolist()) == sorted(wk.tolist())
        assert np.allclose(np.sort(gd) ** 2, np.sort(wd) ** 2, atol=1e-5)
    assert len(eng._fresh) == 50  # answered from the cache, except the two duplicates
    assert sum(v is None for v in eng._fresh.values()) == 1
