"""Coarse-to-fine detection: faces found and time per photo for each coarse_side / fine_below.

    uv run python benchmarks/bench_detection.py [--set tune] [--count 40] [--groups 10]

Builds two sets from ``../shared/faces/<set>`` (see benchmarks/phone_photos.py; written under a
temporary folder): phone photos (4000x3000, one face at phone-portrait size, a quarter sideways)
and group canvases (1600x1200, six faces of 40-80 px each pasted from six labelled photos). Every
photo is decoded into its detection frame (ingest.Frame, anew for each setting), then each
setting's detect_faces is timed on it in this process (one BLAS thread, interleaved photo by
photo so the ratios hold on a noisy machine). "found" counts pasted faces a detected box covers (overlap > 0.5 of the smaller box),
"extra" the other boxes. The reference is the full search alone (coarse_side 0), the pipeline's
detection before coarse to fine. Choose on tune, report on dev.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from organizer.encode import DetectionSettings, _overlaps, detect_faces  # noqa: E402
from organizer.ingest import load_for_detection  # noqa: E402
from phone_photos import phone_set, single_face_sources, small_face_set, texture_paths  # noqa: E402

SHARED = Path(os.environ.get("ORGANIZER_SHARED", ROOT.parent / "shared")) / "faces"

GRID = [(0, 0), (640, 0), (800, 0), (800, 240), (1000, 0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="tune")
    ap.add_argument("--count", type=int, default=40, help="phone photos")
    ap.add_argument("--groups", type=int, default=10, help="group canvases (six small faces each)")
    args = ap.parse_args()
    base = DetectionSettings()
    settings = {(c, f): replace(base, coarse_side=c, fine_below=f) for c, f in GRID}
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        sources = single_face_sources(SHARED / args.set)
        textures = texture_paths(SHARED / "no_faces")
        sets = {"phone": phone_set(sources, textures, Path(tmp) / "phone", args.count),
                "group": small_face_set(sources, textures, Path(tmp) / "group", args.groups)}
        print(f"set {args.set}: {len(sources)} single-face source photos; {args.count} phone photos, "
              f"{args.groups} group canvases ({sum(len(p.boxes) for p in sets['group'])} faces of 40-80 px)")
        print("| photos | coarse_side | fine_below | faces found | extra boxes | detection per photo | vs full search |")
        print("|---|---|---|---|---|---|---|")
        for name, photos in sets.items():
            stats = {k: [0, 0, 0.0] for k in settings}
            for photo in photos:
                for key, s in settings.items():
                    # decoded anew for each setting (not timed): a frame keeps what it resampled
                    prep = load_for_detection(photo.path, base.max_side, base.max_pixels)
                    t0 = time.perf_counter()
                    boxes = detect_faces(prep.frame, s)
                    stats[key][2] += time.perf_counter() - t0
                    full = [tuple(round(v * prep.scale) for v in b) for b in boxes]
                    hit = sum(any(_overlaps(p, b) for b in full) for p in photo.boxes)
                    stats[key][0] += hit
                    stats[key][1] += sum(not any(_overlaps(p, b) for p in photo.boxes) for b in full)
            ref = stats[(0, 0)][2]
            total = sum(len(p.boxes) for p in photos)
            for (c, f), (hit, extra, t) in stats.items():
                print(f"| {name} | {c or 'off'} | {f} | {hit} / {total} | {extra} | {t / len(photos) * 1000:.0f} ms "
                      f"| {ref / t:.1f}x |")


if __name__ == "__main__":
    main()
