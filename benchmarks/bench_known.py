"""Known people: choose ``clustering.known_k`` and ``clustering.known_tolerance`` on tune/, report
them on dev/.

    uv run python benchmarks/bench_known.py [--refs 2] [--precision 0.99] [--dev-refs 2,3,4] [--workers N]

Each set is scanned once with the real pipeline into the cached store bench_accuracy.py uses
(~/.cache/organizer-bench/). The people of a set are split in two halves; each half in turn is
"known": ``--refs`` photos of each of its people are the reference photos (their largest face,
as organizer/known.py takes it), and every other photo of the set is voted on
(:func:`organizer.known.vote`): the rest of the known people's photos should be named, the other
half's photos and the people seen once should not. Scored over photos (a photo is named P when a
face of it is): the precision of the names (photos named rightly / photos named), the share of
the known people's photos named rightly, and the share of the others' photos named at all. Both
halves' counts are pooled.

On tune/ a grid of k and tolerance is scored and the chosen point is the one naming the largest
share with a precision of at least ``--precision``; dev/ is reported with it (and the defaults),
also with other numbers of reference photos per person (``--dev-refs``).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_accuracy import SHARED, scanned_store  # noqa: E402
from organizer.config import load_config  # noqa: E402
from organizer.known import vote  # noqa: E402
from organizer.store import Store  # noqa: E402


@dataclass
class SetFaces:
    """Every face of a scanned set: its encoding, size, photo and the photo's person (folder)."""

    encodings: np.ndarray
    sizes: np.ndarray
    photos: list[str]
    people: list[str]


def load(db: Path, min_size: int) -> SetFaces:
    with Store.open(db) as store:
        rows = list(store.photos_of_faces())
        faces = store.faces_by_id([f for _, f, _ in rows])
    row = {int(f): i for i, f in enumerate(faces.ids.tolist())}
    keep = [(p, row[f]) for p, f, _ in rows if faces.size[row[f]] >= min_size]
    idx = [i for _, i in keep]
    return SetFaces(faces.encodings[idx], np.asarray(faces.size)[idx], [p for p, _ in keep],
                    [Path(p).parent.name for p, _ in keep])


@dataclass
class Counts:
    named: int = 0  # photos named
    right: int = 0  # photos named, rightly
    known: int = 0  # photos of known people (not reference photos)
    known_right: int = 0
    others: int = 0  # photos of the other people
    others_named: int = 0

    def add(self, o: "Counts") -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(o, k))

    @property
    def precision(self) -> float:
        return self.right / self.named if self.named else 1.0

    @property
    def share(self) -> float:
        return self.known_right / self.known if self.known else 0.0

    @property
    def others_share(self) -> float:
        return self.others_named / self.others if self.others else 0.0


def halves(s: SetFaces) -> list[set[str]]:
    """The people seen in at least two photos, split in two (alternately, by name)."""
    photos_of = defaultdict(set)
    for p, who in zip(s.photos, s.people):
        photos_of[who].add(p)
    repeat = sorted(w for w, ps in photos_of.items() if len(ps) >= 2)
    return [set(repeat[0::2]), set(repeat[1::2])]


def score(s: SetFaces, known: set[str], refs: int, k: int, tolerance: float) -> Counts:
    by_photo = defaultdict(list)
    for i, p in enumerate(s.photos):
        by_photo[p].append(i)
    ref_photos = set()
    for who in sorted(known):
        ref_photos |= set(sorted({p for p, w in zip(s.photos, s.people) if w == who})[:refs])
    ref_rows = [max(by_photo[p], key=lambda i: s.sizes[i]) for p in sorted(ref_photos)]
    ref_names = [s.people[i] for i in ref_rows]
    rest = [i for i, p in enumerate(s.photos) if p not in ref_photos]
    names = vote(s.encodings[ref_rows], ref_names, s.encodings[rest], k, tolerance)
    named_as: dict[str, set[str]] = defaultdict(set)
    for i, n in zip(rest, names):
        if n is not None:
            named_as[s.photos[i]].add(n)
    c = Counts()
    for p in {s.photos[i] for i in rest}:
        who, got = Path(p).parent.name, named_as.get(p, set())
        c.named += bool(got)
        c.right += bool(got) and got == {who}
        if who in known:
            c.known += 1
            c.known_right += got == {who}
        else:
            c.others += 1
            c.others_named += bool(got)
    return c


def pooled(s: SetFaces, refs: int, k: int, tolerance: float) -> Counts:
    total = Counts()
    for known in halves(s):
        total.add(score(s, known, refs, k, tolerance))
    return total


def row(label: str, c: Counts) -> str:
    return (f"| {label} | {c.precision:.3f} ({c.right}/{c.named}) | {c.share:.3f} ({c.known_right}/{c.known}) "
            f"| {c.others_share:.3f} ({c.others_named}/{c.others}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", type=int, default=2, help="reference photos per known person")
    ap.add_argument("--dev-refs", type=lambda v: [int(x) for x in v.split(",")], default=[2, 3, 4],
                    help="reference photos per person for the dev/ report (the chosen k and tolerance)")
    ap.add_argument("--precision", type=float, default=0.99, help="the least precision of the names on tune")
    ap.add_argument("--workers", type=int, default=0, help="encoder processes when a set must be scanned")
    args = ap.parse_args()
    settings = load_config(None)
    d = settings.detection
    detection = {"landmarks": d.landmarks, "upsample": d.upsample, "num_jitters": d.num_jitters,
                 "max_side": d.max_side, "fallback_margin": d.fallback_margin, "mirror": d.mirror,
                 "normalize": d.normalize}
    sets = {name: load(scanned_store(SHARED / name, detection, args.workers), d.min_face_size)
            for name in ("tune", "dev")}
    # k >= 2 * refs can never reach a majority of one person's reference faces
    grid = [(k, round(t, 3)) for k in range(1, min(6, 2 * args.refs)) for t in np.arange(0.30, 0.455, 0.01)]
    print(f"tune/: {args.refs} reference photos per known person, halves of the people known in turn\n")
    print("| k | tolerance | precision | named (known people's photos) | others named |")
    print("|---|---|---|---|---|")
    best = None
    for k, t in grid:
        c = pooled(sets["tune"], args.refs, k, t)
        print(f"| {k} | {t:.2f} | {c.precision:.3f} | {c.share:.3f} | {c.others_share:.3f} |")
        if c.precision >= args.precision and (best is None or c.share > best[2].share):
            best = (k, t, c)
    if best is None:
        print(f"\nno point reaches a precision of {args.precision} on tune/")
        return
    k, t, _ = best
    cfg = settings.clustering
    print(f"\nchosen on tune/ (largest share named with precision >= {args.precision}): k={k}, tolerance={t:.2f}")
    print("\ndev/ (halves of the people known in turn, pooled):\n")
    print("| setting | reference photos per person | precision of the names | known people's photos named rightly "
          "| others' photos named |")
    print("|---|---|---|---|---|")
    points = [("chosen", k, t)] + ([("defaults", cfg.known_k, cfg.known_tolerance)]
                                   if (cfg.known_k, cfg.known_tolerance) != (k, t) else [])
    for label, kk, tt in points:
        for refs in sorted({args.refs, *args.dev_refs}):
            print(row(f"{label}: k={kk}, tolerance={tt:.2f} | {refs}", pooled(sets["dev"], refs, kk, tt)))

if __name__ == "__main__":
    main()
