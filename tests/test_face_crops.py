"""Face crops for the output tree decode only the resolution they need, and show the same pixels
as a crop of the full-size upright photo (EXIF orientation applied)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from organizer import output
from organizer.encode import DetectionSettings, analyze_photo
from organizer.ingest import CROP_SIZE, Frame, crop_region, frame_crop, upright_crop

from .conftest import DEV


def _sideways_phone_photo(tmp_path):
    src = ImageOps.exif_transpose(Image.open(DEV / "Barack_Obama" / "obama.jpg")).convert("RGB")
    upright = src.resize((3000, 4000), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees clockwise
    path = tmp_path / "sideways.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path, upright


def test_crop_matches_the_full_size_upright_photo(tmp_path):
    path, upright = _sideways_phone_photo(tmp_path)
    box = (900, 700, 2100, 2300)  # left, top, right, bottom
    crop = upright_crop(path, box, 256, 10**9)
    assert max(crop.size) == 256
    ref = upright.crop(box)
    ref.thumbnail((256, 256), Image.Resampling.LANCZOS)
    assert crop.size == ref.size
    diff = np.abs(np.asarray(crop, dtype=float) - np.asarray(ref, dtype=float)).mean()
    assert diff < 6  # JPEG and the reduced decode; a wrong turn or offset differs by tens


def test_crop_is_clipped_to_the_photo(tmp_path):
    path, upright = _sideways_phone_photo(tmp_path)
    crop = upright_crop(path, (-200, -200, 400, 600), 256, 10**9)
    w, h = crop.size
    assert abs(w / h - 400 / 600) < 0.02


def _pixels(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=float)


def test_the_encoder_sends_the_crop_so_the_writer_decodes_nothing(tmp_path, monkeypatch):
    """The encoder cuts each face's output crop from the frame it decoded; with it, the writer
    makes representatives and montage cells without decoding the original again, until the file
    is replaced."""
    path, _ = _sideways_phone_photo(tmp_path)
    [face] = analyze_photo(path, DetectionSettings()).faces
    box = (face.top, face.right, face.bottom, face.left)
    sent = Image.open(io.BytesIO(face.crop))
    decoded = upright_crop(path, crop_region(box), CROP_SIZE, 10**9)
    assert max(sent.size) == CROP_SIZE
    assert all(abs(a - b) <= 1 for a, b in zip(sent.size, decoded.size))  # two roundings of the same region
    same = _pixels(sent.resize(decoded.size, Image.Resampling.BILINEAR)) - _pixels(decoded)
    assert np.abs(same).mean() < 6  # the same face, turned the same way; a wrong turn differs by tens

    decodes = []
    monkeypatch.setattr(output, "upright_crop", lambda *a: decodes.append(a) or decoded)
    output.CROPS.receive(path, [face])
    assert max(output.face_crop(path, box, 10**9).size) == CROP_SIZE
    assert max(output.face_crop(path, box, 10**9, size=128).size) == 128  # a montage cell
    assert decodes == []
    Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, "JPEG", quality=80)  # replaced
    output.face_crop(path, box, 10**9)
    assert len(decodes) == 1


def test_no_crop_from_a_frame_with_too_few_pixels_for_it():
    frame = Frame(Image.new("RGB", (1600, 1200), (90, 90, 90)), (1600, 1200))
    region = (1000, 1000, 1400, 1400)  # 400 px of the full-size photo, 160 px of a frame at 1/2.5
    assert frame_crop(frame, region, 2.5) is None  # the original has more: the writer decodes it
    assert frame_crop(frame, region, 1.0).size == (256, 128)  # the frame is the photo: nothing better
    assert frame_crop(frame, (5000, 0, 6000, 100), 2.5) is None  # outside the photo
