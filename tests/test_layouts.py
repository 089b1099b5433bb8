"""Folder layouts: wherever the store and the output tree are put relative to the watched folder,
every photo is sorted (or the layout is refused at start, before anything is written), and a store
seen from another layout never forgets the photos that are still there.

Each scan uses 4 photos of 2 people (8 photos) to stay quick.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from .badfiles import ServiceProc, folders_holding, tree_index, wait_for
from .conftest import DEV, run_organizer

A, B = "Tony_Blair", "Colin_Powell"
PER_PERSON = 4


def _photos(watch: Path, sub: str = "") -> list[Path]:
    """4 photos of A and of B under watch/<sub>/<person>/."""
    out = []
    for person in (A, B):
        d = watch / sub / person
        d.mkdir(parents=True, exist_ok=True)
        for src in sorted((DEV / person).iterdir())[:PER_PERSON]:
            shutil.copy(src, d / src.name)
            out.append(d / src.name)
    return out


def _assert_sorted(output: Path, photos: list[Path]) -> None:
    """Each photo in exactly one person folder, and the two people in different ones."""
    index = tree_index(output)
    folders = {p: folders_holding(output, p, index) for p in photos}
    assert all(len(f) == 1 for f in folders.values()), folders
    of = {person: set().union(*(f for p, f in folders.items() if p.parent.name == person)) for person in (A, B)}
    assert len(of[A]) == 1 and len(of[B]) == 1 and of[A] != of[B], of


def _scan(*args: str, **kw):
    return run_organizer("scan", *args, **kw)


# layout name -> (watch, output, db) relative to the test's home; photos are put in watch/<sub>
LAYOUTS = {
    # item 1: the db's folder contains the watched folder
    "db_beside_watch": ("photos/inbox", "people", "photos/organizer.db", ""),
    "db_above_watch": ("photos/inbox", "people", "organizer.db", ""),
    # item 3: the db at the watched folder's root, or in one of its sub-folders (holding photos)
    "db_at_watch_root": ("inbox", "people", "inbox/organizer.db", ""),
    "db_in_watch_subfolder": ("inbox", "people", "inbox/store/organizer.db", "store"),
    "output_inside_watch": ("inbox", "inbox/sorted", None, ""),
}
INSIDE = {"db_at_watch_root", "db_in_watch_subfolder", "output_inside_watch"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_scan_sorts_every_photo_in_every_layout(tmp_path, layout):
    watch_rel, output_rel, db_rel, sub = LAYOUTS[layout]
    watch, output = tmp_path / watch_rel, tmp_path / output_rel
    photos = _photos(watch, sub)
    args = ["--watch", str(watch), "--output", str(output)] + (["--db", str(tmp_path / db_rel)] if db_rel else [])
    proc = _scan(*args)
    assert proc.stdout.startswith(f"{len(photos)} photos seen, {len(photos)} encoded, 0 duplicates, 0 failed"), \
        proc.stdout
    _assert_sorted(output, photos)
    if layout in INSIDE:  # the store's files and the output tree are in the watched folder: never input
        again = _scan(*args)
        assert again.stdout.startswith(f"{len(photos)} photos seen, 0 encoded, 0 duplicates, 0 failed, 0 removed"), \
            again.stdout
        _assert_sorted(output, photos)


@pytest.mark.parametrize("layout", ["watch_inside_output", "watch_is_output", "watch_is_output_via_symlink"])
def test_layouts_that_cannot_work_are_refused_before_anything_is_written(tmp_path, layout):
    people = tmp_path / "people"
    watch = {"watch_inside_output": people / "inbox", "watch_is_output": people,
             "watch_is_output_via_symlink": tmp_path / "link"}[layout]
    _photos(people / "inbox" if layout == "watch_inside_output" else people)
    if layout == "watch_is_output_via_symlink":
        watch.symlink_to(people)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for command in ("scan", "run") if layout == "watch_inside_output" else ("scan",):
        proc = run_organizer(command, "--watch", str(watch), "--output", str(people), check=False, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        msg = proc.stderr.lower()
        assert ("inside the output folder" in msg or "are the same" in msg or "different folders" in msg), msg
        assert "choose" in msg or "different" in msg, msg  # says what to do
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "something was written"


def test_store_moved_above_the_watched_folder_forgets_nothing(tmp_path):
    """Item 2: a store moved so that its folder contains the watched folder, then `scan --db`
    there, removed every photo ("no longer in the watched folder") and every link."""
    home = tmp_path / "photos"
    watch, output = home / "inbox", tmp_path / "people"
    photos = _photos(watch)
    _scan("--watch", str(watch), "--output", str(output))
    _assert_sorted(output, photos)
    old = output / ".organizer"
    moved = home / "organizer.db"
    for f in old.iterdir():  # the db with its side files
        shutil.move(f, home / f.name)
    proc = _scan("--watch", str(watch), "--output", str(output), "--db", str(moved))
    assert "no longer in the watched folder" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"{len(photos)} photos seen, 0 encoded, 0 duplicates, 0 failed, 0 removed"), \
        proc.stdout
    _assert_sorted(output, photos)


def test_mass_forget_is_refused_unless_asked_for(tmp_path):
    """More than service.max_forget_share (50%) of the library gone at once looks like a layout
    or mount mistake: nothing is forgotten (exit 4, says why); --forget-anyway forgets them."""
    watch, output = tmp_path / "inbox", tmp_path / "people"
    photos = _photos(watch)
    _scan("--watch", str(watch), "--output", str(output))
    parked = tmp_path / "parked"
    parked.mkdir()
    shutil.move(watch / A, parked / A)
    shutil.move(watch / B / photos[-1].name, parked / photos[-1].name)  # 5 of 8 gone
    proc = _scan("--watch", str(watch), "--output", str(output), check=False)
    assert proc.returncode == 4, (proc.returncode, proc.stderr[-2000:])
    assert "--forget-anyway" in proc.stderr and "nothing is forgotten" in proc.stderr
    assert "0 removed" in proc.stdout and "5 photos not found were kept" in proc.stdout, proc.stdout
    assert all(folders_holding(output, parked / A / p.name) for p in photos[:PER_PERSON]), "links were removed"
    proc = _scan("--watch", str(watch), "--output", str(output), "--forget-anyway")
    assert "5 removed" in proc.stdout, proc.stdout
    assert not any(folders_holding(output, parked / A / p.name) for p in photos[:PER_PERSON])


def test_tilde_and_home_in_config_and_flags(tmp_path):
    """Item 4: `watch = "~/Pictures/inbox"` in the config, `--output=~/people` (no shell to
    expand it) and `$HOME` all mean the home folder; `config check` shows them resolved."""
    home = tmp_path / "home"
    work = tmp_path / "cwd"
    work.mkdir()
    photos = _photos(home / "Pictures" / "inbox")
    cfg = tmp_path / "organizer.toml"
    cfg.write_text('[paths]\nwatch = "~/Pictures/inbox"\ndb = "$HOME/state/organizer.db"\n')
    env = {**os.environ, "HOME": str(home)}
    check = run_organizer("config", "check", "--config", str(cfg), "--output=~/people", env=env, cwd=work)
    assert f'"watch": "{home}/Pictures/inbox"' in check.stdout, check.stdout
    assert f'"output": "{home}/people"' in check.stdout and f'"db": "{home}/state/organizer.db"' in check.stdout
    assert f"{home}/Pictures/inbox  [exists]" in check.stderr, check.stderr
    _scan("--config", str(cfg), "--output=~/people", env=env, cwd=work)
    _assert_sorted(home / "people", photos)
    assert (home / "state" / "organizer.db").is_file()
    assert not list(work.iterdir()) and not (tmp_path / "~").exists(), "a literal ~ folder was made"
    bad = tmp_path / "bad.toml"
    bad.write_text('[paths]\nwatch = "$NO_SUCH_VARIABLE_18/inbox"\noutput = "~/people"\n')
    proc = run_organizer("config", "check", "--config", str(bad), check=False, env=env)
    assert proc.returncode == 1 and "$NO_SUCH_VARIABLE_18" in proc.stderr and "not set" in proc.stderr


def test_relative_paths(tmp_path):
    """Relative flags are taken from the current folder, relative paths in a config file from the
    file's folder (a service runs in /)."""
    photos = _photos(tmp_path / "inbox")
    proc = _scan("--watch", "inbox", "--output", "people", cwd=tmp_path)
    assert proc.stdout.startswith("8 photos seen, 8 encoded")
    _assert_sorted(tmp_path / "people", photos)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "c.toml").write_text('[paths]\nwatch = "../inbox"\noutput = "../people"\n')
    check = run_organizer("config", "check", "--config", "conf/c.toml", cwd=tmp_path)
    assert f'"watch": "{tmp_path}/inbox"' in check.stdout and f'"output": "{tmp_path}/people"' in check.stdout
    check = run_organizer("config", "check", "--config", str(conf / "c.toml"), cwd="/")
    assert f'"watch": "{tmp_path}/inbox"' in check.stdout, check.stdout  # not /inbox: from the file's folder


def test_config_check_refuses_a_bad_layout(tmp_path):
    (tmp_path / "people" / "inbox").mkdir(parents=True)
    proc = run_organizer("config", "check", "--watch", str(tmp_path / "people" / "inbox"), "--output",
                         str(tmp_path / "people"), check=False)
    assert proc.returncode == 1 and "inside the output folder" in proc.stderr, proc.stderr


# ---- the service ---------------------------------------------------------------------------------

def _service_config(tmp: Path) -> Path:
    cfg = tmp / "service.toml"
    cfg.write_text("[service]\nsettle_seconds = 0.3\nrescan_interval = 0\nworkers = 1\n")
    return cfg


def _run_and_add_one(tmp_path: Path, watch: Path, output: Path, args: list[str], photos: list[Path], sub: str = "",
                     new_store: bool = True):
    """Start the service, wait for ``photos`` (start-up rescan), drop one more in (events), wait."""
    svc = ServiceProc([*args, "--config", str(_service_config(tmp_path))], tmp_path / "run.log")
    try:
        wait_for(lambda: ("rescan:" in svc.text() and _is_sorted(output, photos)) or not svc.alive, 180,
                 "the start-up rescan to sort the photos")
        assert svc.alive, svc.text()[-3000:]
        late = watch / sub / A / "late.jpg"
        shutil.copy(sorted((DEV / A).iterdir())[5], late)  # (the 5th one is doubtful with only 4 others)
        wait_for(lambda: _is_sorted(output, [late]), 90, "a new photo to be sorted")
        assert folders_holding(output, late) == folders_holding(output, photos[0])
    finally:
        code = svc.stop()
    text = svc.text()
    assert code == 0 and "Traceback" not in text, text[-3000:]
    assert "no longer in the watched folder" not in text and "forgot " not in text
    assert "rescan: 0 photos" not in text
    if new_store:  # the person folders were made by this service, and said so
        assert len(re.findall(r"INFO organizer.output: person folder created: cluster_\d+", text)) == 2, text[-3000:]
    return text


def _is_sorted(output: Path, photos: list[Path]) -> bool:
    index = tree_index(output)
    return all(len(folders_holding(output, p, index)) == 1 for p in photos)


@pytest.mark.parametrize("layout", ["db_beside_watch", "db_in_watch_subfolder", "output_inside_watch"])
def test_service_sorts_every_photo_in_every_layout(tmp_path, layout):
    watch_rel, output_rel, db_rel, sub = LAYOUTS[layout]
    watch, output = tmp_path / watch_rel, tmp_path / output_rel
    photos = _photos(watch, sub)
    args = ["--watch", str(watch), "--output", str(output)] + (["--db", str(tmp_path / db_rel)] if db_rel else [])
    _run_and_add_one(tmp_path, watch, output, args, photos, sub)


def test_service_on_a_store_moved_above_the_watched_folder_forgets_nothing(tmp_path):
    """Item 2 for the service: a store moved beside the inbox used to log "rescan: 0 photos",
    forget every photo and ignore new ones."""
    home = tmp_path / "photos"
    watch, output = home / "inbox", tmp_path / "people"
    photos = _photos(watch)
    _scan("--watch", str(watch), "--output", str(output))
    for f in (output / ".organizer").iterdir():
        shutil.move(f, home / f.name)
    text = _run_and_add_one(tmp_path, watch, output, ["--watch", str(watch), "--output", str(output), "--db",
                                                      str(home / "organizer.db")], photos, new_store=False)
    assert f"rescan: {len(photos)} photos, 0 new" in text, text[-3000:]
