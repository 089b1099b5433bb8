"""How fast the review page answers, at library sizes.

    uv run python benchmarks/bench_web.py [--sizes 10000,100000]

For each N it builds a store of N one-face photos (synthetic encodings around one centre per
person, people of Zipf-like sizes, 15% doubtful faces with a nearest person; every photo is a hard
link to a small real JPEG, as in bench_output.py), serves the page with uvicorn on a free port of
127.0.0.1 (as `organizer web` does) and times, over HTTP with the session cookie, the median of 5:

* ``people``: the People grid (first page): its first load, which counts every person's photos,
  then again (the counts are kept until the store changes);
* ``person``: the page of the biggest person (all their encodings read, ordered by distance);
* ``doubtful``: the first page of doubtful faces;
* ``crop``: a face crop cut from its original (the server's very first image; then the median of
  5 other faces) and one from the cache;
* the reference, measured in the same run: the static style sheet through the same server (the
  HTTP round trip every page pays), and ``ReviewQueries.status()`` (what `organizer status` reads).

Each N runs in a fresh subprocess. Figures depend on the machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_output import _photo  # noqa: E402  (a small real JPEG with a face)


def build(n: int, work: Path):
    """A store of ``n`` photos; returns (settings, id of the biggest person)."""
    from organizer.config import load_config
    from organizer.encode import FaceRecord, PhotoResult
    from organizer.store import PhotoFile, Store

    src = work / "photos"
    src.mkdir()
    w, h = _photo(work / "face.jpg")
    rng = np.random.default_rng(0)
    n_people = max(5, n // 12)
    weights = 1.0 / np.arange(1, n_people + 1) ** 1.1
    who = rng.choice(n_people, n, p=weights / weights.sum())
    doubtful = rng.random(n) < 0.15
    centres = rng.normal(size=(n_people, 128))
    box = dict(top=h // 4, right=3 * w // 4, bottom=3 * h // 4, left=w // 4)
    settings = load_config(None, {"paths.watch": str(src), "paths.output": str(work / "sorted")})
    with Store.open(settings.db_path) as store:
        batch = []
        for i in range(n):
            p = src / f"{i // 1000:03d}" / f"img_{i:06d}.jpg"
            if i % 1000 == 0:  # a file may have at most 65,000 hard links (ext4)
                p.parent.mkdir()
                shutil.copy(work / "face.jpg", p.parent / "face.jpg")
            os.link(p.parent / "face.jpg", p)
            enc = centres[who[i]] + rng.normal(scale=0.3, size=128)
            face = FaceRecord(**box, encoding=enc / np.linalg.norm(enc), sharpness=100.0)
            batch.append((PhotoFile(str(p), 1000, 0.0), f"{i:064x}", PhotoResult(p, w, h, [face])))
            if len(batch) == 2000 or i == n - 1:
                with store.db.atomic():  # one commit per 2000 photos (the set-up is not measured)
                    for photo, sha, result in batch:
                        store.record_encoded(photo, sha, result)
                batch = []
        ids = [f for (f,) in store.db.execute("select id from faces order by id")]
        assignments, members = {}, {}
        for f, person, unsure in zip(ids, who.tolist(), doubtful.tolist()):
            if unsure:
                assignments[f] = (None, True, "no confident match with any person", person + 1)
            else:
                assignments[f] = (person + 1, False, None, person + 1)
                members.setdefault(person + 1, []).append(f)
        clusters = {c: (len(m), m[0]) for c, m in members.items()}
        store.save_clustering(assignments, clusters, (), n_people + 1, full=True)
        biggest = max(members, key=lambda c: len(members[c]))
        return settings, biggest, len(members[biggest])


def worker(n: int, workdir: str) -> dict:
    from organizer.store import Store
    from organizer.store_review import ReviewQueries
    from organizer.web.server import WebServer

    t = time.perf_counter()
    settings, biggest, biggest_faces = build(n, Path(workdir))
    setup_s = time.perf_counter() - t
    server = WebServer(settings, "127.0.0.1", 0)
    server.start()
    try:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        base = server.url.split("?")[0].rstrip("/")
        opener.open(server.url.replace("/?", "/static/style.css?")).read()  # the token for the cookie

        def get(path: str) -> float:
            t = time.perf_counter()
            with opener.open(base + path) as r:
                r.read()
            return time.perf_counter() - t

        def median(path: str) -> float:
            return statistics.median(get(path) for _ in range(5))

        out = {"n": n, "setup_s": setup_s, "biggest_faces": biggest_faces}
        out["people_first_s"] = get("/")  # counts every person's photos
        out["people_s"] = median("/")  # the same counts, kept until the store changes
        out["person_s"] = median(f"/person/{biggest}")
        out["doubtful_s"] = median("/doubtful")
        with Store.open_readonly(settings.db_path) as store:
            ids, _ = ReviewQueries(store).person_encodings(biggest)
            # the first image a server decodes also loads codecs and starts its thread pool
            out["crop_first_s"] = get(f"/face/{ids[0]}.jpg")
            out["crop_cold_s"] = statistics.median(get(f"/face/{f}.jpg") for f in ids[1:6])
            out["crop_warm_s"] = median(f"/face/{ids[0]}.jpg")
            out["static_s"] = median("/static/style.css")
            t = time.perf_counter()
            for _ in range(5):
                ReviewQueries(store).status()
            out["status_s"] = (time.perf_counter() - t) / 5
    finally:
        server.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir)))
        return
    print("| photos | people grid: first / again | biggest person (faces) | doubtful | crop: very first / uncached / cached | "
          "style sheet (HTTP) | ReviewQueries.status() | people grid first / status |")
    print("|---|---|---|---|---|---|---|---|")
    ms = lambda s: f"{s * 1000:.0f} ms" if s >= 0.01 else f"{s * 1000:.1f} ms"  # noqa: E731
    for n in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench_web_") as d:
            res = subprocess.run([sys.executable, __file__, "--worker", str(n), "--dir", d],
                                 capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"the worker for {n} photos failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {n:,} | {ms(r['people_first_s'])} / {ms(r['people_s'])} | {ms(r['person_s'])} ({r['biggest_faces']:,}) | {ms(r['doubtful_s'])} | "
              f"{ms(r['crop_first_s'])} / {ms(r['crop_cold_s'])} / {ms(r['crop_warm_s'])} | {ms(r['static_s'])} | {ms(r['status_s'])} | "
              f"{r['people_first_s'] / r['status_s']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
