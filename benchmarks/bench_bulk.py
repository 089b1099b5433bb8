"""A phone's photos: `organizer scan` against a naive pipeline on the same photos, in the same run.

    uv run python benchmarks/bench_bulk.py [--count 40] [--naive-count N] [--detection key=value ...]

The photos (see benchmarks/phone_photos.py): 4000x3000 or 3000x4000 canvases of real texture
from ../shared/faces/no_faces, each with one face of ../shared/faces/dev pasted at phone-portrait
size (the face 22-30% of the short side), quality-90 JPEG, every fourth stored sideways with an
EXIF orientation; people taken in turn, at most count // 3 of the 12, so each has 3 photos or more. Written to a
temporary folder.

* naive: what a first script does with face_recognition: sequential, full resolution, HOG at
  its default upsampling, no EXIF orientation, one scikit-learn DBSCAN over dlib's raw encodings
  at the end (eps 0.5, min_samples 2); ``--naive-count N`` runs it on the photos of the first
  people only, N photos or a few more (its photos/s is per photo; its F1 is then over those, and
  organizer scan's F1 on the same photos is printed too).
* ours: `organizer scan` (the CLI, in a subprocess, default settings unless ``--detection``),
  whose main process and encoder processes are sampled every 0.2 s with psutil: the main
  process's CPU time against the wall time says whether it (the only writer) ever holds the
  workers back, and the workers' CPU time against wall x workers how busy the cores were. CPU seconds per photo
  (all processes) are printed for both: on a machine shared with other work they say more than
  the wall time.

Pairwise F1 is over photos (evaluate.pairwise_scores): a photo's folders are the people whose
faces it holds. Last line: ``speedup=<ratio> photos_per_s=<x> f1_naive=<a> f1_ours=<b>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import psutil  # noqa: E402

from organizer.evaluate import labelled_photos, pairwise_scores, photo_key, tree_assignment  # noqa: E402
from phone_photos import phone_set, single_face_sources, texture_paths  # noqa: E402

SHARED = Path(os.environ.get("ORGANIZER_SHARED", ROOT.parent / "shared")) / "faces"


def naive(photos: list[Path]) -> tuple[float, float, int, dict[str, set[str]]]:
    """(wall seconds, CPU seconds, faces found, photo key -> cluster labels) of the naive pipeline."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import face_recognition
    import numpy as np
    from sklearn.cluster import DBSCAN

    t0, c0 = time.perf_counter(), time.process_time()
    encodings, owner = [], []
    for path in photos:
        img = face_recognition.load_image_file(path)  # full size, EXIF orientation ignored
        boxes = face_recognition.face_locations(img, model="hog")
        for enc in face_recognition.face_encodings(img, boxes):
            encodings.append(enc)
            owner.append(path)
    labels = DBSCAN(eps=0.5, min_samples=2).fit_predict(np.array(encodings)) if encodings else []
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    predicted: dict[str, set[str]] = defaultdict(set)
    for path, lab in zip(owner, labels):
        if lab >= 0:
            predicted[photo_key(path)].add(f"c{lab}")
    return wall, cpu, len(encodings), predicted


def ours(watch: Path, work: Path, detection: list[str]) -> dict:
    """Run `organizer scan` once; wall time, faces found, the tree, and CPU use of its processes."""
    out, cfg = work / "sorted", work / "bench.toml"
    db = out / ".organizer" / "organizer.db"  # the default place
    lines = ["[detection]"] + [f"{k} = {v}" for k, v in (d.split("=", 1) for d in detection)]
    cfg.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "organizer", "scan", "--config", str(cfg), "--watch", str(watch),
           "--output", str(out), "--log-level", "WARNING"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    main = psutil.Process(proc.pid)
    parent_cpu, worker_cpu, server_cpu = 0.0, {}, {}
    while proc.poll() is None:
        try:
            ct = main.cpu_times()
            parent_cpu = ct.user + ct.system
            for child in main.children(recursive=True):
                cmdline = " ".join(child.cmdline())
                if "resource_tracker" in cmdline:
                    continue
                c = child.cpu_times()
                # the fork server loads the models the workers are forked with: its CPU is theirs
                if "forkserver" in cmdline and child.ppid() == main.pid:
                    server_cpu[child.pid] = c.user + c.system
                else:
                    worker_cpu[child.pid] = c.user + c.system
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"organizer scan failed ({proc.returncode}):\n{stderr[-3000:]}")
    import sqlite3

    with sqlite3.connect(db) as con:
        faces = con.execute("select count(*) from faces").fetchone()[0]
    return {"wall": wall, "faces": faces, "tree": tree_assignment(out) if out.is_dir() else {}, "parent_cpu": parent_cpu,
            "worker_cpu": sum(worker_cpu.values()) + sum(server_cpu.values()), "workers": len(worker_cpu), "stdout": stdout.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=40, help="phone photos (default 40)")
    ap.add_argument("--naive-count", type=int, default=0, help="run the naive pipeline on the first N only (0 = all)")
    ap.add_argument("--full-search", action="store_true",
                    help="also run `organizer scan` with coarse_side = 0 (detection before coarse to fine)")
    ap.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True, help="run the naive pipeline")
    ap.add_argument("--detection", action="append", default=[], metavar="KEY=VALUE",
                    help="detection setting for `organizer scan`, e.g. coarse_side=0 (repeatable)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        photos = phone_set(single_face_sources(SHARED / "dev"), texture_paths(SHARED / "no_faces"),
                           tmp / "photos", args.count)
        print(f"{len(photos)} phone photos of {len({p.person for p in photos})} people (built in "
              f"{time.perf_counter() - t0:.0f} s), {os.cpu_count()} cores", flush=True)
        truth = labelled_photos(tmp / "photos")

        r = ours(tmp / "photos", tmp, args.detection)
        print(f"  {r['stdout']}")
        ours_rate = len(photos) / r["wall"]
        ours_f1 = pairwise_scores(truth, r["tree"])
        print(f"organizer scan: {r['wall']:.1f} s, {ours_rate:.2f} photos/s, {r['faces']} faces, "
              f"pairwise F1 {ours_f1['f1']:.3f} (P {ours_f1['precision']:.3f}, R {ours_f1['recall']:.3f})", flush=True)
        print(f"  main process CPU {r['parent_cpu']:.1f} s = {r['parent_cpu'] / r['wall']:.0%} of the wall time; "
              f"{r['workers']} encoder processes (and their fork server) CPU {r['worker_cpu']:.1f} s = "
              f"{r['worker_cpu'] / (r['wall'] * max(1, r['workers'])):.0%} of wall x workers", flush=True)

        if args.full_search:
            (tmp / "full").mkdir()
            r0 = ours(tmp / "photos", tmp / "full", args.detection + ["coarse_side=0"])
            f0 = pairwise_scores(truth, r0["tree"])
            print(f"organizer scan, coarse_side = 0: {r0['wall']:.1f} s, {len(photos) / r0['wall']:.2f} photos/s, "
                  f"{r0['faces']} faces, pairwise F1 {f0['f1']:.3f} (P {f0['precision']:.3f}, R {f0['recall']:.3f}); "
                  f"CPU per photo {(r0['parent_cpu'] + r0['worker_cpu']) / len(photos):.2f} s", flush=True)
        if not args.naive:
            return
        # --naive-count: whole people, in the order they were taken, until there are enough photos
        per_person = Counter(p.person for p in photos)
        people: list[str] = []
        for p in photos:
            if p.person not in people and (not args.naive_count or sum(per_person[q] for q in people) < args.naive_count):
                people.append(p.person)
        sub = [p.path for p in photos if p.person in people]
        keys = {photo_key(p) for p in sub}
        wall, cpu, faces, predicted = naive(sub)
        naive_rate = len(sub) / wall
        naive_f1 = pairwise_scores({k: v for k, v in truth.items() if k in keys}, predicted)
        print(f"naive: {wall:.1f} s for {len(sub)} photos, {naive_rate:.2f} photos/s, {faces} faces, "
              f"pairwise F1 {naive_f1['f1']:.3f} (P {naive_f1['precision']:.3f}, R {naive_f1['recall']:.3f})")
        if len(sub) < len(photos):
            f1_sub = pairwise_scores({k: v for k, v in truth.items() if k in keys},
                                     {k: v for k, v in r["tree"].items() if k in keys})
            print(f"  organizer scan on the same {len(sub)} photos: pairwise F1 {f1_sub['f1']:.3f}")
        ratio = ours_rate / naive_rate
        ours_cpu = (r["parent_cpu"] + r["worker_cpu"]) / len(photos)
        print(f"CPU per photo (all processes): naive {cpu / len(sub):.2f} s, organizer scan {ours_cpu:.2f} s "
              f"({cpu / len(sub) / ours_cpu:.1f}x less); wall-time ratio below")
        print(f"ratio: organizer scan is {ratio:.1f}x the naive pipeline's photos/s")
        print(f"speedup={ratio:.1f} photos_per_s={ours_rate:.2f} f1_naive={naive_f1['f1']:.3f} f1_ours={ours_f1['f1']:.3f}")


if __name__ == "__main__":
    main()
