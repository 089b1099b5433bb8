"""A drop in seconds: how long after a photo lands in the watched folder it appears in the output tree.

    uv run python benchmarks/bench_latency.py [--drops 10] [--burst 17] [--settle 2]

Starts `organizer run` (a subprocess, default settings but ``settle_seconds``) on a library of
five dev/ people with three photos each, waits until their folders exist (the service is then
idle), and drops photos of the same people one at a time (written under a hidden name, then
renamed into place, as a download or copy finishes). For each drop it times how long until a
hard link to the photo appears anywhere in the output tree (its person's folder or doubtful/),
polling every 50 ms. Then ``--burst`` photos at once: when the first and the last appear. The
target is settle_seconds + 2 s for a single drop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ORGANIZER_SHARED", ROOT.parent / "shared")) / "faces"
PEOPLE = ["Colin_Powell", "Donald_Rumsfeld", "George_W_Bush", "Hugo_Chavez", "Tony_Blair"]


def inodes(tree: Path) -> set[int]:
    out = set()
    for dirpath, _, files in os.walk(tree):
        for f in files:
            try:
                out.add(os.lstat(os.path.join(dirpath, f)).st_ino)
            except OSError:
                pass
    return out


def drop(src: Path, dst: Path) -> int:
    """Copy ``src`` under a hidden name, then rename it into place; returns its inode."""
    tmp = dst.with_name("." + dst.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return os.stat(dst).st_ino


def wait_for(out: Path, wanted: set[int], t0: float, timeout: float) -> dict[int, float]:
    """Seconds after t0 at which each wanted inode appeared under ``out``."""
    seen: dict[int, float] = {}
    while len(seen) < len(wanted) and time.monotonic() - t0 < timeout:
        now = inodes(out)
        for ino in wanted - seen.keys():
            if ino in now:
                seen[ino] = time.monotonic() - t0
        time.sleep(0.05)
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drops", type=int, default=10)
    ap.add_argument("--burst", type=int, default=17)
    ap.add_argument("--settle", type=float, default=2.0)
    args = ap.parse_args()
    photos = {p: sorted((SHARED / "dev" / p).iterdir()) for p in PEOPLE}
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        tmp = Path(tmp)
        watch, out = tmp / "photos", tmp / "sorted"
        for person, files in photos.items():
            (watch / person).mkdir(parents=True)
            for f in files[:3]:
                shutil.copyfile(f, watch / person / f.name)
        rest = [(person, f) for i in range(3, 9) for person, files in photos.items() if i < len(files)
                for f in [files[i]]]
        cfg = tmp / "service.toml"
        cfg.write_text(f"[service]\nsettle_seconds = {args.settle}\n")
        log = open(tmp / "service.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "organizer", "run", "--config", str(cfg), "--watch", str(watch),
                                 "--output", str(out)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            t0 = time.monotonic()
            while not (out.is_dir() and sum(1 for d in out.iterdir() if d.name.startswith("cluster_")) >= len(PEOPLE)):
                if proc.poll() is not None or time.monotonic() - t0 > 300:
                    raise SystemExit(f"the service did not sort the first photos:\n{(tmp / 'service.log').read_text()[-3000:]}")
                time.sleep(0.2)
            time.sleep(2.0)  # idle
            single = []
            for person, f in rest[: args.drops]:
                ino = drop(f, watch / person / f.name)
                t = time.monotonic()
                got = wait_for(out, {ino}, t, 60)
                single.append(got.get(ino, float("inf")))
                print(f"  {person}/{f.name}: {single[-1]:.2f} s", flush=True)
                time.sleep(1.0)
            burst_files = rest[args.drops : args.drops + args.burst]
            t = time.monotonic()
            wanted = {drop(f, watch / person / f.name) for person, f in burst_files}
            got = wait_for(out, wanted, t, 120)
            times = sorted(got.values())
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            log.close()
        print(f"single drops ({len(single)}, settle_seconds {args.settle}): median {statistics.median(single):.2f} s, "
              f"max {max(single):.2f} s (target {args.settle + 2:.0f} s)")
        if times:
            print(f"burst of {len(burst_files)}: first after {times[0]:.2f} s, last after {times[-1]:.2f} s "
                  f"({len(times)} appeared)")
        print(f"median={statistics.median(single):.2f} max={max(single):.2f}")


if __name__ == "__main__":
    main()
