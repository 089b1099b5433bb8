"""Which files are read: discovery rules, duplicates, the output folder inside the watched one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from organizer.evaluate import photo_key, tree_assignment
from organizer.ingest import discover, is_candidate, load_for_detection
from organizer.layout import Layout

from .conftest import DEV, run_organizer, tree_hashes


def test_candidate_names():
    for name in ["a.jpg", "b.JPEG", "c.Png", "d.webp", "e.bmp", "f.tif", "g.TIFF", "h.gif", "IMG_1.HEIC", "j.heif", "k.avif"]:
        assert is_candidate(Path(name)), name
    for name in [".hidden.jpg", "a.jpg.part", "b.crdownload", "c.txt", "d.heic.tmp", "~lock.jpg", "noext"]:
        assert not is_candidate(Path(name)), name


def test_discover_skips_hidden_dirs_and_excluded(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".trash").mkdir()
    (tmp_path / "out").mkdir()
    for p in ["a/1.jpg", "a/b/2.PNG", ".trash/3.jpg", "out/4.jpg", "a/.5.jpg", "a/6.txt"]:
        (tmp_path / p).write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")  # directory symlink loop: not followed
    found = [p.relative_to(tmp_path).as_posix() for p in discover(tmp_path, Layout(tmp_path, tmp_path / "out", tmp_path / "out" / ".organizer" / "o.db"))]
    assert found == ["a/1.jpg", "a/b/2.PNG"]


def test_downscale_maps_boxes_back(tmp_path):
    src = sorted((DEV / "Madonna").iterdir())[0]
    prepared = load_for_detection(src, max_side=300, max_pixels=10**9)
    assert max(prepared.pixels.shape[:2]) <= 300
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        w, h = ImageOps.exif_transpose(im).size
    assert (prepared.width, prepared.height) == (w, h)
    assert abs(prepared.scale - max(w, h) / max(prepared.pixels.shape[:2])) < 0.02


def test_duplicates_encoded_once_and_output_inside_watch(tmp_path):
    watch = tmp_path / "photos"
    shutil.copytree(DEV / "Vladimir_Putin", watch / "putin")
    first = sorted((watch / "putin").iterdir())[0]
    shutil.copy(first, watch / "copy of first.jpg")  # identical bytes under another name
    output = watch / "sorted"  # output inside the watched folder: must never be read as input
    originals = tree_hashes(watch)
    proc = run_organizer("scan", "--watch", str(watch), "--output", str(output))
    encoded = [l for l in proc.stderr.splitlines() if "encoded " in l]
    assert len(encoded) == 9, "the copy must not be encoded again"
    assert "1 duplicates" in proc.stdout
    assigned = tree_assignment(output)
    # identical files: one link per folder, under the first name in path order ("copy of ..." <
    # "putin/...")
    folders = assigned[photo_key(watch / "copy of first.jpg")]
    assert folders and photo_key(first) not in assigned
    # a second scan sees the output tree inside the watched folder but does not ingest it
    proc = run_organizer("scan", "--watch", str(watch), "--output", str(output))
    assert "10 photos seen, 0 encoded" in proc.stdout
    assert tree_hashes(watch / "putin") == {k[len("putin/"):]: v for k, v in originals.items() if k.startswith("putin/")}


def test_changed_photo_is_reencoded(tmp_path):
    watch = tmp_path / "photos"
    shutil.copytree(DEV / "Hugo_Chavez", watch / "h")
    shutil.copytree(DEV / "Madonna", watch / "m")
    output = tmp_path / "out"
    run_organizer("scan", "--watch", str(watch), "--output", str(output))
    target = sorted((watch / "h").iterdir())[0]
    chavez_folders = tree_assignment(output)[photo_key(target)]
    madonna = sorted((watch / "m").iterdir())
    madonna_folders = set().union(*(tree_assignment(output).get(photo_key(p), set()) for p in madonna))
    # the user overwrites a Chávez photo with a Madonna photo under the same name
    data = madonna[1].read_bytes()
    target.unlink()
    target.write_bytes(data)
    proc = run_organizer("scan", "--watch", str(watch), "--output", str(output))
    assert "1 encoded" in proc.stdout or "1 duplicates" in proc.stdout
    now = tree_assignment(output).get(photo_key(target), set())
    assert not (now & chavez_folders)
    assert now <= madonna_folders
