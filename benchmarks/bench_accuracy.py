"""Accuracy of the clustering on labelled photo sets (one folder per person).

    uv run python benchmarks/bench_accuracy.py [--sets tune,dev] [--sweep] [--workers N]

Each set is scanned once with the real pipeline (ingest, encode) into a cached store under
~/.cache/organizer-bench/; then clusterings are derived from the stored encodings exactly as
`organizer recluster` does (batch DBSCAN + people derivation) and scored over photos:
pairwise precision/recall/F1, BCubed, coverage (share of photos of people with >= 2 photos
placed in a person folder), the share of people seen once that were wrongly placed in a folder,
and faces of one photo put in the same folder.

`--sweep` scores a grid of eps/min_samples/doubt_margin on every set (for choosing defaults on
tune/; figures on the set you tuned on say nothing about unseen people).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from organizer.config import load_config  # noqa: E402
from organizer.evaluate import bcubed_scores, pairwise_scores  # noqa: E402
from organizer.pipeline import Organizer  # noqa: E402
from organizer.store import Store  # noqa: E402

SHARED = Path(os.environ.get("ORGANIZER_SHARED", ROOT.parent / "shared")) / "faces"
CACHE = Path(os.environ.get("ORGANIZER_BENCH_CACHE", Path.home() / ".cache" / "organizer-bench"))


def scanned_store(set_dir: Path, detection: dict, workers: int = 0, unkeyed: dict | None = None) -> Path:
    """Scan ``set_dir`` once per detection settings; returns the cached store's db path.
    ``workers``: encoder processes for the scan (0 = one per core); ``unkeyed``: more detection
    settings that are not part of the cache key."""
    key = hashlib.sha256(json.dumps([str(set_dir), detection], sort_keys=True).encode()).hexdigest()[:12]
    base = CACHE / f"{set_dir.name}-{key}"
    db = base / "organizer.db"
    if (base / "done").exists():
        return db
    base.mkdir(parents=True, exist_ok=True)
    overrides = {"paths.watch": str(set_dir), "paths.output": str(base / "out"), "paths.db": str(db),
                 "service.workers": workers}
    overrides.update({f"detection.{k}": v for k, v in {**detection, **(unkeyed or {})}.items()})
    settings = load_config(None, overrides)
    with Store.open(db) as store:
        org = Organizer(settings, store)
        try:
            print(f"  scanning {set_dir} (cached in {base}) ...", file=sys.stderr, flush=True)
            org.scan()
        finally:
            org.close()
    (base / "done").write_text("ok")
    return db


def score(db: Path, set_dir: Path, clustering: dict, detection: dict) -> dict:
    """Re-derive people with ``clustering`` settings and score them against the folders."""
    overrides = {"paths.watch": str(set_dir), "paths.output": str(db.parent / "out"), "paths.db": str(db)}
    overrides.update({f"clustering.{k}": v for k, v in clustering.items()})
    overrides.update({f"detection.{k}": v for k, v in detection.items()})
    settings = load_config(None, overrides)
    with Store.open(db) as store:
        Organizer(settings, store, workers=1).recluster()
        folders: dict[str, set[int]] = defaultdict(set)
        same_photo_pairs = 0
        per_photo: dict[tuple[str, int], int] = defaultdict(int)
        for path, face_id, sha in store.photos_of_faces():
            f = store.face(face_id)
            if f.cluster_id is not None and not f.doubtful:
                folders[path].add(f.cluster_id)
                per_photo[(path, f.cluster_id)] += 1
        same_photo_pairs = sum(n * (n - 1) // 2 for n in per_photo.values())
        paths = [r[0] for r in store.db.execute("select path from photos where status='ok'")]
    truth = {p: Path(p).parent.name for p in paths}
    counts = defaultdict(int)
    for person in truth.values():
        counts[person] += 1
    pred = {p: {str(c) for c in folders.get(p, ())} for p in truth}
    pw = pairwise_scores(truth, pred)
    bc = bcubed_scores(truth, pred)
    repeat = [p for p in truth if counts[truth[p]] >= 2]
    once = [p for p in truth if counts[truth[p]] == 1]
    return {
        "precision": pw["precision"], "recall": pw["recall"], "f1": pw["f1"],
        "bcubed_f1": bc["f1"], "bcubed_precision": bc["precision"], "bcubed_recall": bc["recall"],
        "coverage": sum(1 for p in repeat if pred[p]) / len(repeat) if repeat else 0.0,
        "once_placed": sum(1 for p in once if pred[p]) / len(once) if once else 0.0,
        "same_photo_pairs": same_photo_pairs,
        "photos": len(truth), "people": len(counts),
    }


PLAIN = {"eps": 0.5, "min_samples": 2, "doubt_margin": 0.0, "linkage_threshold": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="tune,dev")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--linkage", action="store_true", help="sweep the average-linkage refinement")
    ap.add_argument("--workers", type=int, default=0, help="encoder processes when a set must be scanned (0 = one per core)")
    args = ap.parse_args()
    defaults = load_config(None)
    chosen = defaults.clustering.model_dump()
    d = defaults.detection
    detection = {"landmarks": d.landmarks, "upsample": d.upsample, "num_jitters": d.num_jitters,
                 "max_side": d.max_side, "fallback_margin": d.fallback_margin}
    # the plain pipeline the design started from: dlib's raw encodings (no mirror, no unit length);
    # its cache key is the one these settings had before the two options existed
    raw = dict(detection)
    raw_encoder = {"mirror": False, "normalize": False}
    detection.update(mirror=d.mirror, normalize=d.normalize)
    rows = []
    for name in args.sets.split(","):
        set_dir = SHARED / name
        db = scanned_store(set_dir, detection, args.workers)
        raw_db = scanned_store(set_dir, raw, args.workers, raw_encoder)
        scored_raw = dict(raw, **raw_encoder, min_face_size=d.min_face_size)
        scored = dict(detection, min_face_size=d.min_face_size)
        grid = [("plain eps 0.5", PLAIN, raw_db, scored_raw), ("defaults", chosen, db, scored)]
        if args.linkage:
            grid += [(f"eps={e} ms={m} link={t}", dict(chosen, eps=e, min_samples=m, linkage_threshold=t), db, scored)
                     for e in (0.32, 0.34, 0.36, 0.38, 0.40) for m in (3,) for t in (0.36, 0.37, 0.38, 0.39, 0.40)]
        if args.sweep:
            grid += [(f"eps={e} ms={m} margin={g}", {"eps": e, "min_samples": m, "doubt_margin": g}, db, scored)
                     for e in (0.30, 0.32, 0.34, 0.36, 0.38) for m in (2, 3, 4) for g in (0.0, 0.035)]
        for label, clustering, store_db, det in grid:
            s = score(store_db, set_dir, clustering, det)
            rows.append((name, label, s))
            print(f"{name:5} {label:28} P={s['precision']:.3f} R={s['recall']:.3f} F1={s['f1']:.3f} "
                  f"B3-F1={s['bcubed_f1']:.3f} cov={s['coverage']:.2f} once_placed={s['once_placed']:.2f} "
                  f"same_photo={s['same_photo_pairs']}", flush=True)
    print("\n| set | setting | pairwise P | pairwise R | pairwise F1 | BCubed P | BCubed R | BCubed F1 | coverage | one-off placed | same-photo pairs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, label, s in rows:
        if (args.sweep or args.linkage) and label not in ("plain eps 0.5", "defaults"):
            continue
        print(f"| {name} | {label} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | "
              f"{s['bcubed_precision']:.3f} | {s['bcubed_recall']:.3f} | {s['bcubed_f1']:.3f} | "
              f"{s['coverage']:.2f} | {s['once_placed']:.2f} | {s['same_photo_pairs']} |")


if __name__ == "__main__":
    main()
