"""Coarse-to-fine detection: a large frame is searched on a small copy first, and fully only when
that can miss faces (none found, or a small one found).

Real faces from tune/ and dev/, pasted onto real texture (benchmarks/phone_photos.py): a phone-sized
photo with one large face, and a group canvas with six faces of 40-80 px, on which the coarse
search alone finds nothing and the full search must still run.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from organizer import encode
from organizer.encode import DetectionSettings, _overlaps, analyze_photo, detect_faces, encoder_id, reencode_photo
from organizer.ingest import Frame, load_for_detection

from .conftest import DEV, NO_FACES, ROOT, SHARED

sys.path.insert(0, str(ROOT / "benchmarks"))
from phone_photos import phone_set, single_face_sources, small_face_set, texture_paths  # noqa: E402

TUNE = SHARED / "tune"
DEFAULT = DetectionSettings()
FULL = replace(DEFAULT, coarse_side=0)  # the full search alone


@pytest.fixture(scope="module")
def sources():
    people = ["Jiang_Zemin", "Gerry_Adams", "George_Clooney", "Gerald_Ford", "Frank_Zappa", "Fred_Durst"]
    return single_face_sources(TUNE, [q for p in people for q in sorted((TUNE / p).iterdir())[:2]])


@pytest.fixture
def full_searches(monkeypatch):
    calls = []
    real = encode._full_search

    def spy(fr, img, settings):
        calls.append(img.shape)
        return real(fr, img, settings)

    monkeypatch.setattr(encode, "_full_search", spy)
    return calls


def _frame(path: Path) -> Frame:
    return load_for_detection(path, DEFAULT.max_side, DEFAULT.max_pixels).frame


def test_group_of_small_faces_loses_none(sources, tmp_path, full_searches):
    assert len(sources) >= 6
    [group] = small_face_set(sources, texture_paths(NO_FACES), tmp_path, 1)
    img = _frame(group.path)
    full_searches.clear()
    full = detect_faces(img, FULL)
    ours = detect_faces(img, DEFAULT)
    assert len(full_searches) == 2  # the coarse search found no face: the full search ran
    found = lambda boxes: sum(any(_overlaps(p, b) for b in boxes) for p in group.boxes)  # noqa: E731
    assert found(full) >= 5  # the pasted faces are real, findable faces
    assert found(ours) >= found(full)
    assert len(ours) >= len(full)


def test_phone_photo_needs_only_the_coarse_search(tmp_path, full_searches):
    photos = [DEV / "Barack_Obama" / "obama.jpg", DEV / "Madonna" / sorted(p.name for p in (DEV / "Madonna").iterdir())[0]]
    srcs = single_face_sources(DEV, photos)
    assert srcs
    [phone] = phone_set(srcs, texture_paths(NO_FACES), tmp_path, 1)
    img = _frame(phone.path)
    assert max(img.shape[:2]) == DEFAULT.max_side
    full_searches.clear()  # (finding the face in its source photo used it)
    ours = detect_faces(img, DEFAULT)
    assert full_searches == []  # a large face: the small copy answered
    assert len(ours) == 1
    full = detect_faces(img, FULL)
    assert len(full) == 1 and _overlaps(ours[0], full[0]) and _overlaps(full[0], ours[0])


def test_same_box_same_encoding(tmp_path):
    """A coarse box is encoded on the same detection frame as any other: re-encoding that box
    gives the same vector, so the encoder id need not change."""
    srcs = single_face_sources(DEV, [DEV / "Barack_Obama" / "obama.jpg"])
    [phone] = phone_set(srcs, texture_paths(NO_FACES), tmp_path, 1)
    result = analyze_photo(phone.path, DEFAULT)
    assert len(result.faces) == 1
    f = result.faces[0]
    encs, err = reencode_photo(phone.path, [(f.top, f.right, f.bottom, f.left)], DEFAULT)
    assert err is None
    np.testing.assert_allclose(encs[0], f.encoding, atol=1e-6)
    assert encoder_id(DEFAULT) == encoder_id(FULL)


def test_frames_no_larger_than_the_coarse_side_are_searched_as_before(full_searches):
    small = [img for img in map(_frame, sorted(DEV.glob("*/*"))[::4]) if max(img.shape[:2]) <= DEFAULT.coarse_side]
    assert len(small) >= 5
    for img in small:
        full_searches.clear()
        ours = detect_faces(img, DEFAULT)
        assert len(full_searches) == 1
        assert ours == detect_faces(img, FULL)
