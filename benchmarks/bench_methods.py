"""The other clustering methods next to the defaults, on labelled sets (one folder per person).

    uv run python benchmarks/bench_methods.py [--sets tune,dev] [--workers N]

Each set is scanned once into the cached store bench_accuracy.py uses (keyed by the encoder's
settings), then every method of organizer/methods.py re-derives people from the stored encodings
exactly as `organizer scan --algorithm` does, and is scored by organizer/evaluate.py (pairwise and
BCubed precision/recall/F1 over photos; one-off placed: the share of people seen in one photo
only who were put in a person folder). Time: clustering plus people derivation, encodings stored.
Method parameters come from the default clustering settings (none is tuned on these sets).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_accuracy import SHARED, scanned_store  # noqa: E402

from organizer.config import load_config  # noqa: E402
from organizer.evaluate import score, store_assignment  # noqa: E402
from organizer.methods import ALGORITHMS  # noqa: E402
from organizer.pipeline import Organizer  # noqa: E402
from organizer.store import Store  # noqa: E402


def run(db: Path, set_dir: Path, algorithm: str):
    settings = load_config(None, {"paths.watch": str(set_dir), "paths.output": str(db.parent / "out"),
                                  "paths.db": str(db)})
    with Store.open(db) as store:
        org = Organizer(settings, store, workers=1)
        t0 = time.monotonic()
        org.recluster(algorithm)
        seconds = time.monotonic() - t0
        org.close()
        predicted = store_assignment(store)
        paths = [r[0] for r in store.db.execute("select path from photos where status='ok'")]
    truth = {p: Path(p).parent.name for p in paths}
    return score(truth, predicted), seconds


def once(s) -> str:
    return "-" if s.once_placed is None else f"{s.once_placed:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="tune,dev")
    ap.add_argument("--workers", type=int, default=0, help="encoder processes when a set must be scanned")
    args = ap.parse_args()
    d = load_config(None).detection
    # the cache key bench_accuracy.py uses for the default encoder
    detection = {"landmarks": d.landmarks, "upsample": d.upsample, "num_jitters": d.num_jitters,
                 "max_side": d.max_side, "fallback_margin": d.fallback_margin, "mirror": d.mirror,
                 "normalize": d.normalize}
    rows = []
    for name in args.sets.split(","):
        set_dir = SHARED / name
        db = scanned_store(set_dir, detection, args.workers)
        run(db, set_dir, "dbscan")  # warm-up: imports scikit-learn, so the first row's time is its own
        for algorithm in ALGORITHMS:
            s, seconds = run(db, set_dir, algorithm)
            rows.append((name, algorithm, s, seconds))
            print(f"{name:5} {algorithm:17} P={s.precision:.3f} R={s.recall:.3f} F1={s.f1:.3f} "
                  f"B3-F1={s.bcubed_f1:.3f} once_placed={once(s)} people={s.clusters} {seconds:.2f}s",
                  flush=True)
        run(db, set_dir, "dbscan")  # leave the cached store as the defaults make it
    print("\n| set | method | pairwise P | pairwise R | pairwise F1 | BCubed P | BCubed R | BCubed F1 | one-off placed | people | time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, algorithm, s, seconds in rows:
        label = "dbscan (defaults)" if algorithm == "dbscan" else algorithm
        print(f"| {name} | {label} | {s.precision:.3f} | {s.recall:.3f} | {s.f1:.3f} | {s.bcubed_precision:.3f} | "
              f"{s.bcubed_recall:.3f} | {s.bcubed_f1:.3f} | {once(s)} | {s.clusters} | {seconds:.2f} s |")


if __name__ == "__main__":
    main()
