"""A small scanned library for the review page's tests (test_web.py, test_web_browser.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from organizer.config import Settings, load_config
from organizer.montage import MONTAGE
from organizer.output import REPRESENTATIVE

from .conftest import DEV, organizer_cmd, run_organizer, tree_hashes

# four people of the dev set, nine photos each: a scan takes well under a minute
PEOPLE = ["Colin_Powell", "Tony_Blair", "Madonna", "Jerry_Seinfeld"]


@dataclass
class WebLibrary:
    watch: Path
    output: Path
    settings: Settings
    originals: dict[str, str]

    def folders(self) -> dict[str, set[str]]:
        """Person folder -> names of the photos in it (representative.jpg, montage.jpg and the hidden
        temporary file a crop is written to left out: the service may be mid-write)."""
        return {d.name: {e.name for e in d.iterdir() if e.name not in (REPRESENTATIVE, MONTAGE)
                         and not e.name.startswith(".")}
                for d in self.output.iterdir() if d.is_dir() and not d.name.startswith(".")
                and d.name != "doubtful"}

    def person_of(self, photo: str) -> str:
        """The one person folder (by name) that holds the photo named ``photo``."""
        (folder,) = [f for f, photos in self.folders().items() if photo in photos]
        return folder


def scan_library(root: Path, people=PEOPLE) -> WebLibrary:
    watch, output = root / "photos", root / "sorted"
    for person in people:
        shutil.copytree(DEV / person, watch / person)
    run_organizer("scan", "--watch", str(watch), "--output", str(output))
    settings = load_config(None, {"paths.watch": str(watch), "paths.output": str(output)})
    return WebLibrary(watch, output, settings, tree_hashes(watch))


class WebProcess:
    """`organizer web` (or `run --web`) in a subprocess, on a free port; ``url`` holds the token."""

    def __init__(self, *args: str, log: Path):
        self.log = log
        self.fh = open(log, "wb")
        self.proc = subprocess.Popen(organizer_cmd(*args, "--port", "0"), stdout=subprocess.PIPE,
                                     stderr=self.fh, text=True)
        line = self.proc.stdout.readline()  # the first line of stdout: "review page: <url>"
        match = re.search(r"(http://\S+)", line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"no address printed (got {line!r}):\n{log.read_text()}")
        self.url = match.group(1)
        self.base = self.url.split("?")[0].rstrip("/")

    def stop(self, timeout: float = 60) -> int:
        self.proc.terminate()
        code = self.proc.wait(timeout=timeout)
        self.fh.close()
        return code


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
