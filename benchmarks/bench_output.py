"""Cost of keeping the output tree in line with the store, at library sizes.

    uv run python benchmarks/bench_output.py [--sizes 10000,100000]

For each N it builds a store of N one-face photos (synthetic encodings, people of Zipf-like sizes,
15% strangers in doubtful/; every photo is a hard link to a small real JPEG, so the disk cost
is the tree itself) and a clustering written straight into the store (no DBSCAN: this measures
the output stage only). Then it times:

* ``create``: the first reconcile, which makes every link and face crop;
* ``verify``: a full reconcile with nothing to do, which checks every entry on disk (a scan's
  last step; the service's start and periodic rescan);
* ``one new photo, one pass``: a photo added to the biggest person, then a reconcile of every
  folder without the check on disk (``verify=False``: entries made earlier are trusted), as the
  service ran after each batch before the store marked what its writers change;
* ``one new photo``: another such photo, then what the service runs now after that batch: only the
  folders the store marked (that person's; ``output.tree_scope``);
* ``small person``: the same for a photo of one of the smallest people (the update's fixed cost);
* ``a rename``: the second biggest person named, then the same update: the old and the new
  folder, and ``doubtful/`` (its crops and montage captions name the nearest person);
* the reference, measured in the same run: one ``os.lstat`` of every entry of the output tree
  (``walk``), the least any check of the whole tree costs.

Each N runs in a fresh subprocess (peak RSS per N). Figures depend on the disk; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEV = Path(os.environ.get("ORGANIZER_SHARED", ROOT.parent / "shared")) / "faces" / "dev"


def _photo(dest: Path) -> tuple[int, int]:
    """A small real JPEG with a face (a dev photo scaled to 160 px): crops decode it."""
    from PIL import Image

    src = sorted(DEV.glob("*/*.jpg"))[0]
    im = Image.open(src).convert("RGB")
    im.thumbnail((160, 160))
    im.save(dest, quality=90)
    return im.size


def worker(n: int, workdir: str) -> dict:
    from organizer.config import load_config
    from organizer.encode import FaceRecord, PhotoResult
    from organizer.output import reconcile, tree_scope
    from organizer.store import PhotoFile, Store

    work = Path(workdir)
    src, out = work / "photos", work / "sorted"
    src.mkdir()
    w, h = _photo(work / "face.jpg")
    rng = np.random.default_rng(0)
    n_people = max(5, n // 12)
    weights = 1.0 / np.arange(1, n_people + 1) ** 1.1
    who = rng.choice(n_people, n, p=weights / weights.sum())
    stranger = rng.random(n) < 0.15
    box = dict(top=h // 4, right=3 * w // 4, bottom=3 * h // 4, left=w // 4)
    settings = load_config(None, {"paths.watch": str(src), "paths.output": str(out)})
    t = time.perf_counter()
    with Store.open(settings.db_path) as store:
        batch = []
        for i in range(n):
            p = src / f"{i // 1000:03d}" / f"img_{i:06d}.jpg"
            if i % 1000 == 0:  # a file may have at most 65,000 hard links (ext4)
                p.parent.mkdir()
                shutil.copy(work / "face.jpg", p.parent / "face.jpg")
            os.link(p.parent / "face.jpg", p)
            face = FaceRecord(**box, encoding=rng.normal(size=128), sharpness=100.0)
            batch.append((PhotoFile(str(p), 1000, 0.0), f"{i:064x}", PhotoResult(p, w, h, [face])))
            if len(batch) == 2000 or i == n - 1:
                with store.db.atomic():  # one commit per 2000 photos: the set-up is not what is measured
                    for photo, sha, result in batch:
                        store.record_encoded(photo, sha, result)
                batch = []
        ids = [f for (f,) in store.db.execute("select id from faces order by id")]
        assignments, members = {}, {}
        for f, person, alone in zip(ids, who.tolist(), stranger.tolist()):
            if alone:
                assignments[f] = (None, True, "no confident match with any person", None)
            else:
                assignments[f] = (person + 1, False, None, person + 1)
                members.setdefault(person + 1, []).append(f)
        clusters = {c: (len(m), m[0]) for c, m in members.items()}
        store.save_clustering(assignments, clusters, (), n_people + 1, full=True)
        setup_s = time.perf_counter() - t

        def timed(fn):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        link_mode, max_pixels = settings.service.link_mode, settings.detection.max_pixels
        run = lambda verify=True: reconcile(store, out, link_mode, max_pixels, verify)  # noqa: E731
        create_s = timed(run)
        steady_s = min(timed(run) for _ in range(3))

        def walk():
            for dirpath, dirnames, filenames in os.walk(out):
                for name in filenames + dirnames:
                    os.lstat(os.path.join(dirpath, name))

        walk_s = min(timed(walk) for _ in range(3))
        entries = sum(len(f) for _, _, f in os.walk(out))

        # one new photo of the biggest person, as a service batch ends: store, clustering, tree;
        # "one pass": reconciled as it was before the store marked what changed (every row read)
        store.take_tree_changes()  # (a fresh handle: "everything")
        sizes = {c: size for c, (size, _) in clusters.items()}

        def new_photo(k: int, person: int = 1) -> None:
            p = src / f"new{k}.jpg"
            os.link(work / "face.jpg", p)
            store.record_encoded(PhotoFile(str(p), 1000, 0.0), f"{n + k:064x}", PhotoResult(p, w, h, [FaceRecord(
                **box, encoding=rng.normal(size=128), sharpness=100.0)]))
            (f,) = store.db.execute("select max(id) from faces").fetchone()
            sizes[person] += 1
            store.save_clustering({f: (person, False, None, person)}, {person: (sizes[person], clusters[person][1])},
                                  (), n_people + 1)

        def service_update():  # what OutputTree.update(verify=False) runs: the folders marked
            reconcile(store, out, link_mode, max_pixels, False, scope=tree_scope(store, store.take_tree_changes()))

        new_photo(1)
        one_s = timed(lambda: run(False))
        store.take_tree_changes()
        new_photo(2)
        scoped_s = timed(service_update)
        assert (out / "cluster_1" / "new1.jpg").exists() and (out / "cluster_1" / "new2.jpg").exists()
        small = max(clusters)  # one of the smallest people
        new_photo(3, small)
        small_s = timed(service_update)
        assert (out / f"cluster_{small}" / "new3.jpg").exists()
        store.set_cluster_name(2, "Renamed")  # the second biggest person; doubtful/ names it too
        rename_s = timed(service_update)
        assert (out / "Renamed").is_dir() and not (out / "cluster_2").exists()
    return {"n": n, "entries": entries, "setup_s": setup_s, "create_s": create_s, "steady_s": steady_s,
            "one_s": one_s, "scoped_s": scoped_s, "small_s": small_s, "rename_s": rename_s, "walk_s": walk_s,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir)))
        return
    print("| photos | tree entries | create | verify (nothing to do) | one new photo, one pass | one new photo "
          "| one new photo (small person) | a rename | walk (lstat every entry) | one pass / walk | one new photo / walk "
          "| small person / walk | a rename / walk | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench_output_") as d:
            res = subprocess.run([sys.executable, __file__, "--worker", str(n), "--dir", d],
                                 capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"the worker for {n} photos failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        walk = r["walk_s"]
        print(f"| {n:,} | {r['entries']:,} | {r['create_s']:.1f} s | {r['steady_s']:.2f} s | {r['one_s']:.2f} s | "
              f"{r['scoped_s']:.3f} s | {r['small_s']:.3f} s | {r['rename_s']:.2f} s | {walk:.2f} s | "
              f"{r['one_s'] / walk:.1f}x | {r['scoped_s'] / walk:.2f}x | {r['small_s'] / walk:.2f}x | "
              f"{r['rename_s'] / walk:.1f}x | {r['rss_mb']:.0f} MB |", flush=True)

if __name__ == "__main__":
    main()
