"""Detection fallback: on a photo where HOG finds no face, its near-misses are checked by the CNN
detector on a crop, and kept only if it agrees.

Real photos: tune/ faces HOG misses at its usual threshold (turned/tilted; found by the fallback),
no_faces/ photos where HOG has near-misses on coins and rocket parts (which the CNN must reject),
and ordinary photos, whose boxes must not change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from organizer import encode
from organizer.config import ConfigError, load_config
from organizer.encode import DetectionSettings, analyze_photo, detect_faces
from organizer.ingest import load_for_detection

from .conftest import NO_FACES, SHARED

TUNE = SHARED / "tune"
OFF = DetectionSettings(fallback_margin=0)
ON = DetectionSettings()  # the defaults


def _pixels(path: Path) -> np.ndarray:
    return load_for_detection(path, ON.max_side, ON.max_pixels).pixels


@pytest.fixture
def cnn_checks(monkeypatch):
    """Record every CNN check the fallback makes (and its answer)."""
    calls: list[bool] = []
    real = encode._cnn_confirms

    def spy(fr, img, rect):
        ok = real(fr, img, rect)
        calls.append(ok)
        return ok

    monkeypatch.setattr(encode, "_cnn_confirms", spy)
    return calls


def test_defaults_enable_the_fallback():
    assert load_config(None).detection.fallback_margin == 0.5
    assert load_config(None).detection_settings().fallback_margin == 0.5
    with pytest.raises(ConfigError, match="detection.fallback_margin"):
        load_config(None, {"detection.fallback_margin": -0.1})


@pytest.mark.parametrize("photo", ["Yasser_Arafat/Yasser_Arafat_0004.jpg", "Jelena_Dokic/Jelena_Dokic_0004.jpg"])
def test_turned_face_missed_by_hog_is_found(photo, cnn_checks):
    img = _pixels(TUNE / photo)
    assert detect_faces(img, OFF) == []  # HOG at its usual threshold misses it
    assert cnn_checks == []
    boxes = detect_faces(img, ON)
    assert len(boxes) == 1 and cnn_checks[-1] is True
    top, right, bottom, left = boxes[0]
    h, w = img.shape[:2]
    # the labelled person's face: large and central in these LFW crops
    assert min(bottom - top, right - left) >= 50
    assert abs((left + right) / 2 - w / 2) < w / 8 and abs((top + bottom) / 2 - h / 2) < h / 6


def test_found_face_is_encoded_as_its_person():
    """The rescued face's encoding is nearer that person's other photos than other people's."""
    rescued = analyze_photo(TUNE / "Yasser_Arafat/Yasser_Arafat_0004.jpg", ON)
    assert len(rescued.faces) == 1
    enc = rescued.faces[0].encoding

    def nearest(folder: str) -> float:
        encs = [f.encoding for p in sorted((TUNE / folder).iterdir())[:3] for f in analyze_photo(p, ON).faces
                if f.size >= 40]
        return min(float(np.linalg.norm(e - enc)) for e in encs)

    own = nearest("Yasser_Arafat")
    others = [nearest(n) for n in ("Joschka_Fischer", "Jiang_Zemin", "Hamid_Karzai")]
    assert own < 0.36, own  # within eps (unit encodings)
    assert own + 0.035 < min(others), (own, others)


@pytest.mark.parametrize("photo", ["skimage_coins.png", "skimage_rocket.jpg", "cats.jpg"])
def test_near_misses_without_a_face_are_rejected(photo, cnn_checks):
    img = _pixels(NO_FACES / photo)
    assert detect_faces(img, ON) == []
    # HOG did have near-misses here, so the CNN really was asked (at most 3 per photo), and said no
    assert 1 <= len(cnn_checks) <= encode.FALLBACK_CANDIDATES
    assert not any(cnn_checks)


def test_no_face_set_stays_empty():
    for path in sorted(NO_FACES.iterdir()):
        assert analyze_photo(path, ON).faces == [], path.name


def test_photos_with_faces_are_unchanged(cnn_checks):
    """The fallback only runs where HOG found nothing: elsewhere the boxes are HOG's own."""
    photos = [p for d in sorted(TUNE.iterdir())[:6] if d.is_dir() for p in sorted(d.iterdir())[:2]]
    for path in photos:
        img = _pixels(path)
        off = detect_faces(img, OFF)
        assert off, path.name
        assert [tuple(b) for b in detect_faces(img, ON)] == [tuple(b) for b in off], path.name
    assert cnn_checks == []
