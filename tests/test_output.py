"""The output tree's two kinds of update: the full one (scans, start, periodic rescan) checks every
entry on disk; the per-batch one trusts what the manifest records as made and only acts on what
changed. Both must leave the same tree."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from organizer.output import TMP_NAME, reconcile
from organizer.store import Store


def _entries(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".organizer" not in p.parts}


def _copy_store(dev_library, tmp_path: Path) -> Path:
    """The session's scanned store, copied, with an empty output manifest (a tree not made yet)."""
    db = tmp_path / "organizer.db"
    src = sqlite3.connect(f"file:{dev_library.db}?mode=ro", uri=True)
    dst = sqlite3.connect(db)
    src.backup(dst)
    dst.execute("delete from output_entries")
    dst.commit()
    src.close()
    dst.close()
    return db


def test_per_batch_update_acts_on_changes_and_trusts_the_rest(dev_library, tmp_path):
    out = tmp_path / "sorted"
    with Store.open(_copy_store(dev_library, tmp_path)) as store:
        made = reconcile(store, out)
        tree = _entries(out)
        assert made.created == len(tree) and made.errors == []
        person = next(p for p in sorted(out.iterdir()) if p.name.startswith("cluster_"))
        links = sorted(p for p in person.iterdir() if p.name not in ("representative.jpg", "montage.jpg"))
        assert len(links) >= 3

        # a link deleted by hand: the per-batch pass trusts the manifest, a full pass puts it back
        links[0].unlink()
        assert reconcile(store, out, verify=False).created == 0 and not links[0].exists()
        assert reconcile(store, out).created == 1 and links[0].exists()

        # a photo forgotten: its link goes at once
        source = os.readlink(links[1]) if links[1].is_symlink() else next(
            path for path, _, _ in store.photos_of_faces() if os.path.samefile(path, links[1]))
        store.remove_photos([source])
        assert reconcile(store, out, verify=False).removed >= 1 and not links[1].exists()

        # a person named: the folder moves, with the same link names
        cid = int(person.name.removeprefix("cluster_"))
        store.set_cluster_name(cid, "Somebody")
        names_before = {p.name for p in person.iterdir()}
        reconcile(store, out, verify=False)
        assert not person.exists()
        assert {p.name for p in (out / "Somebody").iterdir()} == names_before

        # the tree the per-batch passes left is the one a full update from scratch makes
        fresh = tmp_path / "fresh"
        store.db.execute("delete from output_entries")
        reconcile(store, fresh)
        assert _entries(out) == _entries(fresh)


def test_person_names_are_checked(tmp_path):
    from organizer.output import validate_person_name

    from .conftest import run_organizer

    assert validate_person_name("Ann/Bob\\ x") == "Ann_Bob_ x"
    assert validate_person_name("..hidden") == "hidden"
    for reserved in ("doubtful", "cluster_12"):
        with pytest.raises(ValueError, match="reserved"):
            validate_person_name(reserved)
    # bytes that are not UTF-8 (a terminal set to Latin-1): a usage error, not a traceback
    proc = run_organizer("name", "1", os.fsdecode(b"Ren\xe9"), "--output", str(tmp_path), check=False)
    assert proc.returncode == 2 and "not valid UTF-8" in proc.stderr and "Traceback" not in proc.stderr


def test_names_made_from_long_names_fit_the_file_system(tmp_path):
    """File names are limited to 255 bytes (and a letter like é takes two). A long photo name
    must still get its face crop, and a long person name its folder, including the temporary
    name a crop is first written to."""
    from organizer.output import NAME_MAX, _unique, safe_name, validate_person_name

    from .conftest import DEV, run_organizer

    assert len(os.fsencode(safe_name("日" * 200))) <= NAME_MAX
    assert len(os.fsencode(_unique("a" * 246 + ".jpg", {"a" * 246 + ".jpg"}))) <= NAME_MAX
    assert validate_person_name("Ann") == "Ann"

    watch, output = tmp_path / "photos", tmp_path / "sorted"
    watch.mkdir()
    long_name = "é" * 120 + "x.jpg"  # 245 bytes: a valid name, but "<stem>_face1_nearest_nobody.jpg" is not
    shutil.copy(sorted((DEV / "Colin_Powell").iterdir())[0], watch / long_name)
    proc = run_organizer("scan", "--watch", str(watch), "--output", str(output))
    assert "ERROR" not in proc.stderr, proc.stderr[-2000:]
    crops = list((output / "doubtful" / "faces").iterdir())  # one photo of a person: doubtful
    assert len(crops) == 1 and crops[0].name.endswith("_face1_nearest_nobody.jpg")
    assert (output / "doubtful" / long_name).exists()


def test_a_full_update_removes_the_temporary_a_killed_writer_left(dev_library, tmp_path):
    """A crop is written under TMP_NAME in its folder, then renamed; kill -9 between the two leaves
    it. The next full update removes it (also from a folder whose entries have gone since), and
    nothing else of what people put there."""
    out = tmp_path / "sorted"
    with Store.open(_copy_store(dev_library, tmp_path)) as store:
        reconcile(store, out)
        person = next(p for p in sorted(out.iterdir()) if p.name.startswith("cluster_"))
        theirs = [person / ".notes.tmp", person / "mine.txt"]
        gone = out / "cluster_999"  # a person folder emptied since, but for the leftover
        gone.mkdir()
        left = [person / TMP_NAME, out / "doubtful" / "faces" / TMP_NAME, gone / TMP_NAME, out / TMP_NAME]
        for p in theirs + left:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"\xff\xd8 half a crop")
        reconcile(store, out, verify=False)
        assert all(p.exists() for p in left)  # the per-batch update trusts the tree
        reconcile(store, out)
        assert not any(p.exists() for p in left)
        assert all(p.exists() for p in theirs)


@pytest.mark.parametrize("name", ["representative.jpg", "montage.jpg"])
def test_a_users_file_given_a_deleted_entrys_inode_is_left_alone(dev_library, tmp_path, name):
    """A representative or montage has an inode of its own: deleted by the user, its number is free,
    and the next file made (here, the user's own photo) often gets it. That file is not the entry,
    moved, or still in its place: the edit reading and the tree update leave it alone."""
    from organizer.tree_edits import TreeEdits

    from .conftest import DEV

    photo = sorted((DEV / "Colin_Powell").iterdir())[0]
    out = tmp_path / "sorted"
    with Store.open(_copy_store(dev_library, tmp_path)) as store:
        reconcile(store, out)
        person = next(p for p in sorted(out.iterdir()) if p.name.startswith("cluster_"))
        made = person / name

        def replace(theirs: Path) -> None:
            theirs.parent.mkdir(exist_ok=True)
            ino = made.stat().st_ino
            made.unlink()
            shutil.copy2(photo, theirs)  # a JPEG, as the organizer's own files are
            if theirs.stat().st_ino != ino:
                pytest.skip("this file system did not give the freed inode to the next file")

        # in a folder of the user's: not the entry moved there (it is made again in its place)
        theirs = out / "Holidays" / "beach.jpg"
        replace(theirs)
        TreeEdits(store, out).interpret()
        reconcile(store, out)
        assert theirs.read_bytes() == photo.read_bytes() and made.exists()

        # in its place: the user's file, kept when the person's folder moves (renamed)
        replace(made)
        TreeEdits(store, out).interpret()
        reconcile(store, out)
        store.set_cluster_name(int(person.name.removeprefix("cluster_")), "Somebody")
        reconcile(store, out, verify=False)
        reconcile(store, out)
        assert made.read_bytes() == photo.read_bytes()
        assert (out / "Somebody" / name).exists()
        assert theirs.read_bytes() == photo.read_bytes()
