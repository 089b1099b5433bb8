"""Encode: find every face in a photo and compute its 128-d dlib encoding.

This is the only module that uses dlib and face_recognition's models (FaceModels). Each photo is decoded, searched
and encoded in one worker of a process pool (one per core), so the three overlap across photos
and no photo is decoded twice; results flow back to the parent, which is the only SQLite writer.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import importlib.util
import io
import logging
import math
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .ingest import Frame, IngestError, crop_region, frame_crop, jpeg_bytes, load_for_detection

log = logging.getLogger(__name__)

_models = None  # the FaceModels of this process, made when first needed

MODELS_DIR = Path(__file__).with_name("models")  # data shipped with the package (see FaceModels.hog)


class EncoderUnavailable(RuntimeError):
    """dlib or face_recognition's models cannot be loaded."""


class FaceModels:
    """face_recognition's dlib models, each loaded from its file when first used.

    By hand rather than ``import face_recognition``: its api module loads all five models at
    import, about 2.2 s of one core that every scan waits for, including the 5-point predictor
    (used here only with ``landmarks="small"``) and the HOG detector made by
    ``dlib.get_frontal_face_detector()``, which decompresses it from dlib's binary (0.6 s). The
    model files are face_recognition_models' own, the calls are face_recognition's
    (tests/test_models.py compares the two).
    """

    def __init__(self):
        try:
            import dlib  # noqa: PLC0415 - this module is the only one that imports dlib
        except ImportError as exc:
            raise EncoderUnavailable(f"cannot import dlib: {exc}") from None
        # found without importing it: its __init__ imports pkg_resources, slow and deprecated
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise EncoderUnavailable("face_recognition_models is not installed; run `uv sync` in the project folder")
        self.dlib = dlib
        self.files = Path(list(spec.submodule_search_locations)[0]) / "models"
        if not self.files.is_dir():
            raise EncoderUnavailable(f"face_recognition_models is not installed whole (no {self.files}); "
                                     "run `uv sync` in the project folder")

    def _load(self, make, name: str):
        path = self.files / name
        try:
            return make(str(path))
        except RuntimeError as exc:  # dlib's error for a missing or damaged file
            raise EncoderUnavailable(f"cannot load the face model {path} ({exc}); run `uv sync --reinstall-package "
                                     "face-recognition-models` in the project folder") from None

    @functools.cached_property
    def hog(self):
        """dlib's frontal face detector, from the copy dlib saved of it in MODELS_DIR (equal to the
        built-in one: tests/test_models.py), which loads in milliseconds; the built-in if it is missing."""
        saved = MODELS_DIR / "frontal_face_detector.svm"
        if saved.is_file():
            try:
                return self.dlib.fhog_object_detector(str(saved))
            except RuntimeError:
                log.warning("cannot read %s: using dlib's built-in face detector", saved)
        return self.dlib.get_frontal_face_detector()

    @functools.cached_property
    def cnn(self):
        return self._load(self.dlib.cnn_face_detection_model_v1, "mmod_human_face_detector.dat")

    @functools.cached_property
    def encoder(self):
        return self._load(self.dlib.face_recognition_model_v1, "dlib_face_recognition_resnet_model_v1.dat")

    @functools.cached_property
    def predictor_68(self):
        return self._load(self.dlib.shape_predictor, "shape_predictor_68_face_landmarks.dat")

    @functools.cached_property
    def predictor_5(self):
        return self._load(self.dlib.shape_predictor, "shape_predictor_5_face_landmarks.dat")

    def predictor(self, landmarks: str):
        """The landmark predictor: "large" = 68 points, "small" = 5."""
        return self.predictor_5 if landmarks == "small" else self.predictor_68

    def load(self, settings: "DetectionSettings") -> None:
        """Load every model ``settings`` use now."""
        self.hog, self.cnn, self.encoder, self.predictor(settings.landmarks)  # noqa: B018

    def locations(self, img: np.ndarray, upsample: int, model: str = "hog") -> list["Box"]:
        """face_recognition.face_locations: the detector's boxes, cut to the image."""
        if model == "cnn":
            return [_to_box(d.rect, img.shape) for d in self.cnn(img, upsample)]
        return [_to_box(r, img.shape) for r in self.hog(img, upsample)]


def face_models() -> FaceModels:
    """This process's FaceModels (raises EncoderUnavailable if dlib or the model files are missing)."""
    global _models
    if _models is None:
        _models = FaceModels()
    return _models


@dataclass(frozen=True)
class DetectionSettings:
    """Everything that changes what faces are found and how they are encoded (picklable)."""

    model: str = "hog"  # "hog" (CPU, fast) or "cnn" (more accurate, slow on CPU)
    upsample: int = 1
    max_side: int = 1600
    # Coarse to fine (HOG only, see detect_faces): a photo whose detection frame is larger than
    # coarse_side is first searched on a copy scaled to coarse_side at upsample 0; the full frame
    # at ``upsample`` is searched only when that finds no face, or a face smaller than fine_below
    # (detection-frame pixels). coarse_side 0 = always the full search.
    coarse_side: int = 800
    fine_below: int = 0
    max_pixels: int = 100_000_000
    num_jitters: int = 1
    landmarks: str = "large"  # "large" = 68-point alignment, "small" = 5-point
    # On a photo where HOG finds no face, its near-misses (score >= -fallback_margin) are checked
    # by the CNN detector on a crop around each; 0 turns this off. Unused with model="cnn".
    fallback_margin: float = 0.5
    # Encode the aligned face and its mirror image and average the two (see encode_faces).
    mirror: bool = True
    # Scale encodings to unit length (see encode_faces); False = dlib's raw encodings.
    normalize: bool = True


# Bump when the same settings would give different encodings; stores record what made theirs.
ENCODING_VERSION = 2


def encoder_id(settings: DetectionSettings) -> str:
    """What made a store's encodings: faces encoded otherwise are re-encoded (Organizer.upgrade_encodings)."""
    return (f"dlib-resnet-v1 encoding={ENCODING_VERSION} landmarks={settings.landmarks} "
            f"jitters={settings.num_jitters} mirror={int(settings.mirror)} unit={int(settings.normalize)}")


@dataclass
class FaceRecord:
    """One detected face, in full-size (EXIF-upright) pixel coordinates."""

    top: int
    right: int
    bottom: int
    left: int
    encoding: np.ndarray  # float64, shape (128,)
    sharpness: float  # variance of the Laplacian on the face, a blur measure
    # the output's face crop (ingest.crop_region) as JPEG, cut from the frame this worker decoded,
    # so the writer need not decode the original again for representatives and montages; None
    # when the frame is too small for it there
    crop: bytes | None = None

    @property
    def size(self) -> int:
        return min(self.bottom - self.top, self.right - self.left)


@dataclass
class PhotoResult:
    """What encoding one photo produced: faces, or an error message."""

    path: Path
    width: int = 0
    height: int = 0
    faces: list[FaceRecord] = field(default_factory=list)
    error: str | None = None


def _sharpness(gray: np.ndarray) -> float:
    """Variance of a 4-neighbour Laplacian: low for blurred faces."""
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    g = gray.astype(np.float64)
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var())


Box = tuple[int, int, int, int]  # top, right, bottom, left (face_recognition's "css" order)

FALLBACK_CANDIDATES = 3  # near-misses checked per photo, best first: bounds the fallback's cost
_CROP_FACE_PX = 100  # a candidate is resized to about this size for the CNN check (its window is 80 px)
_CROP_CONTEXT = 0.6  # context kept around a candidate, in face sides on each side


def _to_box(rect, shape) -> Box:
    return (max(rect.top(), 0), min(rect.right(), shape[1]), min(rect.bottom(), shape[0]), max(rect.left(), 0))


def _cnn_confirms(models: FaceModels, img: np.ndarray, rect) -> bool:
    """Does the CNN (mmod) detector find a face centred inside ``rect`` in a crop around it?

    The crop is resized so the face is ~100 px: a check costs about the same whatever the photo's
    size, unlike running the CNN detector on the whole photo."""
    from PIL import Image  # noqa: PLC0415

    side = max(rect.right() - rect.left(), rect.bottom() - rect.top(), 1)
    cx, cy = (rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2
    half = side * (0.5 + _CROP_CONTEXT)
    h, w = img.shape[:2]
    left, top = int(max(0, cx - half)), int(max(0, cy - half))
    right, bottom = int(min(w, cx + half)), int(min(h, cy + half))
    if right - left < 2 or bottom - top < 2:
        return False
    f = _CROP_FACE_PX / side
    crop = Image.fromarray(img[top:bottom, left:right])
    crop = crop.resize((max(1, round(crop.width * f)), max(1, round(crop.height * f))), Image.Resampling.BILINEAR)
    for det in models.cnn(np.asarray(crop), 0):
        r = det.rect
        x = left + (r.left() + r.right()) / 2 / f
        y = top + (r.top() + r.bottom()) / 2 / f
        if det.confidence > 0 and rect.left() <= x <= rect.right() and rect.top() <= y <= rect.bottom():
            return True
    return False


def _full_search(models: FaceModels, img: np.ndarray, settings: DetectionSettings) -> list[Box]:
    """HOG (or CNN) on the whole detection frame at ``settings.upsample``, plus the CNN-checked
    fallback on photos HOG finds empty.

    HOG's usual operating point (score >= 0) misses turned or tilted faces; lowering its
    threshold finds them but also fires on coins and rocket parts. So only on a photo where HOG
    finds nothing, its best near-misses (down to -fallback_margin) are shown to the CNN
    detector, which has to agree: two independent detectors, at a fraction of the CNN's cost on
    the whole photo."""
    if settings.model == "cnn" or settings.fallback_margin <= 0:
        return models.locations(img, settings.upsample, settings.model)
    rects, scores, _ = models.hog.run(img, settings.upsample, -settings.fallback_margin)
    found = [_to_box(r, img.shape) for r, sc in zip(rects, scores) if sc >= 0]
    if found:
        return found
    near = sorted(zip(scores, range(len(rects))), reverse=True)[:FALLBACK_CANDIDATES]
    return [_to_box(rects[i], img.shape) for _, i in near if _cnn_confirms(models, img, rects[i])]


def _coarse_search(models: FaceModels, frame: Frame, side: int) -> list[Box]:
    """HOG at upsample 0 on a copy of ``frame`` scaled to ``side``; boxes in the frame's pixels."""
    h, w = frame.height, frame.width
    f = side / max(h, w)
    small = frame.scaled((max(1, round(w * f)), max(1, round(h * f))))
    boxes = []
    for t, r, b, l in models.locations(small, 0):
        boxes.append((max(0, round(t / f)), min(w, round(r / f)), min(h, round(b / f)), max(0, round(l / f))))
    return boxes


def _overlaps(a: Box, b: Box) -> bool:
    """Do two boxes cover the same face (intersection over the smaller box's area > 0.5)?"""
    t, r, bo, l = max(a[0], b[0]), min(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])
    inter = max(0, r - l) * max(0, bo - t)
    smaller = min((a[1] - a[3]) * (a[2] - a[0]), (b[1] - b[3]) * (b[2] - b[0]))
    return smaller > 0 and inter > 0.5 * smaller


def detect_faces(img: Frame | np.ndarray, settings: DetectionSettings) -> list[Box]:
    """Face boxes in ``img`` (the detection frame), coarse to fine.

    The full search (``settings.upsample`` on the whole frame) is what finds faces of 40-80 px,
    and its cost grows with the upsampled frame's area; a face HOG finds on a copy scaled to
    ``coarse_side`` at upsample 0 (a small fraction of that cost) is at least ~80 px there. So a
    large frame is searched coarsely first, and fully only when that found nothing, or found a
    face smaller than ``fine_below`` (a group or a distant shot, where faces too small for the
    coarse search are likely). A frame no larger than ``coarse_side`` gets the full search alone:
    there it is cheap. The coarse search's boxes are kept next to the full search's where the
    latter did not find that face.
    """
    models = face_models()
    frame = Frame.of(img)
    coarse: list[Box] = []
    if settings.model == "hog" and 0 < settings.coarse_side < max(frame.shape[:2]):
        coarse = _coarse_search(models, frame, settings.coarse_side)
        if coarse and min(min(b - t, r - l) for t, r, b, l in coarse) >= settings.fine_below:
            return coarse
    full = _full_search(models, frame.whole(), settings)
    return full + [c for c in coarse if not any(_overlaps(c, f) for f in full)]


# How far around a face box its encoding reads the frame, as a share of the box's size: the
# landmarks lie about the box, and dlib's aligned chip (padding 0.25, turned with the face) reaches
# about half the box beyond it. Checked per face (_reads_within): a face whose landmarks or chip
# reach farther is encoded on the whole frame.
FACE_AREA_MARGIN = 0.6


@dataclass
class _Area:
    """The part of a frame a face is encoded on: its pixels and where they are in the frame."""

    pixels: np.ndarray
    left: int
    top: int
    frame_width: int
    frame_height: int

    def local(self, box: Box) -> Box:
        t, r, b, l = box
        return (t - self.top, r - self.left, b - self.top, l - self.left)

    def holds(self, left: float, top: float, right: float, bottom: float) -> bool:
        """Does the area hold this frame rectangle (cut only where the frame itself ends)?"""
        h, w = self.pixels.shape[:2]
        return ((left >= self.left or self.left == 0) and (top >= self.top or self.top == 0)
                and (right <= self.left + w or self.left + w == self.frame_width)
                and (bottom <= self.top + h or self.top + h == self.frame_height))


def _face_area(frame: Frame, box: Box) -> _Area:
    top, right, bottom, left = box
    m = math.ceil(max(bottom - top, right - left) * FACE_AREA_MARGIN)
    l0, t0 = max(0, left - m), max(0, top - m)
    pixels = np.ascontiguousarray(frame.region(l0, t0, right + m, bottom + m))  # (dlib takes no views)
    return _Area(pixels, l0, t0, frame.width, frame.height)


def _reads_within(dlib, area: _Area, shape, box: Box) -> bool:
    """Do the landmarks' search and dlib's chip for ``shape`` (in area pixels) read only pixels of
    ``area``, so the encoding is the one the whole frame gives? The chip's reach is as dlib's
    extract_image_chips computes it: the chip rectangle turned with the face, grown by the border
    its anti-aliasing pyramid needs (2 px, doubled plus 2 per level), plus one for interpolation."""
    pts = shape.parts()
    pad = 0.25 * max(box[2] - box[0], box[1] - box[3])  # the predictor samples about its shape
    xs, ys = [p.x + area.left for p in pts], [p.y + area.top for p in pts]
    if not area.holds(min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad):
        return False
    chip = dlib.get_face_chip_details(shape, 150, 0.25)
    w, h = chip.rect.width(), chip.rect.height()
    grow, rect_area = 2, w * h / 4
    while rect_area > chip.rows * chip.cols:
        rect_area, grow = rect_area / 4, grow * 2 + 2
    c, s = abs(math.cos(chip.angle)), abs(math.sin(chip.angle))
    ex, ey = (w * c + h * s) / 2 + grow + 1, (w * s + h * c) / 2 + grow + 1
    center = chip.rect.dcenter()
    cx, cy = center.x + area.left, center.y + area.top
    return area.holds(cx - ex, cy - ey, cx + ex, cy + ey)


def encode_faces(img: Frame | np.ndarray, boxes: list[Box], settings: DetectionSettings) -> list[np.ndarray]:
    """128-d encodings of the faces in ``boxes`` (float64, one per box) of the frame ``img``.

    Each face is aligned by its landmarks into dlib's 150x150 chip (as face_recognition does), and
    by default:

    * the chip and its mirror image are both encoded and averaged. A face's two halves differ in
      light and pose; the average is a steadier description of the person (cost: two network
      passes per face instead of one; dlib's ``num_jitters`` also mirrors, but at random and
      with crops, at a pass per jitter);
    * the encoding is scaled to unit length. dlib's encodings vary in length with image quality;
      without it a blurred face is far from everyone by its length alone.
      Distances are then chord lengths on the unit sphere (0 to 2), hence ``eps`` 0.36.

    The encoding depends only on the frame and the box: a box found by the coarse search is
    encoded on the same detection frame as one found by the full search, and a face is encoded on
    the frame's region around it (:func:`_face_area`) only when that reads the same pixels.
    """
    models = face_models()
    dlib = models.dlib
    frame = Frame.of(img)
    predictor = models.predictor(settings.landmarks)
    out = []
    for box in boxes:
        area = _face_area(frame, box)
        top, right, bottom, left = area.local(box)
        shape = predictor(area.pixels, dlib.rectangle(left, top, right, bottom))
        if not _reads_within(dlib, area, shape, box):
            area = _Area(frame.whole(), 0, 0, frame.width, frame.height)
            top, right, bottom, left = box
            shape = predictor(area.pixels, dlib.rectangle(left, top, right, bottom))
        chip = dlib.get_face_chip(area.pixels, shape, size=150, padding=0.25)
        enc = np.array(models.encoder.compute_face_descriptor(chip, settings.num_jitters))
        if settings.mirror:
            flipped = np.ascontiguousarray(chip[:, ::-1])
            enc = (enc + np.array(models.encoder.compute_face_descriptor(flipped, settings.num_jitters))) / 2
        if settings.normalize:
            enc = enc / max(float(np.linalg.norm(enc)), 1e-12)
        out.append(enc)
    return out


def reencode_photo(path: Path, boxes: list[Box], settings: DetectionSettings,
                   data: bytes | None = None) -> tuple[list[np.ndarray] | None, str | None]:
    """Encodings for known faces (``boxes`` in full-size pixels), without detecting again:
    (encodings, None), or (None, reason) when the photo cannot be read. ``data``: as in analyze_photo."""
    try:
        prepared = load_for_detection(io.BytesIO(data) if data is not None else Path(path), settings.max_side,
                                      settings.max_pixels)
    except IngestError as exc:
        return None, str(exc)
    s, frame = prepared.scale, prepared.frame
    h, w = frame.height, frame.width
    local = [(max(0, round(t / s)), min(w, round(r / s)), min(h, round(b / s)), max(0, round(l / s)))
             for t, r, b, l in boxes]
    return encode_faces(frame, local, settings), None


def analyze_photo(path: Path, settings: DetectionSettings, data: bytes | None = None) -> PhotoResult:
    """Decode ``path`` (or ``data``, its bytes, when the photo was sent from another machine),
    detect all faces and encode them. Never raises for bad input."""
    path = Path(path)
    try:
        prepared = load_for_detection(io.BytesIO(data) if data is not None else path, settings.max_side,
                                      settings.max_pixels)
    except IngestError as exc:
        return PhotoResult(path=path, error=str(exc))
    frame = prepared.frame
    boxes = detect_faces(frame, settings)
    encodings = encode_faces(frame, boxes, settings)
    faces = []
    s = prepared.scale
    for (top, right, bottom, left), enc in zip(boxes, encodings):
        crop = frame.region(left, top, right, bottom).mean(axis=2)  # gray, the face only
        face = FaceRecord(
            top=max(0, round(top * s)),
            right=min(prepared.width, round(right * s)),
            bottom=min(prepared.height, round(bottom * s)),
            left=max(0, round(left * s)),
            encoding=np.asarray(enc, dtype=np.float64),
            sharpness=_sharpness(crop),
        )
        cut = frame_crop(frame, crop_region((face.top, face.right, face.bottom, face.left)), s)
        face.crop = jpeg_bytes(cut) if cut is not None else None
        faces.append(face)
    faces.sort(key=lambda f: (f.left, f.top))
    return PhotoResult(path=path, width=prepared.width, height=prepared.height, faces=faces)


def _exit_with_parent(parent: int) -> None:
    """Worker side: exit when the organizer process ``parent`` dies (e.g. kill -9), instead of
    lingering as an orphan. Watched by its pid, not by getppid(): a worker the fork server made
    is the server's child, and the server lives as long as any worker does."""
    import select
    import threading

    first_parent = os.getppid()  # the organizer when spawned; the fork server when forked by it

    def alive() -> bool:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass  # e.g. EPERM: it exists
        return os.getppid() == first_parent  # a spawned worker is handed to init when its parent dies

    def watch() -> None:
        try:
            fd = os.pidfd_open(parent)  # readable once the process has ended: no pid reuse, no polling
        except (AttributeError, OSError):  # not Linux >= 5.3, or refused: poll every second
            while alive():
                select.select([], [], [], 1.0)
        else:
            select.select([fd], [], [])
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _worker_init(parent: int, settings: DetectionSettings | None = None) -> None:
    # Ctrl-C in a terminal signals the whole process group: only the parent decides when to
    # stop (it finishes the batch, then shuts the pool down). SIGTERM keeps its default: the
    # executor terminates the workers of a broken pool with it (systemd's KillMode=mixed sends
    # SIGTERM to the main process only).
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent)
    preload_models(settings)


def preload_models(settings: DetectionSettings | None = None) -> None:
    """Load the face models ``settings`` (default: the defaults) use in this process, with one
    BLAS/OpenMP thread (the pool already uses every core). Run by each worker, and first by the fork
    server (organizer.encode_preload), whose workers then start with the default models loaded. A
    failure is left for the first task to report, with its message (a failing initializer breaks the pool)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        face_models().load(settings or DetectionSettings())
    except EncoderUnavailable:
        pass


def _signature(path: Path) -> tuple[int, int] | None:
    """(size, mtime) of a regular file; None for anything else (a FIFO would block a worker's read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def _pool_context() -> multiprocessing.context.BaseContext:
    """How the encoder processes start. Never fork: the parent runs watchdog threads, and forking
    a threaded process can deadlock the child. Where the platform has it, a fork server: a fresh
    single-threaded process that loads the face models once (~100 MB, over a second of CPU) and
    forks every worker from that state, so workers start at once and share the models' memory;
    otherwise (Windows, macOS' default), or when the server cannot be started (no writable
    temporary folder for its socket, or one whose path is too long for a socket), spawn, where
    each worker loads its own."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # "__main__" too: a worker otherwise imports the command's script again, as under spawn
        ctx.set_forkserver_preload(["__main__", "organizer.encode_preload"])
        try:
            multiprocessing.util.get_temp_dir()  # the folder the server's socket is made in
            multiprocessing.forkserver.ensure_running()  # binds the socket; the models load in the server
        except OSError as exc:
            log.info("the encoder processes load their models one by one: cannot start a fork server (%s)", exc)
        else:
            return ctx
    return multiprocessing.get_context("spawn")


class EncoderPool:
    """A process pool of encoders. ``workers=0`` encodes in the calling process."""

    def __init__(self, settings: DetectionSettings, workers: int):
        self.settings = settings
        self.workers = workers
        self._pool: cf.ProcessPoolExecutor | None = None
        # photos submitted by prefetch() before map() asks for them: path -> (future, file signature, round)
        self._ahead: dict[Path, tuple[cf.Future, tuple[int, int], int]] = {}
        self._round = 0
        self._loading: list[cf.Future] = []  # the workers' model loading, once start() began it
        self._starter: threading.Thread | None = None  # start()'s thread, which makes the pool
        self._start_error: BaseException | None = None

    def start(self, wait: bool = False) -> None:
        """Start the workers and load their models now, so the first photo does not wait for it.
        The workers are started from a thread (with a fork server, starting the first one waits
        for the server to load the models): the caller goes on meanwhile. ``wait``: until they are
        loaded; raises EncoderUnavailable if they cannot be (this is the check, so the calling
        process need not load the models itself)."""
        if self.workers <= 0:
            if wait:
                check_models(self.settings)
            return
        if self._starter is None:  # a second call waits for the first one's loading
            self._starter = threading.Thread(target=self._start_workers, name="encoder-start", daemon=True)
            self._starter.start()
        if wait:
            self._started()
            for fut in self._loading:
                fut.result()

    def check(self) -> None:
        """Raise EncoderUnavailable unless the workers can load the models (they load them; the
        calling process need not)."""
        self.start(wait=True)

    def _start_workers(self) -> None:
        try:
            pool = self._new_pool()
            self._loading = [pool.submit(check_models, self.settings) for _ in range(self.workers)]
            for fut in self._loading:
                fut.add_done_callback(lambda f: f.exception())  # unless waited for, a failure shows with the first photo
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by _started()
            self._start_error = exc

    def _started(self) -> None:
        """Wait for start()'s thread, if there is one, and raise what it could not do."""
        if self._starter is not None:
            self._starter.join()
            error, self._start_error = self._start_error, None
            if error is not None:
                self._starter = None  # the next start() tries again
                raise error

    def prefetch(self, paths: Iterable[Path]) -> None:
        """Start encoding ``paths`` now, before map() asks for them: the workers keep busy while the
        caller commits results and updates the tree. The caller passes only paths its rules let
        the workers read (check_readable: no symlink out of the watched folder, no FIFO); anything
        but a regular file is skipped here too. map() uses such a result only if the file's size
        and mtime are unchanged since; one no later map() asked for (e.g. a duplicate) is dropped
        after the next call to map()."""
        if self.workers <= 0:
            return
        pool = self._ensure_pool()
        self._round += 1
        for path in paths:
            path = Path(path)
            if path in self._ahead:
                continue
            sig = _signature(path)
            if sig is not None:
                self._ahead[path] = (pool.submit(analyze_photo, path, self.settings), sig, self._round)

    def _take_ahead(self, path: Path) -> cf.Future | None:
        entry = self._ahead.pop(Path(path), None)
        if entry is None:
            return None
        fut, sig, _ = entry
        if sig != _signature(path):
            fut.cancel()
            return None
        return fut

    def _drop_stale_ahead(self) -> None:
        for path, (fut, _, made) in list(self._ahead.items()):
            if made < self._round:
                fut.cancel()
                del self._ahead[path]

    def _ensure_pool(self) -> cf.ProcessPoolExecutor:
        self._started()
        return self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                self.workers, mp_context=_pool_context(), initializer=_worker_init, initargs=(os.getpid(), self.settings)
            )
        return self._pool

    def map(self, paths: Iterable[Path]) -> Iterator[PhotoResult]:
        """Encode ``paths``; yields one result per path, in completion order."""
        try:
            for _, result in self._run(analyze_photo, [(p,) for p in paths],
                                       lambda job, msg: PhotoResult(path=job[0], error=msg), ahead=True):
                yield result
        finally:
            self._drop_stale_ahead()

    def reencode(self, jobs: list[tuple[Path, list[Box]]]) -> Iterator[tuple[Path, list[np.ndarray] | None, str | None]]:
        """Re-encode known faces: yields (path, encodings or None, error) per job, in completion order."""
        for (path, _), (encodings, error) in self._run(reencode_photo, jobs, lambda job, msg: (None, msg)):
            yield path, encodings, error

    def _run(self, task, jobs: list[tuple], failed, ahead: bool = False) -> Iterator[tuple[tuple, object]]:
        """``task(*job, settings)`` for every job; yields (job, result) in completion order. A job
        that raises, or whose worker dies, yields ``failed(job, message)`` instead. ``ahead``: use
        the futures prefetch() started for these jobs."""
        if self.workers <= 0:
            check_models(self.settings)
            for job in jobs:
                yield job, task(*job, self.settings)
            return
        pool = self._ensure_pool()
        futures = {(ahead and self._take_ahead(job[0])) or pool.submit(task, *job, self.settings): job
                   for job in jobs}
        answered = set()
        try:
            for fut in cf.as_completed(futures):
                job = futures[fut]
                try:
                    result = fut.result()
                except cf.process.BrokenProcessPool:
                    # A worker died (e.g. a segfault in a native decoder): we cannot tell which
                    # photo did it, so retry every unanswered one alone in a fresh pool; the
                    # culprit then fails on its own and is recorded against that photo.
                    self._discard_pool()
                    unfinished = [j for f, j in futures.items() if f not in answered]
                    if len(futures) == 1:
                        yield job, failed(job, "the decoder crashed on this file")
                    else:
                        for j in unfinished:
                            yield from self._run(task, [j], failed)
                    break
                except Exception as exc:  # noqa: BLE001 - a bug for one photo must not stop the service
                    result = failed(job, f"internal error while encoding: {exc!r}")
                answered.add(fut)
                yield job, result
        finally:
            for fut in futures:
                fut.cancel()

    def _discard_pool(self) -> None:
        for fut, _, _ in self._ahead.values():
            fut.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._starter is not None:
            self._starter.join()  # the pool it may still be making is shut down below
            self._starter, self._start_error = None, None
        for fut, _, _ in self._ahead.values():
            fut.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def check_models(settings: DetectionSettings | None = None) -> None:
    """Raise EncoderUnavailable unless the models ``settings`` use load (in each worker at
    EncoderPool.start; in the calling process when there are no workers)."""
    face_models().load(settings or DetectionSettings())


def chinese_whispers(enc: np.ndarray, threshold: float) -> np.ndarray:
    """dlib's chinese whispers graph clustering (faces closer than ``threshold`` are linked):
    one label per encoding. Here because this is the only module that imports dlib."""
    import dlib  # noqa: PLC0415

    if len(enc) == 0:
        return np.zeros(0, dtype=int)
    labels = dlib.chinese_whispers_clustering([dlib.vector(row.tolist()) for row in enc], float(threshold))
    return np.asarray(labels, dtype=int)
