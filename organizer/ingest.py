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

# Never decode a truncated file as if it were whole (face_recognition, if anything imports it,
# turns this on for the whole process; encode.py loads its models without importing it).
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


# The largest alignment (frame pixels) a region may need to hold the whole frame's exact pixels:
# beyond it (an odd ratio between the decoded and the frame size) the whole frame is made instead.
MAX_REGION_STEP = 64


class Frame:
    """A photo's detection frame (its longer side at most max_side), resampled from the decoded
    image only where it is looked at.

    The coarse search needs a small copy of it and the encoder each face's surroundings;
    resampling those regions alone costs a fraction of the whole frame. A region holds the very
    pixels the whole frame has there (tests/test_frame.py), as Pillow makes them: the horizontal
    pass, then the vertical one, each with the whole image's filter windows. For the weights to
    be the same, a region starts and ends where frame and decoded pixels line up (a multiple of
    :meth:`_step`); where they never do within MAX_REGION_STEP, the whole frame is made. The whole
    frame is made once, when asked for (the full search), and then serves the regions too."""

    def __init__(self, image: Image.Image, size: tuple[int, int]):
        self._image = image  # RGB, upright, at the decoded (draft) size
        self.width, self.height = size
        self._whole = np.asarray(image, dtype=np.uint8) if image.size == size else None
        self._regions: list[tuple[tuple[int, int, int, int], np.ndarray]] = []  # made so far
        self._steps = (self._step(image.width, self.width), self._step(image.height, self.height))

    @classmethod
    def of(cls, pixels: Frame | np.ndarray) -> Frame:
        """``pixels`` as a frame: itself, or a frame already made (H x W x 3 RGB pixels)."""
        if isinstance(pixels, Frame):
            return pixels
        return cls(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB"), pixels.shape[1::-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    @staticmethod
    def _step(src: int, out: int) -> int:
        """The least number of frame pixels that spans a whole number of decoded pixels."""
        return out // math.gcd(src, out)

    def whole(self) -> np.ndarray:
        """All of the frame, H x W x 3 uint8 RGB."""
        if self._whole is None:
            im = self._image.resize((self.width, self.height), Image.Resampling.LANCZOS)
            self._whole = np.asarray(im, dtype=np.uint8)
        return self._whole

    def region(self, left: int, top: int, right: int, bottom: int) -> np.ndarray:
        """The frame's pixels [top:bottom, left:right], clipped to the frame."""
        left, top = max(0, left), max(0, top)
        right, bottom = max(left, min(self.width, right)), max(top, min(self.height, bottom))
        if self._whole is None and max(self._steps) > MAX_REGION_STEP:
            self.whole()
        if self._whole is not None:
            return self._whole[top:bottom, left:right]
        for (l0, t0, r0, b0), pixels in self._regions:  # a face's crop lies in its encoder's region
            if l0 <= left and t0 <= top and right <= r0 and bottom <= b0:
                return pixels[top - t0 : bottom - t0, left - l0 : right - l0]
        if right == left or bottom == top:
            return np.zeros((bottom - top, right - left, 3), np.uint8)
        sx, sy = self._steps
        l0, t0 = left // sx * sx, top // sy * sy
        r0, b0 = min(self.width, -(-right // sx) * sx), min(self.height, -(-bottom // sy) * sy)
        pixels = self._resample(l0, t0, r0, b0)
        self._regions.append(((l0, t0, r0, b0), pixels))
        return pixels[top - t0 : bottom - t0, left - l0 : right - l0]

    def _resample(self, left: int, top: int, right: int, bottom: int) -> np.ndarray:
        """Pillow's two passes for the frame rectangle (aligned to the steps), on the decoded rows
        its vertical filter reaches (their span: LANCZOS's 3 lobes, scaled, plus 2 to spare)."""
        (W, H), (w, h) = self._image.size, (self.width, self.height)
        reach = 3 * max(H / h, 1.0) + 2
        first, last = max(0, int(top * H / h - reach)), min(H, math.ceil(bottom * H / h + reach))
        band = self._image.crop((0, first, W, last))  # all columns: the horizontal pass's own edges
        # (box ends are whole decoded pixels: the steps make left * W / w and the others integers)
        rows = band.resize((right - left, last - first), Image.Resampling.LANCZOS,
                           box=(left * W // w, 0, right * W // w, last - first))
        out = rows.resize((right - left, bottom - top), Image.Resampling.LANCZOS,
                          box=(0, top * H // h - first, right - left, bottom * H // h - first))
        return np.asarray(out, dtype=np.uint8)

    def scaled(self, size: tuple[int, int]) -> np.ndarray:
        """A small copy of the whole frame, ``size`` (width, height): a box filter by a whole
        factor first (much cheaper than resampling), then bilinear to the exact size."""
        small = Image.fromarray(self._whole, "RGB") if self._whole is not None else self._image
        step = max(small.size) // max(size)
        if step >= 2:
            small = small.reduce(step)
        if small.size != size:
            small = small.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(small, dtype=np.uint8)


@dataclass
class Prepared:
    """A decoded photo ready for face detection."""

    frame: Frame  # RGB, EXIF orientation applied, downscaled
    scale: float  # multiply detection coordinates by this to get full-size coordinates
    width: int  # full-size width after EXIF orientation
    height: int  # full-size height after EXIF orientation

    @property
    def pixels(self) -> np.ndarray:
        """The whole frame, H x W x 3 uint8."""
        return self.frame.whole()


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
    size = im.size
    if max(im.size) > max_side:
        factor = max_side / max(im.size)
        size = (max(1, round(im.size[0] * factor)), max(1, round(im.size[1] * factor)))
        scale = max(full_w, full_h) / max(size)
    return Prepared(frame=Frame(im, size), scale=scale, width=full_w, height=full_h)


CROP_MARGIN = 0.35  # extra space around a face box in the output's crops, as a share of its size
CROP_SIZE = 256  # longest side of a face crop (representative.jpg; montage cells are scaled from it)


def crop_region(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The region (left, top, right, bottom) a face crop shows for a face ``box`` (top, right,
    bottom, left): the box with CROP_MARGIN around it."""
    top, right, bottom, left = box
    m = int(max(bottom - top, right - left) * CROP_MARGIN)
    return left - m, top - m, right + m, bottom + m


def frame_crop(frame: Frame, region: tuple[int, int, int, int], scale: float) -> Image.Image | None:
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
    crop = Image.fromarray(np.ascontiguousarray(frame.region(*box)), "RGB")
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
