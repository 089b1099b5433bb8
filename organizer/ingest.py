"""Ingest: find photo files, hash them, and decode them into detection-ready RGB arrays.

Decoding is where bad input shows up, so every failure becomes an :class:`IngestError` with a
reason a person can read; nothing here ever writes to the original file.
"""

from __future__ import annotations

import hashlib
import logging
import io
import math
import os
import stat
import struct
import warnings
from collections.abc import Iterable, Iterator
from typing import BinaryIO
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .logs import printable

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                            ".heic", ".heif", ".avif"})
# Files that are still being written by a browser, rsync, a download manager or an editor.
PARTIAL_SUFFIXES = frozenset({".part", ".partial", ".crdownload", ".download", ".tmp", ".temp", ".swp"})

# Never decode a truncated file as if it were whole: face_recognition turns this on globally when
# imported, encode.py turns it off again, and we pin it here too.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The decompression-bomb guard is ``max_pixels``, checked in load_for_detection before anything is
# decoded. PIL's own fixed limit (2 x 89 MP, raised inside Image.open) would otherwise refuse a
# 200 MP panorama even when the user raised max_pixels to allow it.
Image.MAX_IMAGE_PIXELS = None
# HEIC/HEIF, what iPhones save by default, through pillow-heif (libheif). It applies the file's
# own rotation (irot/imir) while decoding and reports EXIF orientation 1, so exif_transpose below
# does not turn the photo a second time. AVIF is Pillow's own.
pillow_heif.register_heif_opener()


class IngestError(Exception):
    """A photo that cannot be read; the message is shown to the user as the reason."""


VANISHED = "file disappeared before it could be read"


@dataclass
class Prepared:
    """A decoded photo ready for face detection."""

    pixels: np.ndarray  # H x W x 3, uint8, RGB, EXIF orientation applied, downscaled
    scale: float  # multiply detection coordinates by this to get full-size coordinates
    width: int  # full-size width after EXIF orientation
    height: int  # full-size height after EXIF orientation


def is_candidate(path: Path) -> bool:
    """True when the file name looks like a photo we should process (not hidden, not partial)."""
    name = path.name
    if name.startswith(".") or name.startswith("~"):
        return False
    suffix = path.suffix.lower()
    if suffix in PARTIAL_SUFFIXES:
        return False
    return suffix in IMAGE_SUFFIXES


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    for root in roots:
        try:
            path.relative_to(root)
            return True
        except ValueError:
            continue
    return False


def discover(root: Path, layout=None, unreadable: list[Path] | None = None) -> Iterator[Path]:
    """Yield every photo under ``root`` (recursively, sorted, absolute paths) that is input by
    ``layout``'s rule (:meth:`organizer.layout.Layout.is_input`; without one, every candidate
    photo not in a hidden folder -- only for tools and tests).

    Directory symlinks are not followed (no loops, no escaping the watched tree); folders that
    are not input are not entered. File symlinks are yielded; :func:`check_readable` decides
    whether they may be read. Folders that cannot be listed (permissions, I/O errors) are logged
    and appended to ``unreadable``: their photos are not gone, only out of reach for now.
    """
    root = Path(os.path.abspath(root))
    if layout is None:
        from .layout import Layout

        layout = Layout(root, root / ".organizer", root / ".organizer" / "organizer.db")

    def report(exc: OSError) -> None:
        log.warning("cannot list folder %s: %s (its photos are skipped for now)",
                    printable(exc.filename or "?"), exc.strerror or exc)
        if unreadable is not None and exc.filename:
            unreadable.append(Path(os.fsdecode(exc.filename)))

    if not layout.is_input(root, is_dir=True):
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=report):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if layout.is_input(here / d, is_dir=True))
        for name in sorted(filenames):
            path = here / name
            if layout.is_input(path):
                yield path


def check_readable(path: Path, watch: Path) -> os.stat_result:
    """Stat a candidate, refusing what we must not read. Returns the stat of the target file."""
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        if os.path.islink(path):
            raise IngestError("broken symlink (target missing)") from None
        raise IngestError(VANISHED) from None
    except OSError as exc:  # ELOOP for symlink loops, EACCES, ...
        raise IngestError(f"cannot stat file: {exc.strerror or exc}") from None
    if os.path.islink(path):
        target = Path(os.path.realpath(path))
        if not _inside(target, [Path(os.path.realpath(watch))]):
            raise IngestError(f"symlink points outside the watched folder ({target})")
    if stat.S_ISDIR(st.st_mode):
        raise IngestError("is a directory, not a photo")
    if not stat.S_ISREG(st.st_mode):
        raise IngestError("not a regular file")
    if st.st_size == 0:
        raise IngestError("empty file (0 bytes)")
    return st


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of the file's bytes, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    except FileNotFoundError:
        raise IngestError(VANISHED) from None
    except OSError as exc:
        raise IngestError(f"cannot read file: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited onto white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert('L') clips 16-bit/32-bit values at 255; rescale by the real range instead.
        arr = np.asarray(im, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if top > 255:
            arr = arr * (255.0 / (65535.0 if top <= 65535 else top))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def open_regular(path: Path | BinaryIO) -> BinaryIO:
    """``path`` opened for reading, refusing anything but a regular file. A named pipe (or a
    device) would block every reader forever, and a reader in a worker process may meet one the
    parent never checked (a photo encoded ahead of time, a file swapped since): the open does not
    wait (O_NONBLOCK) and the check is on the opened file itself. A file object is returned as is."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise IngestError(VANISHED) from None
    except OSError as exc:
        raise IngestError(f"cannot open file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IngestError("not a regular file")
    return os.fdopen(fd, "rb")


def load_for_detection(path: Path | BinaryIO, max_side: int, max_pixels: int) -> Prepared:
    """Decode ``path`` (a file name, or a binary file object holding the photo's bytes) to RGB with EXIF orientation applied, downscaled so its longer side <= max_side.

    Refuses images whose declared pixel count exceeds ``max_pixels`` before decoding them
    (decompression bombs), and truncated or unidentifiable files.
    """
    try:
        with warnings.catch_warnings(), open_regular(path) as fh:  # closed once decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # PIL warns (to stderr, outside our log format) about corrupt EXIF blocks; a broken
            # EXIF block is handled below by using the image as stored.
            warnings.simplefilter("ignore", UserWarning)
            im = Image.open(fh)
            im.seek(0)  # first frame of animated GIF/WebP
            w, h = im.size
            if w <= 0 or h <= 0:
                raise IngestError("image has no pixels")
            if w * h > max_pixels:
                raise IngestError(
                    f"image too large: {w}x{h} = {w * h:,} pixels exceeds the limit of "
                    f"{max_pixels:,} (decompression bomb guard, see max_pixels)"
                )
            long_side = max(w, h)
            if im.format == "JPEG" and long_side > max_side:
                # JPEG draft mode decodes at 1/2, 1/4 or 1/8 size directly: much faster and leaner.
                ratio = max_side / long_side
                im.draft("RGB", (max(1, int(w * ratio)), max(1, int(h * ratio))))
            im.load()
            decoded_scale = long_side / max(im.size)
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block must not lose the photo: use it as stored
                pass
            im = _to_rgb(im)
    except IngestError:
        raise
    except Image.DecompressionBombError as exc:
        raise IngestError(f"image too large (decompression bomb guard): {exc}") from None
    except UnidentifiedImageError:
        raise IngestError("not a recognised image format (corrupt or not an image)") from None
    except FileNotFoundError:
        raise IngestError(VANISHED) from None
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or "premature end" in msg.lower():
            raise IngestError(f"truncated or damaged image data ({msg})") from None
        raise IngestError(f"cannot decode image: {exc.strerror or msg}") from None
    except (ValueError, SyntaxError, struct.error, MemoryError) as exc:
        raise IngestError(f"cannot decode image: {exc}") from None

    full_w = round(im.size[0] * decoded_scale)
    full_h = round(im.size[1] * decoded_scale)
    scale = decoded_scale
    if max(im.size) > max_side:
        factor = max_side / max(im.size)
        new_size = (max(1, round(im.size[0] * factor)), max(1, round(im.size[1] * factor)))
        im = im.resize(new_size, Image.Resampling.LANCZOS)
        scale = max(full_w, full_h) / max(new_size)
    pixels = np.ascontiguousarray(np.asarray(im, dtype=np.uint8))
    return Prepared(pixels=pixels, scale=scale, width=full_w, height=full_h)


CROP_MARGIN = 0.35  # extra space around a face box in the output's crops, as a share of its size
CROP_SIZE = 256  # longest side of a face crop (representative.jpg; montage cells are scaled from it)


def crop_region(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The region (left, top, right, bottom) a face crop shows for a face ``box`` (top, right,
    bottom, left): the box with CROP_MARGIN around it."""
    top, right, bottom, left = box
    m = int(max(bottom - top, right - left) * CROP_MARGIN)
    return left - m, top - m, right + m, bottom + m


def frame_crop(frame: Image.Image, region: tuple[int, int, int, int], scale: float) -> Image.Image | None:
    """The crop of ``region`` (full-size pixels) from an already decoded ``frame`` (full size / ``scale``),
    as upright_crop would give it; None when the frame holds fewer pixels there than the crop
    needs (a small face in a downscaled frame: decode the original instead)."""
    left, top, right, bottom = region
    box = (max(0, round(left / scale)), max(0, round(top / scale)),
           min(frame.width, round(right / scale)), min(frame.height, round(bottom / scale)))
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    if scale > 1 and max(box[2] - box[0], box[3] - box[1]) < CROP_SIZE:
        return None
    crop = frame.crop(box)
    crop.thumbnail((CROP_SIZE, CROP_SIZE), Image.Resampling.LANCZOS)
    return crop


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    """``image`` as JPEG file bytes (crops sent between processes, kept in memory or served)."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def open_upright(path: Path, max_pixels: int) -> Image.Image:
    """Full-size RGB image with EXIF orientation applied (degraded copies for `evaluate --perturb`)."""
    return Image.fromarray(load_for_detection(path, 1 << 30, max_pixels).pixels, "RGB")


def upright_crop(path: Path, box: tuple[int, int, int, int], size: int, max_pixels: int) -> Image.Image:
    """The region ``box`` (left, top, right, bottom in upright full-size pixels, clipped to the
    photo) as RGB, scaled down to at most ``size`` on its longer side (face crops in the output).

    Decodes only as much resolution as the crop needs: a JPEG in draft mode at 1/2, 1/4 or 1/8 of
    its size (a face crop of a 12-megapixel photo costs a fraction of a full decode)."""
    left, top, right, bottom = box
    side = 1 << 30
    try:
        with open_regular(path) as fh, Image.open(fh) as im:  # the header only: the stored size (its long side is the upright one's)
            long_side = max(im.size)
        want = long_side * size / max(right - left, bottom - top, 1)
        # the smallest draft scale (1/8 .. 1/1) that still gives the crop ``size`` pixels, and no resize after it
        side = next(math.ceil(long_side / d) for d in (8, 4, 2, 1) if long_side / d >= want or d == 1)
    except Exception:  # noqa: BLE001 - load_for_detection below gives the reason a person can read
        pass
    prep = load_for_detection(path, side, max_pixels)
    s = prep.scale
    im = Image.fromarray(prep.pixels, "RGB")
    crop = im.crop((max(0, round(left / s)), max(0, round(top / s)),
                    min(im.width, round(right / s)), min(im.height, round(bottom / s))))
    crop.thumbnail((size, size), Image.Resampling.LANCZOS)
    return crop
