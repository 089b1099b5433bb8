"""Encodings: unit length, mirror-averaged, and a store made by another encoder is re-encoded in place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from organizer.config import load_config
from organizer.encode import DetectionSettings, EncoderPool, analyze_photo, encoder_id
from organizer.pipeline import Organizer
from organizer.store import ENCODER, Store

from .conftest import DEV

RAW = DetectionSettings(mirror=False, normalize=False)  # dlib's encodings as face_recognition gives them


def _one_face(path, settings):
    r = analyze_photo(path, settings)
    assert r.error is None and len(r.faces) == 1, (path, r)
    return r.faces[0].encoding


@pytest.mark.parametrize("photo", ["Madonna/train_1.jpg", "Mindy_Kaling/train_4.jpg", "Tony_Blair/Tony_Blair_0001.jpg"])
def test_encodings_are_unit_length_and_steadier_under_mirroring(tmp_path, photo):
    """A photo and its mirror image show the same face: with the mirrored average their
    encodings are much closer than dlib's raw encodings of the two (compared at unit length)."""
    src = DEV / photo
    flipped = tmp_path / "flipped.png"
    with Image.open(src) as im:
        ImageOps.mirror(im.convert("RGB")).save(flipped)
    ours = [_one_face(p, DetectionSettings()) for p in (src, flipped)]
    raw = [_one_face(p, RAW) for p in (src, flipped)]
    assert all(abs(np.linalg.norm(e) - 1) < 1e-9 for e in ours)
    assert 1.1 < np.linalg.norm(raw[0]) < 1.8  # dlib's own scale, which normalising removes
    d_ours = float(np.linalg.norm(ours[0] - ours[1]))
    d_raw = float(np.linalg.norm(raw[0] / np.linalg.norm(raw[0]) - raw[1] / np.linalg.norm(raw[1])))
    assert d_ours < 0.75 * d_raw, (d_ours, d_raw)


def _scan(watch, output, detection=None, clustering=None):
    overrides = {"paths.watch": str(watch), "paths.output": str(output), "service.workers": 1}
    overrides.update({f"detection.{k}": v for k, v in (detection or {}).items()})
    overrides.update({f"clustering.{k}": v for k, v in (clustering or {}).items()})
    settings = load_config(None, overrides)
    with Store.open(output / ".organizer" / "organizer.db") as store:
        org = Organizer(settings, store)
        try:
            org.scan()
        finally:
            org.close()
        faces = {}
        for path, fid, _ in store.photos_of_faces():
            f = store.face(fid)
            enc = store.db.execute("select encoding from faces where id=?", [fid]).fetchone()[0]
            faces[fid] = (path, f.cluster_id, f.doubtful, np.frombuffer(enc, dtype=np.float64))
        return faces, store.get_meta(ENCODER)


def test_store_from_an_older_encoder_is_reencoded_in_place(tmp_path):
    """A store whose faces dlib's raw encoder made (an earlier version of organizer) is re-encoded
    at the next start: same face ids, encodings as a fresh scan would make them, people kept
    under their numbers; a photo that cannot be read any more is forgotten, not mis-encoded."""
    watch, output = tmp_path / "photos", tmp_path / "sorted"
    people = ["Colin_Powell", "Hugo_Chavez"]
    for person in people:
        shutil.copytree(DEV / person, watch / person)
    broken = watch / "Hugo_Chavez" / "Hugo_Chavez_0009.jpg"
    # the earlier version: raw encodings, and the clustering settings it had for them
    before, meta = _scan(watch, output, {"mirror": False, "normalize": False},
                         {"eps": 0.58, "linkage_threshold": 0.56, "doubt_margin": 0.05})
    assert meta == encoder_id(RAW)
    assert all(1.1 < np.linalg.norm(e) < 1.8 for *_, e in before.values())
    with Store.open(output / ".organizer" / "organizer.db") as store:  # an earlier version wrote no meta
        store.db.execute("delete from meta where key=?", [ENCODER])
        store.db.conn.commit()
    broken_ids = {f for f, (p, *_) in before.items() if p == str(broken)}
    assert broken_ids
    broken.write_bytes(broken.read_bytes()[:200])  # truncated since: cannot be re-encoded

    after, meta = _scan(watch, output)
    assert meta == encoder_id(DetectionSettings())
    kept = set(before) - broken_ids
    assert kept <= set(after) and not (broken_ids & set(after))
    assert all(abs(np.linalg.norm(after[f][3]) - 1) < 1e-9 for f in after)
    # the encodings are the ones a fresh scan with the new encoder makes
    for f in kept:
        path = after[f][0]
        fresh = analyze_photo(path, DetectionSettings()).faces
        assert min(float(np.linalg.norm(x.encoding - after[f][3])) for x in fresh) < 1e-6, path
    # each person is still one folder, under the number it had
    for person in people:
        old = {before[f][1] for f in kept if f"/{person}/" in before[f][0] and not before[f][2]}
        new = {after[f][1] for f in kept if f"/{person}/" in after[f][0] and not after[f][2]}
        assert len(old) == 1 and new == old, (person, old, new)


def test_reencoding_changes_nothing_when_no_photo_can_be_read(tmp_path):
    """Every photo unreadable at the upgrade (a disk that is not there): nothing is forgotten or
    changed, the error says why, and the upgrade happens once the photos are back."""
    watch, output = tmp_path / "photos", tmp_path / "sorted"
    for p in sorted((DEV / "Colin_Powell").iterdir())[:3]:
        (watch / "x").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, watch / "x" / p.name)
    before, _ = _scan(watch, output, {"mirror": False, "normalize": False})
    saved = {p: p.read_bytes() for p in (watch / "x").iterdir()}
    for p in saved:
        p.write_bytes(b"")  # unreadable for now
    settings = load_config(None, {"paths.watch": str(watch), "paths.output": str(output), "service.workers": 1})
    with Store.open(output / ".organizer" / "organizer.db") as store:
        org = Organizer(settings, store)
        try:
            with pytest.raises(FileNotFoundError, match="cannot read any photo to re-encode"):
                org.recluster()
        finally:
            org.close()
        assert store.get_meta(ENCODER) == encoder_id(RAW)
        kept = {fid: np.frombuffer(e, dtype=np.float64) for fid, e in store.db.execute("select id, encoding from faces")}
    assert set(kept) == set(before) and all(np.array_equal(kept[f], before[f][3]) for f in kept)
    for p, data in saved.items():
        p.write_bytes(data)
    after, meta = _scan(watch, output)
    assert meta == encoder_id(DetectionSettings()) and set(after) == set(before)


def test_interrupted_reencoding_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Re-encoding a big store takes hours: it commits chunk by chunk, stops when asked (a
    service shutdown), and the next start carries on from the last chunk instead of redoing it."""
    import organizer.reencode as reencode
    from organizer.store import REENCODING

    watch, output = tmp_path / "photos", tmp_path / "sorted"
    for p in sorted((DEV / "Tony_Blair").iterdir())[:6]:
        (watch / "x").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, watch / "x" / p.name)
    before, _ = _scan(watch, output, {"mirror": False, "normalize": False})
    monkeypatch.setattr(reencode, "REENCODE_CHUNK", 2)
    settings = load_config(None, {"paths.watch": str(watch), "paths.output": str(output), "service.workers": 0})
    db = output / ".organizer" / "organizer.db"

    def unit(store):
        return {f for f, e in store.db.execute("select id, encoding from faces")
                if abs(np.linalg.norm(np.frombuffer(e, dtype=np.float64)) - 1) < 1e-9}

    with Store.open(db) as store:
        org = Organizer(settings, store)
        asked = iter([False, True])  # one chunk, then a stop request
        assert org.upgrade_encodings(stop=lambda: next(asked)) is False
        assert 2 <= len(unit(store)) < len(before)  # one chunk: two photos' faces
        assert store.get_meta(REENCODING) and store.get_meta(ENCODER) == encoder_id(RAW)
        first = unit(store)
        calls = []
        real = org.encoder.reencode
        monkeypatch.setattr(org.encoder, "reencode", lambda jobs: (calls.append(len(jobs)), real(jobs))[1])
        assert org.upgrade_encodings() is True
        photos = {path for path, *_ in before.values()}
        assert sum(calls) == len(photos) - 2, calls  # the first chunk was not redone
        assert unit(store) == set(before) and first <= unit(store)
        assert store.get_meta(ENCODER) == encoder_id(DetectionSettings()) and store.get_meta(REENCODING) is None
        org.close()


def _analyze_or_die(path, settings):
    """analyze_photo, except that the worker process dies on "boom.jpg" (as a native decoder's
    segfault would kill it)."""
    if Path(path).name == "boom.jpg":
        os._exit(139)
    return analyze_photo(path, settings)


def test_a_worker_that_dies_is_blamed_on_its_photo_only(tmp_path):
    """The pool cannot tell which photo killed a worker: every unanswered photo is retried alone,
    so only the culprit is reported as a crash and every other photo is encoded, once."""
    photos = sorted((DEV / "Jerry_Seinfeld").iterdir())[:5]
    boom = tmp_path / "boom.jpg"
    shutil.copy(photos[0], boom)
    jobs = [(p,) for p in photos] + [(boom,)]
    pool = EncoderPool(DetectionSettings(), workers=2)
    try:
        out = list(pool._run(_analyze_or_die, jobs, lambda job, msg: msg))
    finally:
        pool.close()
    assert sorted(str(job[0]) for job, _ in out) == sorted(str(job[0]) for job in jobs)  # each once
    got = {job[0]: result for job, result in out}
    assert got[boom] == "the decoder crashed on this file"
    for p in photos:
        assert got[p].error is None and len(got[p].faces) == 1, (p, got[p])


@pytest.mark.parametrize("temp_writable", [True, False], ids=["fork server", "no temporary folder: spawn"])
def test_the_pool_encodes_as_the_calling_process_does(temp_writable, monkeypatch, caplog):
    """The workers are forked from a fork server that loaded the models once; without a writable
    temporary folder for its socket they are spawned instead (and say so). Either way they give
    the encodings the calling process gives."""
    import multiprocessing.util

    import psutil

    if not temp_writable:
        def refuse():
            raise PermissionError(30, "Read-only file system")
        monkeypatch.setattr(multiprocessing.util, "get_temp_dir", refuse)
    photos = sorted((DEV / "Jerry_Seinfeld").iterdir())[:2]
    settings = DetectionSettings()
    pool = EncoderPool(settings, workers=2)
    try:
        with caplog.at_level("INFO", logger="organizer.encode"):
            got = {r.path: r for r in pool.map(photos)}
        parents = {psutil.Process(pid).ppid() for pid in pool._pool._processes}
    finally:
        pool.close()
    assert (os.getpid() in parents) is not temp_writable, parents  # spawned: our children; forked: the server's
    assert ("cannot start a fork server" in caplog.text) is not temp_writable
    for p in photos:
        here = analyze_photo(p, settings)
        assert len(got[p].faces) == len(here.faces) == 1
        np.testing.assert_allclose(got[p].faces[0].encoding, here.faces[0].encoding, atol=1e-9)


def test_a_temporary_folder_too_long_for_a_socket_means_spawned_workers(tmp_path):
    """A TMPDIR whose path leaves no room for the fork server's socket name (AF_UNIX paths are
    ~100 characters at most) must not stop the encoders: they are spawned instead, and encode."""
    import subprocess
    import sys

    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    photo = sorted((DEV / "Jerry_Seinfeld").iterdir())[0]
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from organizer.encode import DetectionSettings, EncoderPool\n"
        "pool = EncoderPool(DetectionSettings(), workers=1)\n"
        f"[r] = pool.map([{str(photo)!r}])\n"
        "pool.close()\n"
        "print(len(r.faces), r.error)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(deep)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cannot start a fork server" in run.stderr and "too long" in run.stderr
    assert run.stdout.split() == ["1", "None"]
