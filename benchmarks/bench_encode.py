"""Cost of encoding a photo: detection, and the encoder with and without the mirror average.

    uv run python benchmarks/bench_encode.py [--every 3] [--repeat 2]

Runs in one process with one BLAS thread (a service worker's situation) on every ``--every``-th
photo of the dev set; the three timings are interleaved photo by photo, so the ratios hold on a
noisy shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from organizer.encode import DetectionSettings, detect_faces, encode_faces  # noqa: E402
from organizer.ingest import load_for_detection  # noqa: E402

SHARED = Path(os.environ.get("ORGANIZER_SHARED", ROOT.parent / "shared")) / "faces"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    photos = sorted((SHARED / "dev").glob("*/*"))[:: args.every]
    default = DetectionSettings()
    single = DetectionSettings(mirror=False)
    imgs = [load_for_detection(p, default.max_side, default.max_pixels).pixels for p in photos]
    boxes = [detect_faces(img, default) for img in imgs]
    t = {"detect": 0.0, "mirror": 0.0, "single": 0.0}
    for _ in range(args.repeat):
        for img, b in zip(imgs, boxes):
            for key, run in (("detect", lambda: detect_faces(img, default)),
                             ("mirror", lambda: encode_faces(img, b, default)),
                             ("single", lambda: encode_faces(img, b, single))):
                t0 = time.perf_counter()
                run()
                t[key] += time.perf_counter() - t0
    n = args.repeat * len(imgs)
    nf = args.repeat * sum(len(b) for b in boxes)
    print(f"{len(imgs)} photos, {nf // args.repeat} faces, one BLAS thread")
    print(f"detection per photo: {t['detect'] / n * 1000:.0f} ms")
    print(f"encoding per face: mirror average {t['mirror'] / nf * 1000:.0f} ms, single pass {t['single'] / nf * 1000:.0f} ms")
    with_mirror, without = t["detect"] + t["mirror"], t["detect"] + t["single"]
    print(f"per photo: {with_mirror / n * 1000:.0f} ms with the mirror, {without / n * 1000:.0f} ms without "
          f"(ratio {with_mirror / without:.2f})")


if __name__ == "__main__":
    main()
