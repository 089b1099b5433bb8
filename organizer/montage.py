"""Montages: ``montage.jpg`` in each person folder, a contact sheet of up to 5x5 of the person's
face crops, most central first (closest to the mean of the person's confident faces), so a wrong
face stands out at a glance; and one in ``doubtful/``, the newest doubtful faces, each captioned
with its nearest person.

A montage is an output entry like the others (kind ``montage`` in the manifest): its source lists
the faces it shows, so it is made again exactly when that list changes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MONTAGE = "montage.jpg"
KIND = "montage"
GRID = 5  # at most GRID x GRID faces
CELL = 128  # pixels per face
CAPTION = 18  # pixels under a face for its caption (doubtful/ only)
BACKGROUND = (240, 240, 240)

# Member set digest -> the faces chosen for it. Choosing needs the members' encodings; a person
# whose members did not change since the last tree update is not read again (the service updates
# the tree after every batch). Exact: a face's encoding never changes under the same id.
_CHOSEN: "OrderedDict[bytes, list[int]]" = OrderedDict()
_CHOSEN_MAX = 4096


def most_central(store, members: list[int], k: int = GRID * GRID) -> list[int]:
    """The ``k`` members closest to the members' mean encoding, closest first (ties: lower id)."""
    members = sorted(members)
    key = hashlib.blake2b(np.asarray(members, dtype=np.int64).tobytes(), digest_size=16).digest()
    chosen = _CHOSEN.get(key)
    if chosen is None:
        got = store.faces_by_id(members)
        ids, enc = got.ids, got.encodings
        d = np.linalg.norm(enc - enc.mean(axis=0), axis=1) if len(ids) else np.zeros(0)
        chosen = [int(ids[i]) for i in np.lexsort((ids, d))[:k]]
        _CHOSEN[key] = chosen
        if len(_CHOSEN) > _CHOSEN_MAX:
            _CHOSEN.popitem(last=False)
    else:
        _CHOSEN.move_to_end(key)
    return chosen


def _cell(face, path: str, caption: str | None) -> list:
    return [face.id, path, [face.top, face.right, face.bottom, face.left], caption]


def entries(store, faces: dict, folder: dict[int, str], path_of: dict[int, str], shown: set[str],
            doubtful: str) -> dict[str, tuple[str, str]]:
    """relpath -> (KIND, source) for the montage of every folder in ``shown``.

    ``faces``: face id -> Face; ``folder``: cluster id -> folder name; ``path_of``: face id -> a
    path of its photo (the one its crop or link uses)."""
    members: dict[int, list[int]] = {}
    unsure: list[int] = []
    for f in faces.values():
        if f.id not in path_of:
            continue
        if f.cluster_id is not None and not f.doubtful and f.cluster_id in folder:
            members.setdefault(f.cluster_id, []).append(f.id)
        elif f.doubtful:
            unsure.append(f.id)
    out: dict[str, tuple[str, str]] = {}
    for cid, ids in members.items():
        if folder[cid] in shown:
            cells = [_cell(faces[i], path_of[i], None) for i in most_central(store, ids)]
            out[f"{folder[cid]}/{MONTAGE}"] = (KIND, json.dumps(cells))
    if unsure and doubtful in shown:
        newest = sorted(unsure, reverse=True)[: GRID * GRID]
        cells = [_cell(faces[i], path_of[i], "nearest: " + folder.get(faces[i].nearest_cluster, "nobody"))
                 for i in newest]
        out[f"{doubtful}/{MONTAGE}"] = (KIND, json.dumps(cells))
    return out


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def render(source: str, max_pixels: int) -> Image.Image:
    """The contact sheet a montage entry's source describes. A photo that cannot be read leaves
    its cell blank; if none can, the error of the first is raised."""
    from .ingest import IngestError
    from .output import face_crop

    cells = json.loads(source)
    captions = any(c[3] is not None for c in cells)
    cols = min(GRID, len(cells)) or 1
    rows = math.ceil(len(cells) / cols) or 1
    cell_h = CELL + (CAPTION if captions else 0)
    sheet = Image.new("RGB", (cols * CELL, rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    first_error: Exception | None = None
    placed = 0
    for n, (_face_id, path, box, caption) in enumerate(cells):
        x, y = (n % cols) * CELL, (n // cols) * cell_h
        try:
            crop = face_crop(Path(path), tuple(box), max_pixels, CELL)
        except (OSError, IngestError) as exc:
            first_error = first_error or exc
            continue
        sheet.paste(crop, (x + (CELL - crop.width) // 2, y + (CELL - crop.height) // 2))
        placed += 1
        if caption is not None:
            draw.text((x + 2, y + CELL + 2), _fit_text(draw, caption, font, CELL), fill=(0, 0, 0), font=font)
    if not placed and first_error is not None:
        raise first_error
    return sheet
