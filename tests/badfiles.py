"""Generator of the bad-input corpus: every kind of file a real photo folder ends up holding.

Each case says what the organizer must do with it:

- ``failed``: recorded in the store with a reason matching ``reason`` (shown by `organizer status`);
- ``no_faces``: a valid image without a face: counted, linked nowhere, not a failure;
- ``face``: a valid but unusual image made from a real photo of one person: its face must be
  found and sorted into that person's folder;
- ``folder``: not a file at all (a directory named like an image): walked as a folder.

Run it by hand to look at the files:
``python -m tests.badfiles OUTDIR A1..A7 B1..B4`` (7 photos of one person, 4 of another).
"""

from __future__ import annotations

import ctypes
import io
import json
import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# PIL's exif_transpose method for each EXIF orientation, and the inverse we apply to the pixels so
# that only a reader applying the orientation sees the photo upright.
ORIENTATION_INVERSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # stored turned left; orientation 6 says "rotate 90 cw to view"
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass
class Case:
    name: str  # short id of the case
    path: Path  # where it lives (may be a symlink, a FIFO or a directory)
    expect: str  # "failed", "no_faces", "face" or "folder"
    reason: str = ""  # regex the recorded reason must match (expect == "failed")
    source: Path | None = None  # the real photo a "face" case was made from


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, nor lie about the size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw_rows, 9))
        + _png_chunk(b"IEND", b"")
    )


def decompression_bomb(width: int = 200_000, height: int = 200_000) -> bytes:
    """A tiny PNG declaring a huge grayscale image (a few rows of data: decoding it would need
    width*height bytes of memory before noticing)."""
    return png_bytes(width, height, 8, 0, b"\x00" * (width + 1) * 4)


def rgb16_png(im: Image.Image) -> bytes:
    arr = np.asarray(im.convert("RGB"), dtype=np.uint16) * 257  # full 16-bit range
    h, w, _ = arr.shape
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return png_bytes(w, h, 16, 2, rows)


def gray16_png(im: Image.Image, path: Path) -> None:
    arr = np.asarray(im.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(arr).save(path, "PNG")  # uint16 -> mode I;16
    with Image.open(path) as check:
        assert check.mode.startswith("I"), check.mode  # really 16-bit, not silently 8-bit


def palette_transparent_png(im: Image.Image, path: Path, border: int = 40) -> None:
    """Palette image (255 colours) inside a transparent border (palette index 255)."""
    face = im.convert("RGB").quantize(colors=255)
    canvas = Image.new("P", (im.width + 2 * border, im.height + 2 * border), 255)
    palette = face.getpalette()[: 255 * 3] + [0, 0, 0]
    canvas.putpalette(palette)
    canvas.paste(face, (border, border))
    canvas.save(path, "PNG", transparency=255)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info


def animated_gif(im: Image.Image, path: Path, seed: int = 0) -> None:
    """Three frames: the face first, then noise and black."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (im.height, im.width, 3), dtype=np.uint8), "RGB")
    black = Image.new("RGB", im.size, (0, 0, 0))
    im.convert("RGB").save(path, "GIF", save_all=True, append_images=[noise, black], duration=300, loop=0)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3


def cmyk_jpeg(im: Image.Image, path: Path) -> None:
    im.convert("RGB").convert("CMYK").save(path, "JPEG", quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"


def oriented_jpeg(im: Image.Image, orientation: int, path: Path) -> None:
    """The photo stored turned/flipped, with the EXIF Orientation that turns it back upright."""
    inverse = ORIENTATION_INVERSE[orientation]
    stored = im.convert("RGB") if inverse is None else im.convert("RGB").transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as check:  # the generator checks itself: applied, it is upright again
        assert check.getexif().get(0x0112) == orientation
        upright = np.asarray(ImageOps.exif_transpose(check), dtype=np.float64)
    assert upright.shape[:2] == (im.height, im.width)
    assert np.abs(upright - np.asarray(im.convert("RGB"), dtype=np.float64)).mean() < 8


def broken_exif_jpeg(jpeg: bytes) -> bytes:
    """A JPEG whose APP1 Exif block claims 65535 IFD entries and an orientation it cannot hold."""
    payload = (
        b"Exif\x00\x00II*\x00"
        + struct.pack("<I", 8)
        + struct.pack("<H", 0xFFFF)
        + struct.pack("<HHII", 0x0112, 3, 1, 0xFFFF_FFF0)  # orientation, pointing past the end
        + b"\x12\x01\x03\x00" * 3
    )
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + segment + jpeg[2:]


def _jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def make_corpus(dest: Path, a: list[Path], b: list[Path], outside: Path, seed: int = 6) -> list[Case]:
    """Write the corpus into ``dest`` (a folder inside the watched tree).

    ``a``: at least 9 real photos of one person (the unusual-format cases, each from its own photo;
    the eight orientations all from a[0]); ``b``: at least 4 photos of another person (the odd
    file names, and a photo inside a folder named like an image); ``outside``: a folder outside
    the watched tree (target of the escaping symlink). Returns the cases.
    """
    if len(a) < 9 or len(b) < 4:
        raise ValueError("make_corpus needs 9 photos of one person and 4 of another")
    rng = random.Random(seed)
    dest.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name, filename, expect, reason="", source=None) -> Path:
        p = dest / filename
        cases.append(Case(name, p, expect, reason, source))
        return p

    real = a[0].read_bytes()
    # --- not images, or not whole ones
    add("zero_bytes", "zero.jpg", "failed", r"empty file").write_bytes(b"")
    add("truncated", "truncated.jpg", "failed", r"truncated").write_bytes(real[: len(real) // 2])
    add("random_bytes", "random.jpg", "failed", r"not a recognised image").write_bytes(
        bytes(rng.randrange(256) for _ in range(20_000))
    )
    add("text_as_png", "notes.png", "failed", r"not a recognised image").write_text(
        "shopping list: milk, eggs, bread\n" * 20
    )
    add("png_bomb", "bomb.png", "failed", r"too large").write_bytes(decompression_bomb())
    add("png_over_limit", "over_limit.png", "failed", r"too large").write_bytes(decompression_bomb(12_000, 10_000))
    # --- not regular files, or not ours to read
    loop_a, loop_b = dest / "loop_a.jpg", dest / "loop_b.jpg"
    os.symlink(loop_b.name, loop_a)
    os.symlink(loop_a.name, loop_b)
    cases.append(Case("symlink_loop", loop_a, "failed", r"symbolic links"))
    cases.append(Case("symlink_loop_2", loop_b, "failed", r"symbolic links"))
    os.symlink("does_not_exist.jpg", add("broken_symlink", "dangling.jpg", "failed", r"broken symlink"))
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "private.jpg").write_bytes(b[0].read_bytes())
    os.symlink(outside / "private.jpg", add("symlink_outside", "escape.jpg", "failed", r"outside the watched folder"))
    os.mkfifo(add("fifo", "pipe.jpg", "failed", r"not a regular file"))
    # --- valid images without a face
    Image.new("RGB", (1, 1), (200, 120, 50)).save(add("one_pixel", "pixel.png", "no_faces"))
    Image.new("L", (1, 1), 7).save(add("one_pixel_gif", "pixel.gif", "no_faces"))
    # --- valid but unusual: the face must be found and sorted with its person
    with Image.open(a[0]) as im:
        for o in range(1, 9):
            oriented_jpeg(im, o, add(f"orientation_{o}", f"orientation_{o}.jpg", "face", source=a[0]))
    makers = [
        ("cmyk", "cmyk.jpg", cmyk_jpeg),
        ("gray16", "gray16.png", gray16_png),
        ("rgb16", "rgb16.png", lambda im, p: p.write_bytes(rgb16_png(im))),
        ("palette_transparent", "palette.png", palette_transparent_png),
        ("animated_gif", "animated.gif", lambda im, p: animated_gif(im, p, seed)),
        ("broken_exif", "broken_exif.jpg", lambda im, p: p.write_bytes(broken_exif_jpeg(_jpeg_bytes(im)))),
        ("heic_turned", "IMG_0001.HEIC", iphone_heic),
        ("avif", "photo.avif", lambda im, p: im.convert("RGB").save(p, format="AVIF")),
    ]
    for (name, filename, make), photo in zip(makers, a[1:]):
        with Image.open(photo) as im:
            make(im, add(name, filename, "face", source=photo))
    # --- odd names (person b): the bytes of a real photo under a name that breaks naive code
    for (name, filename), photo in zip(
        [("unicode_name", "Zoë 照片 ☃.jpg"), ("spaces_name", "  a photo  with spaces .JPG"),
         ("newline_name", "line\nbreak.jpeg")], b):
        add(name, filename, "face", source=photo).write_bytes(photo.read_bytes())
    # --- a directory named like an image: a folder like any other, its photos are sorted
    album = dest / "album.jpg"
    album.mkdir()
    cases.append(Case("dir_named_jpg", album, "folder"))
    add("inside_dir_named_jpg", "album.jpg/inside.jpg", "face", source=b[3]).write_bytes(b[3].read_bytes())
    return cases


def iphone_heic(im: Image.Image, dest: Path) -> None:
    """A HEIC as a phone held upright saves it: the sensor's pixels turned a quarter, with the
    turn recorded (EXIF orientation 6; pillow-heif stores it as the file's own rotation)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    exif = Image.Exif()
    exif[0x0112] = 6
    im.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(dest, format="HEIF", exif=exif.tobytes())


def non_utf8_name(dest: Path, data: bytes) -> Path:
    """A file whose name is not valid UTF-8 (Latin-1 'café', as old archives and cameras write)."""
    raw = os.path.join(os.fsencode(dest), b"caf\xe9.jpg")
    with open(raw, "wb") as fh:
        fh.write(data)
    return Path(os.fsdecode(raw))


# ---------------------------------------------------------------------------------------------
# Harness shared by the reliability tests: a service subprocess, waiting, status, privileges.
# ---------------------------------------------------------------------------------------------


def wait_for(predicate, timeout: float, what: str, every: float = 0.25):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class ServiceProc:
    """`organizer run` as a subprocess, its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, preexec_fn=None, cwd=None):
        from .conftest import organizer_cmd

        self.log = log
        self.fh = open(log, "ab")
        self.proc = subprocess.Popen(
            organizer_cmd("run", *args), stdout=self.fh, stderr=subprocess.STDOUT,
            env=env, preexec_fn=preexec_fn, cwd=cwd,
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)
        self.fh.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def status_json(output: Path, errors: int = 1000, db: Path | None = None, **kw) -> dict:
    from .conftest import run_organizer

    args = ["status", "--json", "--errors", str(errors), "--output", str(output)]
    if db is not None:
        args += ["--db", str(db)]
    return json.loads(run_organizer(*args, **kw).stdout)


def tree_index(output: Path) -> dict[tuple[int, int], set[str]]:
    """(device, inode) of each photo linked in a person folder (not doubtful/) -> those folders.
    Hard links, symlinks and copies made by rename all resolve to the file they show."""
    index: dict[tuple[int, int], set[str]] = {}
    if not output.is_dir():
        return index
    for folder in output.iterdir():
        if not folder.is_dir() or folder.name.startswith(".") or folder.name == "doubtful":
            continue
        for entry in folder.iterdir():
            if entry.name in ("representative.jpg", "montage.jpg"):
                continue
            try:
                st = entry.stat()  # follows a symlink to the original
            except OSError:
                continue
            index.setdefault((st.st_dev, st.st_ino), set()).add(folder.name)
    return index


def folders_holding(output: Path, photo: Path, index: dict | None = None,
                    copies: dict[Path, list[Path]] | None = None) -> set[str]:
    """Person folders (cluster_N or named, not doubtful/) with a link to ``photo`` or, with
    ``copies`` (:func:`identical_copies`), to any file with the same bytes: identical files are
    linked once per folder, under one of their names."""
    index = tree_index(output) if index is None else index
    found: set[str] = set()
    for p in (copies or {}).get(photo, [photo]):
        st = os.stat(p)
        found |= index.get((st.st_dev, st.st_ino), set())
    return found


def identical_copies(root: Path) -> dict[Path, list[Path]]:
    """Every regular file under ``root`` (symlinks not followed) -> the files with its bytes."""
    by_sha: dict[str, list[Path]] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                by_sha.setdefault(hashlib.sha256(p.read_bytes()).hexdigest(), []).append(p)
    return {p: same for same in by_sha.values() for p in same}


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
PR_CAPBSET_DROP = 24


def drop_file_override() -> None:
    """preexec_fn: make root obey file permission bits, as any other user does.

    Removes CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the capability bounding set; the
    execve that follows then gives the process (and its encoder workers) every capability but
    those two. Unlike setuid(nobody) this keeps access to an interpreter under /root.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_CAPBSET_DROP) failed: {os.strerror(err)}")


def permission_dropper(probe_dir: Path):
    """A preexec_fn under which a mode-000 file really is unreadable, or None (with the reason).

    Not root: permissions already apply, no preexec_fn needed. Root: drop the override
    capabilities, and check that this works here (containers may forbid it).
    """
    probe = probe_dir / "probe-unreadable"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        preexec = drop_file_override if os.geteuid() == 0 else None
        try:
            proc = subprocess.run(
                [sys.executable, "-c", f"open({str(probe)!r}, 'rb')"],
                preexec_fn=preexec, capture_output=True, text=True, timeout=60,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"cannot drop CAP_DAC_OVERRIDE here: {exc}"
        if "PermissionError" not in proc.stderr:
            return None, "a mode-000 file stays readable even without CAP_DAC_OVERRIDE here"
        return (preexec or _no_preexec), ""
    finally:
        probe.chmod(0o600)
        probe.unlink()


def _no_preexec() -> None:
    pass


if __name__ == "__main__":
    out = Path(sys.argv[1])
    photos = [Path(p) for p in sys.argv[2:]]
    made = make_corpus(out / "corpus", photos[:9], photos[9:], out / "outside")
    for c in made:
        print(f"{c.expect:9} {c.name:22} {c.path.name!r}")
