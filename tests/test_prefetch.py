"""The encoders start on the next batch ahead of time, but only on files the writer's rules let
them read: a FIFO (whose open would block a worker forever) or a symlink out of the watched
folder is never handed to them."""

from __future__ import annotations

import json
import os
import shutil

from .conftest import DEV, run_organizer


def test_scan_ahead_skips_what_must_not_be_read(tmp_path):
    watch = tmp_path / "photos"
    shutil.copytree(DEV / "Barack_Obama", watch / "a")
    os.mkfifo(watch / "a" / "pipe.jpg")
    (tmp_path / "outside").mkdir()
    shutil.copy(DEV / "Tony_Blair" / sorted(os.listdir(DEV / "Tony_Blair"))[0], tmp_path / "outside" / "private.jpg")
    os.symlink(tmp_path / "outside" / "private.jpg", watch / "a" / "escape.jpg")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[service]\nbatch_size = 1\nworkers = 1\n")  # every later photo is read ahead
    run_organizer("scan", "--config", str(cfg), "--watch", str(watch), "--output", str(tmp_path / "out"), timeout=180)
    st = json.loads(run_organizer("status", "--json", "--errors", "10", "--output", str(tmp_path / "out")).stdout)
    assert st["photos_ok"] == 5 and st["failed"] == 2
    reasons = {os.path.basename(e["path"]): e["error"] for e in st["last_errors"]}
    assert reasons["pipe.jpg"] == "not a regular file"
    assert "outside the watched folder" in reasons["escape.jpg"]
