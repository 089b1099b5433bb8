"""Face crops for the output tree decode only the resolution they need, and show the same pixels
as a crop of the full-size upright photo (EXIF orientation applied)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from organizer.ingest import upright_crop

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
