"""kill -9 in the middle of a scan: the next scan finishes the job, encoding nothing twice."""

from __future__ import annotations

import re
import signal
import subprocess

import psutil
import pytest

from organizer.evaluate import tree_assignment

from .conftest import make_library, organizer_cmd, run_organizer

ENCODED = re.compile(r"encoded (.+): \d+ face")


def _partition(output):
    """The tree as a partition of photo identities (folder numbering may differ between runs)."""
    by_folder = {}
    for photo, folders in tree_assignment(output).items():
        for f in folders:
            by_folder.setdefault(f, set()).add(photo.split(":")[-1] if photo.startswith("inode") else photo)
    return by_folder


def _relative_partition(output, watch):
    import os

    inode_to_rel = {os.stat(p).st_ino: str(p.relative_to(watch)) for p in watch.rglob("*") if p.is_file()}
    groups = set()
    for photos in _partition(output).values():
        groups.add(frozenset(inode_to_rel[int(p)] for p in photos))
    doubtful = output / "doubtful"
    doubt = frozenset(inode_to_rel[os.stat(p).st_ino] for p in doubtful.iterdir() if p.is_file() and p.name != "montage.jpg") if doubtful.exists() else frozenset()
    return groups, doubt


@pytest.mark.slow
def test_kill_during_scan_then_resume(tmp_path, dev_library):
    watch, output = make_library(tmp_path)
    cmd = organizer_cmd("scan", "--watch", str(watch), "--output", str(output))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    first = []
    for line in proc.stderr:
        m = ENCODED.search(line)
        if m:
            first.append(m.group(1))
            if len(first) >= 40:
                workers = psutil.Process(proc.pid).children(recursive=True)
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(first) >= 40
    # the encoder workers notice their parent died and exit instead of lingering as orphans
    assert workers
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive

    second = run_organizer("scan", "--watch", str(watch), "--output", str(output))
    again = ENCODED.findall(second.stderr)
    assert not set(first) & set(again), "photos committed before the kill were encoded again"
    every_photo = {str(p) for p in watch.rglob("*") if p.is_file()}
    assert set(first) | set(again) == every_photo
    assert _relative_partition(output, watch) == _relative_partition(dev_library.output, dev_library.watch)
