"""`organizer scan` loads the face models in its encoder processes only; when they cannot load,
it says why and exits 1 (nothing is recorded as failed)."""

from __future__ import annotations

import os
import shutil

from .conftest import DEV, run_organizer


def test_scan_without_loadable_models_says_why(tmp_path):
    fake = tmp_path / "fake"
    (fake / "face_recognition_models").mkdir(parents=True)
    (fake / "face_recognition_models" / "__init__.py").write_text("raise ImportError('models damaged')\n")  # no models/
    watch = tmp_path / "photos"
    shutil.copytree(DEV / "Barack_Obama", watch / "Barack_Obama")
    env = {**os.environ, "PYTHONPATH": str(fake)}
    proc = run_organizer("scan", "--watch", str(watch), "--output", str(tmp_path / "out"), check=False, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "face_recognition_models is not installed whole" in proc.stderr and "uv sync" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_organizer("status", "--output", str(tmp_path / "out"), "--json", check=False)
    assert '"failed": 0' in proc.stdout and '"photos": 0' in proc.stdout
