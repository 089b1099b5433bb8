"""Bad input: every odd file a real photo folder holds, fed to the running service.

The corpus (tests/badfiles.py) sits next to real photos of two people. The service must keep
running, record every unusable file with a reason `organizer status` shows, still sort every
valid photo, and find the faces in the valid-but-unusual images (all eight EXIF orientations,
CMYK, 16-bit, palette with transparency, animated GIF, broken EXIF, odd file names) and put
each in the folder of the person it shows.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .badfiles import (
    ServiceProc,
    folders_holding,
    identical_copies,
    make_corpus,
    non_utf8_name,
    permission_dropper,
    status_json,
    tree_index,
    wait_for,
)
from .conftest import DEV, run_organizer, tree_hashes

A, B = "Colin_Powell", "Tony_Blair"  # both sorted 9/9 into one folder in the dev set


def _config(tmp: Path, **service) -> Path:
    values = {"settle_seconds": 0.5, "rescan_interval": 0, "workers": 2, **service}
    cfg = tmp / "config.toml"
    cfg.write_text("[service]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in values.items()))
    return cfg


def _backdate(root: Path, seconds: float = 3600) -> None:
    """Make every entry under ``root`` an hour old: the start-up corpus was already there. A file
    written moments ago that reads as incomplete is held as a copy still in progress (README, slow
    copies), so the start-up scan would not count it yet."""
    t = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (t, t), follow_symlinks=False)


def _person_folder(output: Path, originals: list[Path], copies: dict | None = None) -> str:
    """The folder holding most of a person's original photos (and it must hold nearly all)."""
    counts = Counter(f for p in originals for f in folders_holding(output, p, copies=copies))
    assert counts, f"none of {originals[0].parent.name}'s photos were sorted"
    folder, n = counts.most_common(1)[0]
    assert n >= len(originals) - 1, f"{originals[0].parent.name} is spread over {dict(counts)}"
    return folder


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """The service over people/ + corpus/ (found at start-up), then live/ dropped in while running."""
    root = tmp_path_factory.mktemp("bad_input")
    watch, output = root / "photos", root / "sorted"
    for person in (A, B):
        shutil.copytree(DEV / person, watch / "people" / person)
    a = sorted((watch / "people" / A).iterdir())
    b = sorted((watch / "people" / B).iterdir())
    cases = make_corpus(watch / "corpus", a[:9], b[:4], root / "outside")
    odd = [non_utf8_name(watch / "corpus", b[5].read_bytes())]  # a name that is not UTF-8
    _backdate(watch)
    originals = tree_hashes(watch)
    outside = tree_hashes(root / "outside")
    expected = sum(1 for c in cases if c.expect != "folder") + len(a) + len(b) + 1

    svc = ServiceProc(["--watch", str(watch), "--output", str(output), "--config", str(_config(root))],
                      root / "service.log")
    try:
        wait_for(lambda: (output / ".organizer" / "organizer.db").exists() and "rescan:" in svc.text(), 180,
                 "the start-up scan")
        assert svc.alive, svc.text()[-3000:]
        first = status_json(output)
        assert first["photos"] == expected, (first["photos"], expected)

        # the same kinds of file again, arriving while it runs: a folder moved in (watcher, not rescan)
        staging = root / "staging"
        live_cases = make_corpus(staging, a[:9], b[:4], root / "outside2", seed=7)
        os.rename(staging, watch / "live")
        for c in live_cases:
            c.path = watch / "live" / c.path.relative_to(staging)
        odd.append(non_utf8_name(watch / "live", b[6].read_bytes()))  # a file event of its own
        live_originals = tree_hashes(watch / "live")
        live_expected = expected + sum(1 for c in live_cases if c.expect != "folder") + 1
        wait_for(lambda: status_json(output)["photos"] == live_expected, 180, "the photos dropped in while running")
        # the last batch is clustered and linked before it is counted as done: wait for the tree
        # (the animated GIF is made with the corpus's seed: no other file has its bytes)
        wait_for(lambda: folders_holding(output, watch / "live" / "animated.gif"), 60, "the live photos' links")
        assert svc.alive, svc.text()[-3000:]
        status = status_json(output)
        text = run_organizer("status", "--errors", "100", "--output", str(output)).stdout
        few = status_json(output, errors=3)
    finally:
        code = svc.stop()
    log = svc.text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log
    # identical files (the live corpus repeats most of the first; odd names copy b's photos) are
    # linked once per folder: a photo counts as sorted when one of its identical copies is linked
    copies = identical_copies(watch)
    return dict(root=root, watch=watch, output=output, cases=cases + live_cases, a=a, b=b, odd=odd, status=status,
                copies=copies,
                text=text, few=few, log=log, originals=originals, live_originals=live_originals, outside=outside)


def test_service_survives_and_records_every_bad_file(bad_run):
    status, cases = bad_run["status"], bad_run["cases"]
    errors = {e["path"]: e["error"] for e in status["last_errors"]}
    failed = [c for c in cases if c.expect == "failed"]
    assert status["failed"] == len(failed) == len(errors), sorted(errors)
    for c in failed:
        assert str(c.path) in errors, f"{c.name}: no failure recorded for {c.path}"
        assert re.search(c.reason, errors[str(c.path)]), f"{c.name}: reason {errors[str(c.path)]!r}"
        # the plain-text `status` shows path and reason too
        assert f"{c.path}: {errors[str(c.path)]}" in bad_run["text"], c.name
    # valid images are never failures
    for c in cases:
        if c.expect in ("face", "no_faces"):
            assert str(c.path) not in errors, f"{c.name}: {errors.get(str(c.path))}"
    # --errors N limits the list
    assert len(bad_run["few"]["last_errors"]) == 3
    assert bad_run["few"]["failed"] == status["failed"]
    # a faceless image is counted as such (two 1x1 images per corpus)
    assert status["photos_without_faces"] == sum(1 for c in cases if c.expect == "no_faces")


def test_valid_photos_around_bad_files_are_sorted(bad_run):
    output, a, b, copies = bad_run["output"], bad_run["a"], bad_run["b"], bad_run["copies"]
    fa, fb = _person_folder(output, a, copies), _person_folder(output, b, copies)
    assert fa != fb
    for p in a:
        assert folders_holding(output, p, copies=copies) == {fa}, p.name
    for p in b:
        assert folders_holding(output, p, copies=copies) == {fb}, p.name
    for p in bad_run["odd"]:  # names that are not UTF-8, found at start-up and by the watcher
        assert folders_holding(output, p, copies=copies) == {fb}, p
    # identical files: one link per folder, whatever the number of names
    index = tree_index(output)
    for p, same in copies.items():
        linked = [q for q in same if index.get((os.stat(q).st_dev, os.stat(q).st_ino))]
        assert len(linked) <= 1, linked


@pytest.mark.parametrize("kind", ["orientation_1", "orientation_2", "orientation_3", "orientation_4",
                                  "orientation_5", "orientation_6", "orientation_7", "orientation_8",
                                  "cmyk", "gray16", "rgb16", "palette_transparent", "animated_gif",
                                  "broken_exif", "heic_turned", "avif", "unicode_name", "spaces_name", "newline_name",
                                  "inside_dir_named_jpg"])
def test_unusual_image_found_and_sorted_with_its_person(bad_run, kind):
    output, copies = bad_run["output"], bad_run["copies"]
    person = {p: A for p in bad_run["a"]} | {p: B for p in bad_run["b"]}
    folder = {A: _person_folder(output, bad_run["a"], copies), B: _person_folder(output, bad_run["b"], copies)}
    found = [c for c in bad_run["cases"] if c.name == kind]
    assert len(found) == 2  # once found at start-up, once arriving while running
    for c in found:
        assert folders_holding(output, c.path, copies=copies) == {folder[person[c.source]]}, (
            f"{c.path} should be in {folder[person[c.source]]} with the other photos of {person[c.source]}")


def test_rotated_copies_hide_the_face_unless_orientation_is_applied(bad_run):
    """Guards the orientation test itself: the stored pixels of a turned copy show no upright
    face, so the face is only found because the organizer applies the EXIF orientation."""
    from organizer.encode import face_models

    models = face_models()
    corpus = bad_run["watch"] / "corpus"
    for o in (3, 5, 6, 7, 8):
        with Image.open(corpus / f"orientation_{o}.jpg") as im:
            raw = np.asarray(im.convert("RGB"))
        assert models.locations(raw, 1) == [], f"orientation {o}: face visible unrotated"
    with Image.open(corpus / "orientation_1.jpg") as im:
        assert len(models.locations(np.asarray(im.convert("RGB")), 1)) == 1


def test_bad_input_changes_no_original_and_nothing_outside(bad_run):
    now = tree_hashes(bad_run["watch"])
    assert {k: v for k, v in now.items() if not k.startswith("live/")} == bad_run["originals"]
    assert tree_hashes(bad_run["watch"] / "live") == bad_run["live_originals"]
    assert tree_hashes(bad_run["root"] / "outside") == bad_run["outside"]
    # the escaping symlink was refused: its target is linked nowhere
    target = bad_run["root"] / "outside" / "private.jpg"
    assert not folders_holding(bad_run["output"], target)
    # the FIFO was never opened for reading (it would have blocked the service)
    assert "pipe.jpg" in bad_run["log"] and "not a regular file" in bad_run["log"]


def test_unreadable_file_is_recorded_with_reason(tmp_path):
    """A photo without read permission: recorded as failed (permission denied), the rest sorted.

    The tests run as root, which reads anything; the scan runs with root's permission override
    capabilities dropped (see badfiles.drop_file_override), so mode 000 means unreadable again.
    """
    preexec, why = permission_dropper(tmp_path)
    if preexec is None:
        pytest.skip(why)
    watch, output = tmp_path / "photos", tmp_path / "sorted"
    shutil.copytree(DEV / A, watch / A)
    secret = watch / "secret.jpg"
    shutil.copy(sorted((DEV / B).iterdir())[0], secret)
    secret.chmod(0)
    closed = watch / "closed"  # a folder it may not list
    closed.mkdir()
    shutil.copy(sorted((DEV / B).iterdir())[1], closed / "inside.jpg")
    closed.chmod(0)
    try:
        originals = tree_hashes(watch / A)
        proc = run_organizer("scan", "--watch", str(watch), "--output", str(output), preexec_fn=preexec)
        errors = {e["path"]: e["error"] for e in status_json(output)["last_errors"]}
        assert "permission denied" in errors.get(str(secret), "").lower(), errors
        assert "closed" in proc.stderr and "permission denied" in proc.stderr.lower(), proc.stderr[-2000:]
        a = sorted((watch / A).iterdir())
        folder = _person_folder(output, a)
        assert all(folders_holding(output, p) == {folder} for p in a)
        assert tree_hashes(watch / A) == originals
    finally:
        secret.chmod(0o644)
        closed.chmod(0o755)


def test_file_deleted_between_discovery_and_decoding(tmp_path, monkeypatch):
    """The photo vanishes after it was listed (and hashed) but before it is decoded."""
    from organizer import encode
    from organizer.config import load_config
    from organizer.pipeline import Organizer
    from organizer.store import Store

    watch, output = tmp_path / "photos", tmp_path / "sorted"
    shutil.copytree(DEV / A, watch / A)
    doomed = watch / "doomed.jpg"
    shutil.copy(sorted((DEV / B).iterdir())[0], doomed)
    real = encode.load_for_detection

    def vanish_first(path, *args, **kw):
        if Path(path) == doomed and doomed.exists():
            doomed.unlink()
        return real(path, *args, **kw)

    monkeypatch.setattr(encode, "load_for_detection", vanish_first)
    settings = load_config(None, {"paths.watch": str(watch), "paths.output": str(output)})
    with Store.open(settings.db_path) as store:
        org = Organizer(settings, store, workers=1)
        org.encoder.workers = 0  # encode in this process, so the patch applies
        try:
            report = org.scan()
            assert report.failed == 1 and not doomed.exists()
            assert store.error_of(str(doomed)) == "file disappeared before it could be read"
            a = sorted((watch / A).iterdir())
            folder = _person_folder(output, a)
            assert all(folders_holding(output, p) == {folder} for p in a)
            # the next pass forgets it: no phantom entry stays in the store
            org.scan()
            assert store.error_of(str(doomed)) is None
            assert status_json(output)["failed"] == 0
        finally:
            org.close()


def test_odd_file_names_are_sorted_and_forgotten(tmp_path):
    """A file name that is not valid UTF-8 (Latin-1 from an old camera or archive) is sorted like
    any other: the store keeps such a path as its raw bytes. It is found again without being
    re-encoded, shown readably by `status`, and forgotten (its link removed) when it goes.
    Names holding "|" (the separator of a face crop's source) get their representative crop."""
    watch, output = tmp_path / "photos", tmp_path / "sorted"
    a = sorted((DEV / A).iterdir())
    (watch / A).mkdir(parents=True)
    for p in a[1:5]:
        shutil.copy(p, watch / A / f"a|{p.name}")
    odd = non_utf8_name(watch / A, a[0].read_bytes())
    broken = Path(os.fsdecode(os.path.join(os.fsencode(watch), b"d\xe9fekt.jpg")))
    broken.write_bytes(a[1].read_bytes()[:3000])  # truncated: a failure, recorded under its name
    (tmp_path / "outside").mkdir()
    elsewhere = non_utf8_name(tmp_path / "outside", a[5].read_bytes())
    (watch / "link.jpg").symlink_to(elsewhere)  # refused; the reason names the odd target
    proc = run_organizer("scan", "--watch", str(watch), "--output", str(output))
    assert "Traceback" not in proc.stderr
    assert "/caf\\xe9.jpg: 1 face" in proc.stderr and "\\udc" not in proc.stderr  # logged readably
    folder = _person_folder(output, sorted((watch / A).iterdir()))
    assert folders_holding(output, odd) == {folder}
    assert (output / folder / "representative.jpg").stat().st_size > 0
    status = run_organizer("status", "--output", str(output)).stdout
    assert "d\\xe9fekt.jpg: " in status, status
    errors = {e["path"]: e["error"] for e in status_json(output)["last_errors"]}
    assert sorted(errors) == [str(watch) + "/d\\xe9fekt.jpg", str(watch / "link.jpg")]
    assert "outside/caf\\xe9.jpg" in errors[str(watch / "link.jpg")]

    again = run_organizer("scan", "--watch", str(watch), "--output", str(output)).stdout
    assert again.startswith("7 photos seen, 0 encoded"), again  # the stored name matched the file
    link = next((output / folder).glob("caf*.jpg"))
    odd.unlink()
    broken.unlink()
    (watch / "link.jpg").unlink()
    gone = run_organizer("scan", "--watch", str(watch), "--output", str(output)).stdout
    assert "3 removed" in gone, gone
    assert not os.path.lexists(link)
    assert status_json(output)["failed"] == 0


def test_pixel_limit_is_max_pixels_not_pils_own(tmp_path):
    """The decompression-bomb guard is the configured max_pixels, checked before decoding. PIL's
    own fixed limit (179 MP, raised inside Image.open) used to answer first, so raising max_pixels
    for big panoramas had no effect and the reason did not name the setting."""
    from organizer.ingest import IngestError, load_for_detection

    from .badfiles import decompression_bomb

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(decompression_bomb())  # declares 200000 x 200000
    with pytest.raises(IngestError, match=r"200000x200000 = .* exceeds the limit of 100,000,000 .*max_pixels"):
        load_for_detection(bomb, 1600, 100_000_000)
    with pytest.raises(IngestError, match=r"exceeds the limit of 30,000,000,000 "):
        load_for_detection(bomb, 1600, 30_000_000_000)  # above PIL's limit, still below the bomb
