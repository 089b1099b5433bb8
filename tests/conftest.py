"""Shared fixtures: the dev set is scanned once per session and the store reused."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ORGANIZER_SHARED", ROOT.parent / "shared")) / "faces"
DEV = SHARED / "dev"
NO_FACES = SHARED / "no_faces"


def organizer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "organizer", *args]


def run_organizer(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(organizer_cmd(*args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"organizer {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (originals must stay byte-identical)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Library:
    watch: Path
    output: Path
    db: Path
    people: Path  # watch/people: one folder per person (the labels)
    scan_stdout: str
    scan_stderr: str
    originals: dict[str, str]


def make_library(root: Path, with_no_faces: bool = True) -> tuple[Path, Path]:
    watch = root / "photos"
    shutil.copytree(DEV, watch / "people")
    if with_no_faces:
        shutil.copytree(NO_FACES, watch / "no_faces")
    return watch, root / "sorted"


@pytest.fixture(scope="session")
def dev_library(tmp_path_factory) -> Library:
    """The dev set (12 people + no-face photos) scanned once with `organizer scan` and defaults."""
    if not DEV.is_dir():
        pytest.fail(f"labelled photos not found at {DEV} (set ORGANIZER_SHARED)")
    root = tmp_path_factory.mktemp("dev_library")
    watch, output = make_library(root)
    originals = tree_hashes(watch)
    proc = run_organizer("scan", "--watch", str(watch), "--output", str(output))
    return Library(watch, output, output / ".organizer" / "organizer.db", watch / "people",
                   proc.stdout, proc.stderr, originals)


@pytest.fixture(scope="session", autouse=True)
def shared_photos_untouched():
    """The labelled sets the tests copy from are never written: byte-identical after the session.
    (End-to-end tests also compare the sha256 of their own copies before and after.)"""
    roots = [d for d in (DEV, NO_FACES) if d.is_dir()]
    before = {str(r): tree_hashes(r) for r in roots}
    yield
    for r in roots:
        assert tree_hashes(r) == before[str(r)], f"files under {r} changed"
