"""`organizer scan` and `organizer run` load the face models in their encoder processes only; when
they cannot load, they say why and exit 1 (nothing is recorded as failed)."""

from __future__ import annotations

import os
import shutil

from .conftest import DEV, run_organizer


def _broken_models(tmp_path):
    """An environment whose face_recognition_models has no models folder."""
    fake = tmp_path / "fake"
    (fake / "face_recognition_models").mkdir(parents=True)
    (fake / "face_recognition_models" / "__init__.py").write_text("raise ImportError('models damaged')\n")  # no models/
    return {**os.environ, "PYTHONPATH": str(fake)}


def test_scan_without_loadable_models_says_why(tmp_path):
    env = _broken_models(tmp_path)
    watch = tmp_path / "photos"
    shutil.copytree(DEV / "Barack_Obama", watch / "Barack_Obama")
    proc = run_organizer("scan", "--watch", str(watch), "--output", str(tmp_path / "out"), check=False, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "face_recognition_models is not installed whole" in proc.stderr and "uv sync" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_organizer("status", "--output", str(tmp_path / "out"), "--json", check=False)
    assert '"failed": 0' in proc.stdout and '"photos": 0' in proc.stdout


def test_run_without_loadable_models_says_why(tmp_path):
    watch = tmp_path / "photos"
    shutil.copytree(DEV / "Barack_Obama", watch / "Barack_Obama")
    proc = run_organizer("run", "--watch", str(watch), "--output", str(tmp_path / "out"), check=False,
                         env=_broken_models(tmp_path), timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "face_recognition_models is not installed whole" in proc.stderr and "uv sync" in proc.stderr
    assert "Traceback" not in proc.stderr and "watching" not in proc.stderr
    proc = run_organizer("status", "--output", str(tmp_path / "out"), "--json", check=False)
    assert '"failed": 0' in proc.stdout and '"photos": 0' in proc.stdout
