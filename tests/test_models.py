"""The face models: face_recognition's, loaded by hand (encode.FaceModels), give face_recognition's results."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from organizer.encode import MODELS_DIR, DetectionSettings, detect_faces, encode_faces, face_models

from .conftest import DEV


def test_the_saved_face_detector_is_dlibs_built_in_one(tmp_path):
    """encode.FaceModels loads dlib's HOG detector from organizer/models/ (milliseconds instead of
    dlib's 0.6 s of decompressing its built-in copy): it must be that detector, byte for byte as
    dlib saves it. After a dlib upgrade that changes it, save it again:
    ``uv run python -c "import dlib; dlib.get_frontal_face_detector().save('organizer/models/frontal_face_detector.svm')"``"""
    import dlib

    built_in = tmp_path / "built_in.svm"
    dlib.get_frontal_face_detector().save(str(built_in))
    assert (MODELS_DIR / "frontal_face_detector.svm").read_bytes() == built_in.read_bytes()


@pytest.fixture
def face_recognition():
    """face_recognition itself; it turns on decoding of truncated files for the whole process on
    import, which this test process (shared with others) must not keep."""
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # face_recognition_models' pkg_resources notice
            import face_recognition

        yield face_recognition
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated


@pytest.mark.parametrize("landmarks", ["large", "small"])
def test_boxes_and_encodings_are_face_recognitions(face_recognition, landmarks):
    """On dev photos (one where HOG finds no face): the same boxes as face_recognition.face_locations,
    and dlib's raw encodings equal to face_recognition.face_encodings' for them."""
    settings = DetectionSettings(mirror=False, normalize=False, landmarks=landmarks, coarse_side=0,
                                 fallback_margin=0)
    photos = sorted(DEV.glob("*/*_0005.jpg")) + [DEV / "Madonna/train_7.jpg"]  # small: HOG at upsample 1 is slow
    assert len(photos) >= 6
    if landmarks == "small":  # the other landmarks differ only in the predictor's file
        photos = photos[:3]
    faces = 0
    for path in photos:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
        boxes = detect_faces(img, settings)
        assert boxes == face_recognition.face_locations(img, 1), path
        ours = encode_faces(img, boxes, settings)
        theirs = face_recognition.face_encodings(img, boxes, model=landmarks)
        assert len(ours) == len(theirs) == len(boxes)
        for a, b in zip(ours, theirs):
            assert np.allclose(a, b, rtol=0, atol=1e-6), (path, float(np.abs(a - b).max()))
        faces += len(boxes)
    assert faces == len(photos) - (landmarks == "large")


def test_cnn_boxes_are_face_recognitions(face_recognition):
    with Image.open(DEV / "Tony_Blair/Tony_Blair_0005.jpg") as im:
        img = np.asarray(im.convert("RGB"))
    cnn = face_models().locations(img, 0, "cnn")
    assert len(cnn) == 1 and cnn == face_recognition.face_locations(img, 0, model="cnn")
