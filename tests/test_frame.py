"""The detection frame is resampled only where it is looked at (ingest.Frame): the coarse search's
small copy, and each face's surroundings for its encoding and crop. Those regions must hold the
very pixels of the whole frame, so a face's encoding is the same whether it was computed on its
region or on the whole frame (the encoder id did not change with this).

Phone-sized photos (benchmarks/phone_photos.py: dev/ faces pasted on real texture at 4000x3000,
some stored sideways with an EXIF rotation), whose frames are resampled 2000 -> 1600 px."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest

from organizer.encode import DetectionSettings, analyze_photo, detect_faces, encode_faces
from organizer.ingest import Frame, load_for_detection

from .conftest import DEV, NO_FACES, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from phone_photos import phone_set, single_face_sources, texture_paths  # noqa: E402

DEFAULT = DetectionSettings()


@pytest.fixture(scope="module")
def phones(tmp_path_factory):
    people = ["Barack_Obama", "Madonna", "Elton_John", "Mindy_Kaling", "Hugo_Chavez", "Colin_Powell"]
    srcs = single_face_sources(DEV, [sorted((DEV / p).iterdir())[0] for p in people])
    assert len(srcs) >= 5
    return phone_set(srcs, texture_paths(NO_FACES), tmp_path_factory.mktemp("phones"), len(srcs))


def _fresh(path) -> Frame:
    return load_for_detection(path, DEFAULT.max_side, DEFAULT.max_pixels).frame


def test_regions_hold_the_whole_frames_pixels(phones):
    rng = random.Random(5)
    for phone in phones[:3]:
        frame = _fresh(phone.path)
        regions = []
        for _ in range(20):
            left, top = rng.randrange(-50, frame.width), rng.randrange(-50, frame.height)
            rect = (left, top, left + rng.randrange(1, 700), top + rng.randrange(1, 700))
            regions.append((rect, frame.region(*rect).copy()))
        whole = frame.whole()
        assert max(whole.shape[:2]) == DEFAULT.max_side and whole.shape != frame._image.size[::-1] + (3,)
        for (left, top, right, bottom), pixels in regions:
            expected = whole[max(0, top) : max(0, bottom), max(0, left) : max(0, right)]
            assert pixels.shape == expected.shape
            assert np.array_equal(pixels, expected), (phone.path.name, left, top, right, bottom)


def test_a_face_is_encoded_as_on_the_whole_frame(phones):
    """analyze_photo encodes and crops each face on its region; the whole frame gives the same."""
    for phone in phones:
        result = analyze_photo(phone.path, DEFAULT)
        assert len(result.faces) == 1, phone.path.name
        frame = _fresh(phone.path)
        whole = frame.whole()
        boxes = detect_faces(_fresh(phone.path), DEFAULT)
        assert len(boxes) == 1
        [on_whole] = encode_faces(whole, boxes, DEFAULT)
        assert np.array_equal(result.faces[0].encoding, on_whole), phone.path.name


def test_a_face_near_the_edge_reads_only_what_the_frame_has(phones):
    """Boxes cut by the frame's edge, and boxes reaching far: the encoding is still the whole
    frame's (a face whose chip reaches beyond its region is encoded on the whole frame)."""
    frame = _fresh(phones[0].path)
    w, h = frame.width, frame.height
    boxes = [(0, 300, 260, 40), (h - 200, w, h, w - 220), (10, w - 10, h - 10, 10), (500, 700, 560, 640)]
    got = encode_faces(frame, boxes, DEFAULT)
    want = encode_faces(frame.whole(), boxes, DEFAULT)
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("decoded, size", [((2016, 1512), (1600, 1200)),  # a 4032x3024 phone photo at 1/2
                                           ((1944, 2592), (1200, 1600)),  # a 3888x5184 camera photo at 1/2
                                           ((1731, 1299), (1600, 1201))])  # no alignment: the whole frame
def test_regions_are_exact_whatever_the_sizes(phones, decoded, size):
    from PIL import Image

    image = Image.open(phones[0].path).convert("RGB").resize(decoded, Image.Resampling.BILINEAR)
    rng = random.Random(11)
    frame = Frame(image, size)
    rects = []
    for _ in range(25):
        left, top = rng.randrange(0, size[0] - 10), rng.randrange(0, size[1] - 10)
        rects.append((left, top, left + rng.randrange(1, 500), top + rng.randrange(1, 500)))
    got = [frame.region(*r).copy() for r in rects]
    whole = np.asarray(image.resize(size, Image.Resampling.LANCZOS))
    for (left, top, right, bottom), pixels in zip(rects, got):
        assert np.array_equal(pixels, whole[top:bottom, left:right]), (left, top, right, bottom)
