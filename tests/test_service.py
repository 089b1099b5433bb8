"""`organizer run` end to end: a real subprocess watching a real folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from organizer.evaluate import photo_key

from .conftest import DEV, organizer_cmd, tree_hashes

PEOPLE = ["Tony_Blair", "Colin_Powell"]


def _folders_of(output: Path, photo: Path) -> set[str]:
    """Person folders (not doubtful) that link ``photo``."""
    key = photo_key(photo)
    found = set()
    if not output.exists():
        return found
    for d in output.iterdir():
        if d.is_dir() and d.name.startswith("cluster_"):
            for e in d.iterdir():
                if e.name != "representative.jpg" and not e.name.startswith(".") and photo_key(e) == key:
                    found.add(d.name)
    return found


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


class Service:
    def __init__(self, watch: Path, output: Path, config: Path, log: Path):
        self.log = log
        self.fh = open(log, "ab")
        self.proc = subprocess.Popen(
            organizer_cmd("run", "--watch", str(watch), "--output", str(output), "--config", str(config)),
            stdout=self.fh, stderr=subprocess.STDOUT,
        )

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.fh.close()
        return code

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def config(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[service]\nsettle_seconds = 1.0\nrescan_interval = 0\nworkers = 1\n")
    return cfg


def _copy_slowly(src: Path, dst: Path, chunks: int = 8, pause: float = 0.4) -> None:
    data = src.read_bytes()
    step = len(data) // chunks + 1
    with open(dst, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i : i + step])
            fh.flush()
            time.sleep(pause)


def test_service_end_to_end(tmp_path, config):
    watch, output = tmp_path / "inbox", tmp_path / "people"
    watch.mkdir()
    svc = Service(watch, output, config, tmp_path / "service.log")
    try:
        _wait(lambda: (output / ".organizer" / "organizer.db").exists(), 60, "the store")
        # one more photo written slowly in chunks, as a slow copy over a network would (not also
        # copied whole: identical files are linked once, under the first name)
        slow_src = sorted((DEV / "Tony_Blair").iterdir())[0]
        late_src = sorted((DEV / "Colin_Powell").iterdir())[0]
        for person in PEOPLE:
            shutil.copytree(DEV / person, watch / person, ignore=lambda d, names: [slow_src.name, late_src.name])
        (watch / "slow").mkdir()
        slow = watch / "slow" / "blair_slow.jpg"
        _copy_slowly(slow_src, slow)

        blair = sorted((watch / "Tony_Blair").iterdir())
        powell = sorted((watch / "Colin_Powell").iterdir())
        _wait(lambda: len(_folders_of(output, blair[-1])) == 1 and _folders_of(output, powell[-1]), 120,
              "photos to be sorted")
        _wait(lambda: _folders_of(output, slow), 60, "the slowly written photo")
        blair_folder = _folders_of(output, blair[-1])
        assert _folders_of(output, slow) == blair_folder
        assert _folders_of(output, powell[-1]) != blair_folder
        # the slow file was read whole: no failure recorded for it
        assert "blair_slow.jpg" not in "".join(l for l in svc.text().splitlines() if "cannot use" in l)

        # delete one original: it leaves the tree
        victim = blair[1]
        victim_name = victim.name
        assert any((output / f / victim_name).exists() for f in blair_folder)
        victim.unlink()
        _wait(lambda: not any((output / f / victim_name).exists() for f in blair_folder), 30,
              "the deleted photo to leave the tree")
        assert svc.stop() == 0
        assert "stopped cleanly" in svc.text()

        # files added while it was down are found at the next start
        (watch / "later").mkdir()
        late = watch / "later" / "powell_late.jpg"
        shutil.copy(late_src, late)
        os.utime(late, (time.time() - 60, time.time() - 60))
        svc = Service(watch, output, config, tmp_path / "service2.log")
        powell_folder = _folders_of(output, powell[-1])
        _wait(lambda: _folders_of(output, late) == powell_folder, 90, "the photo added while stopped")
    finally:
        if svc.proc.poll() is None:
            assert svc.stop() == 0


def test_second_instance_refused(tmp_path, config):
    watch, output = tmp_path / "inbox", tmp_path / "people"
    watch.mkdir()
    svc = Service(watch, output, config, tmp_path / "a.log")
    try:
        _wait(lambda: "watching" in svc.text(), 60, "the first instance to start")
        second = subprocess.run(
            organizer_cmd("run", "--watch", str(watch), "--output", str(output), "--config", str(config)),
            capture_output=True, text=True, timeout=60,
        )
        assert second.returncode != 0
        assert "already using the store" in second.stderr
    finally:
        assert svc.stop(signal.SIGINT) == 0


def test_naming_while_running_renames_folder(tmp_path, config):
    watch, output = tmp_path / "inbox", tmp_path / "people"
    shutil.copytree(DEV / "Colin_Powell", watch / "p")
    originals = tree_hashes(watch)
    svc = Service(watch, output, config, tmp_path / "n.log")
    try:
        photo = sorted((watch / "p").iterdir())[0]
        folder = _wait(lambda: _folders_of(output, photo), 90, "sorting")
        (cid,) = [int(f.split("_")[1]) for f in folder]
        subprocess.run(organizer_cmd("name", str(cid), "Colin Powell", "--output", str(output)), check=True,
                       capture_output=True, timeout=60)
        _wait(lambda: (output / "Colin Powell" / photo.name).exists(), 30, "the renamed folder")
        _wait(lambda: not (output / f"cluster_{cid}").exists(), 30, "the old folder to go")
        assert (output / "Colin Powell" / "representative.jpg").is_file()
        assert f"person folder renamed: cluster_{cid} -> Colin Powell" in svc.text()
    finally:
        assert svc.stop() == 0
    assert tree_hashes(watch) == originals
