"""Incremental DBSCAN vs re-running scikit-learn's DBSCAN, on synthetic face-like encodings.

    uv run --group bench python benchmarks/bench_incremental.py [--sizes 1000,10000,100000] [--photos 200]

(the `bench` group adds incdbscan, the library this engine is compared with)

For each N it prints: the batch scikit-learn time on all N faces (the reference, measured in the
same run), our per-photo update time (1-3 faces inserted into an engine already holding N faces;
median and p95; engine alone and engine + people derivation, as the service does it, without face
encoding), their ratio, incdbscan's insert time where it is installed and N <= 10k, the start-up
time (saved states loaded / without them: the engine built from the encodings, then the people
derived from scratch, in one process as the service does it; CPU seconds too), and peak RSS. Each measurement
runs in a fresh subprocess so RSS figures are not mixed up. The last line is ``ratio_100k=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from organizer.cluster import FaceChanges  # noqa: E402
from organizer.config import ClusteringConfig  # noqa: E402

CFG = ClusteringConfig()  # the service's defaults (eps, min_samples, refinement, doubt margin)
EPS, MIN_SAMPLES, DIM = CFG.eps, CFG.min_samples, 128
# One BLAS thread: in the service the encoder processes keep the other core busy, and on a shared
# 2-core machine threaded BLAS mostly waits for a busy core. Both sides of each ratio run alike.
THREADS = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


# Distances as the default encoder gives them (unit-length, mirror-averaged encodings; medians on
# the tune set): 0.30 between two faces of one person, 0.56 between two people.
WITHIN = 0.30
CENTRE = 0.40  # people's centres this far from the origin: two of them are ~0.40 * sqrt(2) apart


def faces(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n face-like encodings: Zipf-sized identities (same person ~0.30 apart, different people
    ~0.56 apart) plus 15% one-off strangers. Returns (encodings, person ids, centers)."""
    rng = np.random.default_rng(seed)
    n_people = max(5, n // 12)
    centers = rng.normal(size=(n_people, DIM))
    centers *= CENTRE / np.linalg.norm(centers, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, n_people + 1) ** 1.1
    n_known = int(n * 0.85)
    who = rng.choice(n_people, n_known, p=weights / weights.sum())
    sigma = WITHIN / np.sqrt(2 * DIM)
    known = centers[who] + rng.normal(scale=sigma, size=(n_known, DIM))
    strangers = rng.normal(size=(n - n_known, DIM))
    strangers *= CENTRE / np.linalg.norm(strangers, axis=1, keepdims=True)
    X = np.vstack([known, strangers])
    ids = np.concatenate([who, -1 - np.arange(n - n_known)])
    order = rng.permutation(n)
    # float32 values, as dlib computes encodings (the engine keeps points in float32)
    return X[order].astype(np.float32).astype(np.float64), ids[order], centers


def photos(centers: np.ndarray, count: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sigma = WITHIN / np.sqrt(2 * DIM)
    weights = 1.0 / np.arange(1, len(centers) + 1) ** 1.1
    out = []
    for _ in range(count):
        k = int(rng.integers(1, 4))
        who = rng.choice(len(centers), k, p=weights / weights.sum())
        v = centers[who] + rng.normal(scale=sigma, size=(k, DIM))
        if rng.random() < 0.15:
            v[0] = rng.normal(size=DIM) * CENTRE / np.sqrt(DIM)  # a stranger in the background
        out.append(v.astype(np.float32).astype(np.float64))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_sklearn(n: int) -> dict:
    from sklearn.cluster import DBSCAN

    X, _, _ = faces(n)
    t = time.perf_counter()
    DBSCAN(eps=EPS, min_samples=MIN_SAMPLES).fit(X)
    return {"batch_s": time.perf_counter() - t, "rss_mb": peak_rss_mb()}


def worker_prepare(n: int, workdir: str) -> dict:
    """Start-up without a saved state: the engine built from the encodings, then the people from
    scratch; saves the engine's state and the encodings for the update worker, and checks the
    partition against scikit-learn (<= 10k)."""
    from organizer.incremental_dbscan import IncrementalDBSCAN, save_state

    X, _, centers = faces(n)
    keys = list(range(n))
    t, c = time.perf_counter(), time.process_time()
    eng = IncrementalDBSCAN.build(EPS, MIN_SAMPLES, keys, X)
    build_s, build_cpu_s = time.perf_counter() - t, time.process_time() - c
    # then the people from scratch, as the service's start does in the same process (the engine
    # answers the non-core faces' neighbourhoods from its build)
    from organizer.cluster import People, average_linkage_split

    t, c = time.perf_counter(), time.process_time()
    People(CFG, average_linkage_split).derive(eng.clusters(), eng, photo=lambda f: f, quality=lambda f: 0.0,
                                              next_id=1, previous={})
    people_s, people_cpu_s = time.perf_counter() - t, time.process_time() - c
    start_rss_mb = peak_rss_mb()  # before the check below, which runs scikit-learn
    save_state(eng, Path(workdir) / "state.npz")
    np.save(Path(workdir) / "centers.npy", centers)
    exact = None
    if n <= 10_000:
        from sklearn.cluster import DBSCAN

        db = DBSCAN(eps=EPS, min_samples=MIN_SAMPLES).fit(X)
        core = set(db.core_sample_indices_.tolist())
        ours = {k for k in keys if eng.is_core(k)}
        part_a: dict = {}
        part_b: dict = {}
        for k, lab in enumerate(db.labels_):
            if k in core:
                part_a.setdefault(lab, set()).add(k)
                part_b.setdefault(eng.label(k), set()).add(k)
        noise_ok = {k for k, lab in enumerate(db.labels_) if lab < 0} == {k for k in keys if eng.label(k) < 0}
        exact = core == ours and noise_ok and (
            {frozenset(v) for v in part_a.values()} == {frozenset(v) for v in part_b.values()})
    return {"build_s": build_s, "build_cpu_s": build_cpu_s, "people_s": people_s, "people_cpu_s": people_cpu_s,
            "start_rss_mb": start_rss_mb, "exact": exact}


def worker_engine(n: int, n_photos: int, workdir: str, refine: bool = True) -> dict:
    """What the service does: load the saved state, derive people, then add photos one by one.
    Its peak RSS is the service's (no data generation or batch run in this process)."""
    from organizer.cluster import People, average_linkage_split
    from organizer.incremental_dbscan import load_state

    t = time.perf_counter()
    eng = load_state(Path(workdir) / "state.npz", EPS, MIN_SAMPLES)
    load_s = time.perf_counter() - t
    centers = np.load(Path(workdir) / "centers.npy")
    people = People(CFG, average_linkage_split if refine else None)
    t, c = time.perf_counter(), time.process_time()
    res = people.derive(eng.clusters(), eng, photo=lambda f: f, quality=lambda f: 0.0, next_id=1, previous={})
    derive_s, derive_cpu_s = time.perf_counter() - t, time.process_time() - c
    if refine:  # what the service keeps for its next start: ids in the store, nearest faces saved
        a = people.assign
        faces_ = np.array(sorted(a), dtype=np.int64)
        np.savez(Path(workdir) / "people.npz", faces=faces_,
                 cid=np.array([-1 if a[f].cluster_id is None else a[f].cluster_id for f in faces_.tolist()]),
                 doubtful=np.array([a[f].doubtful for f in faces_.tolist()]),
                 **{f"near_{k}": v for k, v in people.near_state().items()})
    return _updates(eng, people, centers, n, n_photos, res.next_id, {"load_s": load_s, "derive_s": derive_s,
                                                                    "derive_cpu_s": derive_cpu_s})


def worker_resume(n: int, n_photos: int, workdir: str) -> dict:
    """A service restart: engine state and people (ids from the store, nearest faces from the
    saved state) loaded, then photos added. Its peak RSS is the steady service's."""
    from organizer.cluster import People, average_linkage_split
    from organizer.incremental_dbscan import load_state

    t = time.perf_counter()
    eng = load_state(Path(workdir) / "state.npz", EPS, MIN_SAMPLES)
    with np.load(Path(workdir) / "people.npz") as z:
        arrays = {k: z[k] for k in z.files}
    near = {k[5:]: v for k, v in arrays.items() if k.startswith("near_")}
    saved = {f: (None if c < 0 else c, bool(d), None, None)
             for f, c, d in zip(arrays["faces"].tolist(), arrays["cid"].tolist(), arrays["doubtful"].tolist())}
    people = People(CFG, average_linkage_split)
    reused = people.load(saved, saved, eng, near=near)
    start_s = time.perf_counter() - t
    assert reused
    centers = np.load(Path(workdir) / "centers.npy")
    next_id = max((c for c, _, _, _ in saved.values() if c is not None), default=0) + 1
    return _updates(eng, people, centers, n, n_photos, next_id, {"start_s": start_s})


def worker_corrected(n: int, n_photos: int, workdir: str, pin_sources: bool = True) -> dict:
    """As ``engine``, with 1% of the faces corrected (assigned to another person) and 0.2%
    rejected from theirs: the corrections step (constraints.py) after every update.
    ``pin_sources``: as the user's corrections do, the person each face came from is named in
    its correction (pinned); without, the faces were named in groups no correction is about (the
    known-people vote can do that), the costlier case for the people layer."""
    from organizer.cluster import People, average_linkage_split
    from organizer.constraints import Constraints, Rules
    from organizer.incremental_dbscan import load_state

    eng = load_state(Path(workdir) / "state.npz", EPS, MIN_SAMPLES)
    centers = np.load(Path(workdir) / "centers.npy")
    people = People(CFG, average_linkage_split)
    res = people.derive(eng.clusters(), eng, photo=lambda f: f, quality=lambda f: 0.0, next_id=1, previous={})
    rng = np.random.default_rng(7)
    placed = [f for f, a in sorted(people.assign.items()) if a.cluster_id is not None]
    persons = sorted(people.members)
    rules = Rules()
    for f in rng.choice(placed, max(1, len(people.assign) // 100), replace=False).tolist():
        rules.anchor[f] = int(rng.choice(persons))
        rules.horizon[f] = n  # made before the photos below arrive
    for f in rng.choice(placed, max(1, len(people.assign) // 500), replace=False).tolist():
        if f not in rules.anchor:
            rules.rejected[f] = {people.assign[f].cluster_id}
    # as the store records them: an assignment names the person the face came from too (pinned)
    rules.pinned = set(rules.anchor.values())
    if pin_sources:
        rules.pinned |= {people.assign[f].cluster_id for f in rules.anchor}
    constraints = Constraints(None, rules)
    t = time.perf_counter()
    constraints.apply(res, people, eng.vectors, lambda f: 0.0, full=True)
    full_s = time.perf_counter() - t
    return _updates(eng, people, centers, n, n_photos, res.next_id, {"apply_full_s": full_s,
                    "corrected": len(rules.anchor) + len(rules.rejected)}, constraints)


def _updates(eng, people, centers, n: int, n_photos: int, next_id: int, out: dict, constraints=None) -> dict:
    """Add ``n_photos`` photos one by one: per-photo engine and engine + people times (and the
    corrections step after the people layer, with ``constraints``)."""
    engine_ms, update_ms = [], []
    key = n
    for v in photos(centers, n_photos):
        new = list(range(key, key + len(v)))
        key += len(v)
        t0 = time.perf_counter()
        upd = eng.insert(new, v)
        t1 = time.perf_counter()
        live = {lab: m for lab in upd.touched_labels if (m := eng.members(lab))}
        res = people.derive(live, eng, photo=lambda f: f, quality=lambda f: 0.0, next_id=next_id,
                            changes=FaceChanges(upd.changed_keys, ()))
        if constraints is not None:
            constraints.apply(res, people, eng.vectors, lambda f: 0.0, full=False)
        t2 = time.perf_counter()
        next_id = res.next_id
        engine_ms.append((t1 - t0) * 1000)
        update_ms.append((t2 - t0) * 1000)
    return {
        **out,
        "engine_median_ms": float(np.median(engine_ms)), "engine_p95_ms": float(np.percentile(engine_ms, 95)),
        "update_median_ms": float(np.median(update_ms)), "update_p95_ms": float(np.percentile(update_ms, 95)),
        "rss_mb": peak_rss_mb(),
    }


def worker_incdbscan(n: int, n_photos: int) -> dict:
    try:
        from incdbscan import IncrementalDBSCAN as Inc
    except ImportError:
        return {"installed": False}
    X, _, centers = faces(n)
    inc = Inc(eps=EPS, min_pts=MIN_SAMPLES)
    t = time.perf_counter()
    inc.insert(X)
    build_s = time.perf_counter() - t
    ms = []
    for v in photos(centers, n_photos):
        t = time.perf_counter()
        inc.insert(v)
        ms.append((time.perf_counter() - t) * 1000)
    return {"installed": True, "build_s": build_s, "median_ms": float(np.median(ms))}


def run_worker(kind: str, n: int, n_photos: int, timeout: float, workdir: str = "") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--n", str(n), "--photos", str(n_photos),
           "--workdir", workdir]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **THREADS})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--corrections-only", action="store_true",
                    help="only the cost of corrections: engine + people with and without 1%% of faces corrected")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = {"sklearn": lambda: worker_sklearn(args.n),
              "prepare": lambda: worker_prepare(args.n, args.workdir),
              "engine": lambda: worker_engine(args.n, args.photos, args.workdir),
              "engine-norefine": lambda: worker_engine(args.n, args.photos, args.workdir, refine=False),
              "resume": lambda: worker_resume(args.n, args.photos, args.workdir),
              "corrected": lambda: worker_corrected(args.n, args.photos, args.workdir),
              "corrected-unpinned": lambda: worker_corrected(args.n, args.photos, args.workdir, pin_sources=False),
              "incdbscan": lambda: worker_incdbscan(args.n, args.photos)}[args.worker]
        print(json.dumps(fn()))
        return

    if args.corrections_only:
        for n in [int(s) for s in args.sizes.split(",")]:
            corrections_only(n, args.photos)
        return
    ratio_100k = float("nan")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        print(f"\n== N = {n:,} faces (eps={EPS}, min_samples={MIN_SAMPLES}) ==", flush=True)
        sk = run_worker("sklearn", n, args.photos, timeout=1800)
        with tempfile.TemporaryDirectory() as workdir:
            prep = run_worker("prepare", n, args.photos, timeout=3600, workdir=workdir)
            eng = run_worker("engine", n, args.photos, timeout=3600, workdir=workdir)
            plain = run_worker("engine-norefine", n, args.photos, timeout=3600, workdir=workdir)
            resume = run_worker("resume", n, args.photos, timeout=3600, workdir=workdir)
            corrected = run_worker("corrected", n, args.photos, timeout=3600, workdir=workdir)
        if "error" in prep:
            print(f"  prepare: {prep}")
            continue
        eng.update(prep)
        inc = run_worker("incdbscan", n, min(args.photos, 50), timeout=900) if n <= 10_000 else {"skipped": True}
        if "error" in sk or "error" in eng:
            print(f"  sklearn: {sk}\n  engine: {eng}")
            continue
        ratio = sk["batch_s"] * 1000 / eng["update_median_ms"]
        print(f"  batch scikit-learn DBSCAN:      {sk['batch_s']:9.3f} s   (peak RSS {sk['rss_mb']:.0f} MB)")
        print(f"  engine insert, per photo:       median {eng['engine_median_ms']:7.2f} ms   p95 {eng['engine_p95_ms']:7.2f} ms"
              f"   ({sk['batch_s'] * 1000 / eng['engine_median_ms']:.0f}x the batch run)")
        print(f"  engine + people, per photo:     median {eng['update_median_ms']:7.2f} ms   p95 {eng['update_p95_ms']:7.2f} ms"
              "   (defaults: refinement on)")
        if "error" not in plain:
            print(f"  same without refinement:        median {plain['update_median_ms']:7.2f} ms   "
                  f"p95 {plain['update_p95_ms']:7.2f} ms")
        if "error" not in corrected:
            print(f"  with 1% of faces corrected:     median {corrected['update_median_ms']:7.2f} ms   "
                  f"p95 {corrected['update_p95_ms']:7.2f} ms   ({corrected['corrected']} corrections; applying "
                  f"all of them from scratch {corrected['apply_full_s']:.2f} s)")
        else:
            print(f"  with 1% of faces corrected:     {corrected['error']}")
        print(f"  ratio batch / update median:    {ratio:9.0f}x")
        if inc.get("installed"):
            print(f"  incdbscan insert, per photo:    median {inc['median_ms']:7.2f} ms "
                  f"(ours {inc['median_ms'] / eng['engine_median_ms']:.1f}x faster); build {inc['build_s']:.1f} s")
        elif "skipped" in inc:
            print("  incdbscan:                      not run above 10k")
        else:
            print(f"  incdbscan:                      {'not installed' if 'error' not in inc else inc['error']}")
        start_s = eng["build_s"] + eng["people_s"]
        print(f"  start without saved state:      {start_s:9.1f} s   ({eng['build_cpu_s'] + eng['people_cpu_s']:.1f} CPU s, "
              f"{start_s / sk['batch_s']:.2f}x the batch run, peak RSS {eng['start_rss_mb']:.0f} MB): engine built "
              f"{eng['build_s']:.1f} s ({eng['build_cpu_s']:.1f} CPU s), then people {eng['people_s']:.1f} s "
              f"({eng['people_cpu_s']:.1f} CPU s)")
        print(f"  people from scratch after a restart without their saved state: {eng['derive_s']:.1f} s "
              f"({eng['derive_cpu_s']:.1f} CPU s)")
        if "error" not in resume:
            print(f"  restart from saved states:      {resume['start_s']:9.2f} s   (engine {eng['load_s']:.2f} s; "
                  f"then per photo median {resume['update_median_ms']:.2f} ms, p95 {resume['update_p95_ms']:.2f} ms)")
            print(f"  peak RSS of the restarted service: {resume['rss_mb']:6.0f} MB")
        else:
            print(f"  restart from saved states:      {resume['error']}")
        if eng["exact"] is not None:
            print(f"  partition equals scikit-learn:  exact={eng['exact']}")
        rows.append((n, sk["batch_s"], eng["engine_median_ms"], eng["update_median_ms"], eng["update_p95_ms"], ratio,
                     resume.get("start_s", float("nan")), resume.get("rss_mb", float("nan")), eng["rss_mb"]))
        if n == 100_000:
            ratio_100k = ratio
    print("\n| N | batch sklearn (s) | engine update median (ms) | engine + people median (ms) | p95 (ms) | ratio |"
          " restart (s) | RSS restarted (MB) | RSS from scratch (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, b, e, m, p, r, start, rss, rss0 in rows:
        print(f"| {n:,} | {b:.2f} | {e:.2f} | {m:.2f} | {p:.2f} | {r:.0f}x | {start:.2f} | {rss:.0f} | {rss0:.0f} |")
    print(f"ratio_100k={ratio_100k:.0f}")


def corrections_only(n: int, n_photos: int) -> None:
    """The corrections' cost alone: the same photos added with and without 1% of the faces
    corrected, both measured in this run (the ratio is what to compare across runs)."""
    print(f"\n== N = {n:,} faces: corrections' cost ({n_photos} photos) ==", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        prep = run_worker("prepare", n, n_photos, timeout=7200, workdir=workdir)
        print(f"  prepare: {prep}", flush=True)
        eng = run_worker("engine", n, n_photos, timeout=7200, workdir=workdir)
        corrected = run_worker("corrected", n, n_photos, timeout=7200, workdir=workdir)
        unpinned = run_worker("corrected-unpinned", n, n_photos, timeout=7200, workdir=workdir)
    if "error" in eng:
        print(f"  engine: {eng}")
        return
    print(f"  engine + people, per photo:     median {eng['update_median_ms']:7.2f} ms   p95 {eng['update_p95_ms']:7.2f} ms"
          f"   (people derived from scratch {eng['derive_s']:.1f} s)")
    for label, c in (("1% of faces corrected", corrected), ("same, sources not pinned", unpinned)):
        if "error" in c:
            print(f"  {label + ':':<31} {c['error']}")
            continue
        print(f"  {label + ':':<31} median {c['update_median_ms']:7.2f} ms   p95 {c['update_p95_ms']:7.2f} ms   "
              f"({c['corrected']} corrections; applying all of them from scratch {c['apply_full_s']:.2f} s)")
        print(f"  {'  / uncorrected:':<31} median {c['update_median_ms'] / eng['update_median_ms']:.2f}x   "
              f"p95 {c['update_p95_ms'] / eng['update_p95_ms']:.2f}x")


if __name__ == "__main__":
    main()
