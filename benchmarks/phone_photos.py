"""Synthetic photo sets for the speed benchmarks, built from the labelled sets in ../shared/faces.

* :func:`phone_set`: phone-sized photos, one labelled face each. A canvas of 4000x3000 or
  3000x4000 pixels filled with a real texture (a no_faces photo, mirrored and scaled up to cover
  it), the region around a face of a labelled photo pasted in at phone-portrait size (the face
  ~25% of the short side), saved as a quality-90 JPEG; every fourth photo is stored sideways with
  an EXIF orientation (6 or 8), as phones do.
* :func:`small_face_set`: group-photo-like canvases (1600x1200, the detection frame itself) with
  several faces pasted at 40-80 px each, every face from another labelled photo; the set on which
  detection must find as many faces as before.

Faces are located in their source photos once with the full detector (the pipeline's defaults),
so the paste can be scaled by face size; photos where it finds no face or several are skipped.
Everything is written under the given folder; the sources are only read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from organizer.encode import DetectionSettings, detect_faces
from organizer.ingest import load_for_detection


@dataclass(frozen=True)
class Source:
    path: Path
    person: str
    box: tuple[int, int, int, int]  # top, right, bottom, left in the source photo's pixels


def single_face_sources(root: Path, photos: list[Path] | None = None) -> list[Source]:
    """Photos of ``root/<person>/`` (or just ``photos``, each in its person's folder) in which the
    default detector finds exactly one face >= 40 px."""
    settings = DetectionSettings()
    out = []
    for path in photos if photos is not None else sorted(root.glob("*/*")):
        prep = load_for_detection(path, settings.max_side, settings.max_pixels)
        boxes = detect_faces(prep.pixels, settings)
        if len(boxes) != 1:
            continue
        t, r, b, l = (round(v * prep.scale) for v in boxes[0])
        if min(b - t, r - l) >= 40:
            out.append(Source(path, path.parent.name, (t, r, b, l)))
    return out


def _texture(path: Path, size: tuple[int, int]) -> Image.Image:
    """A no_faces photo tiled with its mirror images (no seams) and scaled to cover ``size``."""
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = im.size
    tile = Image.new("RGB", (2 * w, 2 * h))
    tile.paste(im, (0, 0))
    tile.paste(ImageOps.mirror(im), (w, 0))
    tile.paste(ImageOps.flip(im), (0, h))
    tile.paste(ImageOps.flip(ImageOps.mirror(im)), (w, h))
    f = max(size[0] / tile.width, size[1] / tile.height)
    tile = tile.resize((max(size[0], round(tile.width * f)), max(size[1], round(tile.height * f))),
                       Image.Resampling.BICUBIC)
    return tile.crop((0, 0, *size))


@dataclass(frozen=True)
class Photo:
    path: Path
    person: str
    boxes: tuple[tuple[int, int, int, int], ...]  # the pasted faces, upright full-size pixels (t, r, b, l)


def _face_region(src: Source, face_px: int, margin: float) -> tuple[Image.Image, tuple[float, float, float]]:
    """The source photo around its face (``margin`` face sides each side), scaled so the face is
    ``face_px``; also (x, y, side) of the face's box in the region."""
    im = ImageOps.exif_transpose(Image.open(src.path)).convert("RGB")
    t, r, b, l = src.box
    side = max(b - t, r - l)
    m = side * margin
    region = im.crop((max(0, round(l - m)), max(0, round(t - m)), min(im.width, round(r + m)), min(im.height, round(b + m))))
    f = face_px / side
    x0, y0 = max(0, round(l - m)), max(0, round(t - m))
    scaled = region.resize((max(1, round(region.width * f)), max(1, round(region.height * f))), Image.Resampling.BICUBIC)
    return scaled, ((l - x0) * f, (t - y0) * f, (r - l) * f, (b - t) * f)


def _pasted(x: int, y: int, at: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    fx, fy, fw, fh = at
    return (round(y + fy), round(x + fx + fw), round(y + fy + fh), round(x + fx))


def _save(canvas: Image.Image, dst: Path, orientation: int) -> None:
    """q90 JPEG; ``orientation`` 6 or 8 stores the pixels sideways with the EXIF tag that turns them back."""
    exif = Image.Exif()
    if orientation == 6:  # viewer turns it 90 degrees clockwise: store it turned counter-clockwise
        canvas = canvas.transpose(Image.Transpose.ROTATE_90)
    elif orientation == 8:
        canvas = canvas.transpose(Image.Transpose.ROTATE_270)
    if orientation != 1:
        exif[0x0112] = orientation
    dst.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(dst, "JPEG", quality=90, exif=exif.tobytes())


def phone_set(sources: list[Source], textures: list[Path], dst: Path, count: int, seed: int = 17,
              per_person: int = 3) -> list[Photo]:
    """``count`` phone photos under ``dst/<person>/``, people taken in turn; at most count // per_person
    people, so that each has ``per_person`` photos or more (a person needs three to get a folder)."""
    rng = random.Random(seed)
    by_person: dict[str, list[Source]] = {}
    for s in sources:
        by_person.setdefault(s.person, []).append(s)
    people = sorted(by_person)[: max(1, count // per_person)]
    out = []
    for i in range(count):
        person = people[i % len(people)]
        src = by_person[person][(i // len(people)) % len(by_person[person])]
        size = (4000, 3000) if i % 2 == 0 else (3000, 4000)
        canvas = _texture(textures[i % len(textures)], size)
        face, at = _face_region(src, round(min(size) * rng.uniform(0.22, 0.30)), margin=0.6)
        x = rng.randint(0, max(0, size[0] - face.width))
        y = rng.randint(0, max(0, size[1] - face.height))
        canvas.paste(face, (x, y))
        path = dst / person / f"phone_{i:04d}.jpg"
        _save(canvas, path, (6, 8)[(i // 4) % 2] if i % 4 == 3 else 1)
        out.append(Photo(path, person, (_pasted(x, y, at),)))
    return out


def small_face_set(sources: list[Source], textures: list[Path], dst: Path, count: int, faces_per_photo: int = 6,
                   seed: int = 18) -> list[Photo]:
    """``count`` 1600x1200 canvases with ``faces_per_photo`` faces of 40-80 px each, on a grid so they
    do not overlap (``person`` is empty: the faces are of several people)."""
    rng = random.Random(seed)
    pool = list(sources)
    rng.shuffle(pool)
    cols, rows = 3, 2
    cell_w, cell_h = 1600 // cols, 1200 // rows
    n = 0
    out = []
    for i in range(count):
        canvas = _texture(textures[i % len(textures)], (1600, 1200))
        boxes = []
        for j in range(min(faces_per_photo, cols * rows)):
            src = pool[n % len(pool)]
            face, at = _face_region(src, rng.randint(40, 80), margin=0.5)
            x = (j % cols) * cell_w + rng.randint(0, cell_w - face.width)
            y = (j // cols) * cell_h + rng.randint(0, cell_h - face.height)
            canvas.paste(face, (x, y))
            boxes.append(_pasted(x, y, at))
            n += 1
        path = dst / f"group_{i:03d}.jpg"
        _save(canvas, path, 1)
        out.append(Photo(path, "", tuple(boxes)))
    return out


def texture_paths(no_faces: Path) -> list[Path]:
    return sorted(p for p in no_faces.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def upright_pixels(path: Path) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
