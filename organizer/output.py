"""Output: reconcile the browsable folder tree with the store.

Layout::

    <output>/cluster_<id>/ or <output>/<name>/   links to the person's photos + representative.jpg
    <output>/doubtful/                           photos with a face it could not place
    <output>/doubtful/faces/                     one crop per doubtful face, named after its nearest person
    <output>/<person or doubtful>/montage.jpg    a contact sheet of the folder's faces (organizer.montage)

The organizer keeps a manifest (in the store) of every entry it created, and only ever creates,
replaces or deletes entries in that manifest: files people add to the tree are left alone.
Intended entries are written to the manifest *before* they are created, so a crash never leaves a
file the organizer would later mistake for someone else's.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import shutil
import threading
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from . import montage
from .ingest import CROP_SIZE, IngestError, crop_region, jpeg_bytes, upright_crop
from .store import OUTPUT_ERRORS, ChangedFolders, Store

log = logging.getLogger(__name__)

DOUBTFUL = "doubtful"
REPRESENTATIVE = "representative.jpg"
CROP_CACHE = 16 << 20  # bytes of face crops kept as JPEG (~15 KB each: about a thousand)


@dataclass
class ReconcileReport:
    created: int = 0
    removed: int = 0
    errors: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)  # why an entry failed -> how many
    wanted: int = 0  # entries the tree should hold (of the folders reconciled)
    failed_folders: set[str] = field(default_factory=set)  # top-level folders of the entries that failed

    def failed(self, message: str, reason: str, relpath: str) -> None:
        self.errors.append(message)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.failed_folders.add(relpath.split("/", 1)[0])


def folder_name(cluster_id: int, name: str | None) -> str:
    return safe_name(name) if name else f"cluster_{cluster_id}"


_UNSAFE = re.compile(r"[/\\\x00-\x1f]")
# Bytes in one file name (ext4, xfs, btrfs, tmpfs: 255; UTF-8 letters take 2-4), less the room a
# temporary ".<name>.tmp" once took (kept so that names made before stay the same).
NAME_MAX = 255 - len("..tmp")
# A crop or a copy is written under this name in its folder, then renamed into place: one name
# per folder (the writer writes one file at a time), so one a kill -9 left behind is overwritten
# by the next write there and removed by the next full check (the name is the organizer's alone).
TMP_NAME = ".organizer-write.tmp"


def _fit(stem: str, tail: str = "", limit: int = NAME_MAX) -> str:
    """``stem + tail``, the stem shortened by whole characters until the name fits in ``limit``
    bytes: the names the organizer makes from photo and person names must stay creatable."""
    room = limit - len(os.fsencode(tail))
    while stem and len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return stem + tail


def safe_name(name: str) -> str:
    """A person's name as a single, harmless folder name."""
    cleaned = _UNSAFE.sub("_", name).strip().lstrip(".")
    return _fit(cleaned[:200]) or "_"


def validate_person_name(name: str) -> str:
    """Reject names that would collide with the tree's own folders, or are not text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes from a terminal that is not set to UTF-8
        raise ValueError(f"{name.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8 text; "
                         "check your terminal's character set") from None
    cleaned = safe_name(name)
    if cleaned in (DOUBTFUL, ".organizer") or re.fullmatch(r"cluster_\d+", cleaned):
        raise ValueError(f"{name!r} is reserved; choose another name")
    return cleaned


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    k = 2
    while True:
        candidate = _fit(stem, f"_{k}.{ext}" if dot else f"_{k}")
        if candidate not in taken:
            return candidate
        k += 1


def desired_tree(store: Store, manifest: dict[str, tuple[str, str]],
                 scope: set[str] | None = None) -> dict[str, tuple[str, str]]:
    """relpath -> (kind, source) for everything the tree should contain right now (``manifest``:
    what it holds, whose names are kept), or for what the top-level folders in ``scope`` should
    (each folder depends only on its own people's faces and photos, ``doubtful/`` on every
    doubtful face and the names of the people they resemble).

    kind "link": source is the original photo's path; kind "crop": source is
    "<face id>|<photo path>|<top>,<right>,<bottom>,<left>"; kind "montage": see organizer.montage.
    """
    hidden = store.hidden_people()  # hidden by the user: no folder, their faces go nowhere
    clusters = {c["id"]: c for c in store.clusters() if c["id"] not in hidden}
    folder = {cid: folder_name(cid, c["name"]) for cid, c in clusters.items()}
    if scope is None:
        faces = {f.id: f for f in store.faces()}
        rows = store.photos_of_faces()
    else:
        clusters = {cid: c for cid, c in clusters.items() if folder[cid] in scope}
        faces = {f.id: f for f in store.faces_of_people(clusters, DOUBTFUL in scope)}
        rows = store.photos_of_faces({f.sha256 for f in faces.values()})
    wanted: dict[str, dict[str, None]] = defaultdict(dict)  # folder -> photo paths (ordered, unique)
    doubtful_faces: dict[int, str] = {}  # face id -> its photo's first name
    path_of: dict[int, str] = {}  # face -> the first path of its photo (for montages)
    # identical files (one content, several names) get one link per folder, under the first name
    # in path order (the name the representative crop is made from too)
    linked: set[tuple[str, str]] = set()  # (folder, sha256)
    for path, face_id, sha in rows:
        f = faces.get(face_id)
        if f is None:  # (scope) a face of another folder's photo
            continue
        path_of.setdefault(face_id, path)
        if f.cluster_id is not None and not f.doubtful and f.cluster_id in folder:
            target = folder[f.cluster_id]
        elif f.doubtful and f.cluster_id not in hidden:
            target = DOUBTFUL
            doubtful_faces.setdefault(face_id, path)
        else:
            continue
        if (target, sha) not in linked or path in wanted[target]:
            linked.add((target, sha))
            wanted[target][path] = None

    tree: dict[str, tuple[str, str]] = {}
    # keep names the manifest already gave a source, so existing links never get renamed
    previous: dict[tuple[str, str], str] = {}
    for relpath, (kind, source) in manifest.items():
        if kind == "link":
            folder_of, _, name = relpath.rpartition("/")
            previous[(folder_of, source)] = name
    for dirname, paths in wanted.items():
        taken = {REPRESENTATIVE, montage.MONTAGE}
        if dirname == DOUBTFUL:
            taken.add("faces")
        assigned: dict[str, str] = {}
        for path in paths:
            old = previous.get((dirname, path))
            if old and old not in taken:
                assigned[path] = old
                taken.add(old)
        for path in paths:
            if path not in assigned:
                stem, ext = os.path.splitext(os.path.basename(path))
                assigned[path] = _unique(_fit(stem, ext), taken)
                taken.add(assigned[path])
        for path, name in assigned.items():
            tree[f"{dirname}/{name}"] = ("link", path)

    for cid, c in clusters.items():
        rep_id = c["representative_face"]
        rep = None if rep_id is None else faces.get(rep_id) or (store.face(rep_id) if scope is not None else None)
        path = store.path_for_sha(rep.sha256) if rep else None
        if rep and path and wanted.get(folder[cid]):  # no folder for a group with no confident photo
            tree[f"{folder[cid]}/{REPRESENTATIVE}"] = ("crop", _crop_source(rep, path))

    tree.update(montage.entries(store, faces, folder, path_of, {d for d, p in wanted.items() if p}, DOUBTFUL))
    crop_taken: set[str] = set()
    for face_id, path in doubtful_faces.items():
        f = faces[face_id]
        near = f.nearest_cluster
        near_name = _fit(folder.get(near, "nobody") if near is not None else "nobody", limit=100)
        base = _fit(os.path.splitext(os.path.basename(path))[0], f"_face{face_id}_nearest_{near_name}.jpg")
        name = _unique(base, crop_taken)
        crop_taken.add(name)
        tree[f"{DOUBTFUL}/faces/{name}"] = ("crop", _crop_source(f, path))
    return tree


def _crop_source(face, path: str) -> str:
    return f"{face.id}|{path}|{face.top},{face.right},{face.bottom},{face.left}"


def entry_ident(dst: Path, kind: str = "link") -> str:
    """What identifies the entry we created: the symlink target, or device:inode of the file. A
    file of the organizer's own (a face crop, a montage) adds its size and mtime: its inode number,
    freed when the user deletes it, is often given to the next file made, maybe the user's, which
    must not pass for the entry. (A hard link's inode lives on in the original; an edit of the
    original in place keeps the link the original's.)"""
    if dst.is_symlink():
        return "symlink:" + os.readlink(dst)
    st = dst.lstat()
    ident = f"inode:{st.st_dev}:{st.st_ino}"
    return ident if kind == "link" else f"{ident}:{st.st_size}:{st.st_mtime_ns}"


def ident_key(ident: str) -> str:
    """What a file keeps when moved, whatever its kind: the symlink target, or device:inode."""
    return ":".join(ident.split(":", 3)[:3]) if ident.startswith("inode:") else ident


def same_file(dst: Path, ident: str) -> bool:
    """Is the file at ``dst`` the one recorded as ``ident`` (by :func:`entry_ident`)? An identity
    recorded without size and mtime (a store made before they were) is compared as it is."""
    return entry_ident(dst, "link" if ident == ident_key(ident) else "crop") == ident


def _adoptable(dst: Path, kind: str, source: str) -> bool:
    """An entry we intended but whose creation was not confirmed (crash): is it what we made?"""
    try:
        if kind in ("crop", montage.KIND):
            return dst.is_file() and not dst.is_symlink()
        if dst.is_symlink():
            return os.readlink(dst) == source
        return os.path.samefile(dst, source)
    except OSError:
        return False


def _is_ours(dst: Path, ident: str | None) -> bool:
    """Is the file at dst still the very entry we created (not replaced by a person)?"""
    try:
        return ident is not None and same_file(dst, ident)
    except OSError:
        return False


def face_crop(path: Path, box: tuple[int, int, int, int], max_pixels: int, size: int = CROP_SIZE) -> Image.Image:
    """The face at ``box`` (top, right, bottom, left) with a margin, at most ``size`` pixels
    (decoded only at the resolution it needs). Smaller sizes (montage cells) are scaled from the
    ``CROP_SIZE`` crop, so a face's representative and its montage cell share one decode."""
    crop = CROPS.get(path, box)
    if crop is None:
        crop = upright_crop(Path(path), crop_region(box), CROP_SIZE, max_pixels)
        CROPS.put(path, box, crop)
    if max(crop.size) > size:
        crop.thumbnail((size, size), Image.Resampling.LANCZOS)
    return crop


class CropCache:
    """JPEG bytes of images made lately, at most ``limit`` bytes, least recently used out first
    (the review page's images; the writer's face crops, in FaceCrops)."""

    def __init__(self, limit: int = 64 << 20):
        self.limit = limit
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()  # the review page's threads share them

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self._size += len(data)
            while self._size > self.limit and self._items:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


class FaceCrops:
    """The face crops made or received last, so the original is not decoded again for them.

    A tree update asks for the same face several times (its representative, its montage cell,
    each montage made again as a person grows), and the encoder already had the photo decoded
    (FaceRecord.crop, kept as the JPEG it came as and decoded only when asked for). Keyed by the
    file's identity too: a replaced photo is decoded again."""

    def __init__(self, limit: int):
        self._jpegs = CropCache(limit)

    @staticmethod
    def _key(path, box) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (str(path), tuple(int(v) for v in box), st.st_ino, st.st_size, st.st_mtime_ns)

    def get(self, path, box) -> Image.Image | None:
        key = self._key(path, box)
        data = self._jpegs.get(key) if key is not None else None
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")

    def put(self, path, box, crop: Image.Image) -> None:
        self._keep(path, box, jpeg_bytes(crop))

    def receive(self, path: Path, faces) -> None:
        """Keep the crops an encoder sent with a photo's faces (FaceRecord.crop)."""
        for f in faces:
            if f.crop:
                self._keep(path, (f.top, f.right, f.bottom, f.left), f.crop)

    def _keep(self, path, box, data: bytes) -> None:
        key = self._key(path, box)
        if key is not None:
            self._jpegs.put(key, data)


CROPS = FaceCrops(CROP_CACHE)


def _write_crop(source: str, dst: Path, max_pixels: int, kind: str = "crop") -> None:
    if kind == montage.KIND:
        crop = montage.render(source, max_pixels)
    else:
        # "<face id>|<path>|<box>": the path itself may hold "|"
        path, box = source.split("|", 1)[1].rsplit("|", 1)
        crop = face_crop(Path(path), tuple(int(v) for v in box.split(",")), max_pixels)
    tmp = dst.with_name(TMP_NAME)
    try:
        crop.save(tmp, "JPEG", quality=90)
        os.replace(tmp, dst)
    except BaseException:
        _discard(tmp)  # a full disk must not leave half a crop behind
        raise


def _discard_temporaries(output: Path, folders: set[Path]) -> None:
    """Remove the TMP_NAME files a killed writer left in ``folders`` and the top-level folders
    (one it left in a folder whose entries have gone since is found there)."""
    try:
        top = [Path(e.name) for e in os.scandir(output) if e.is_dir(follow_symlinks=False)]
    except OSError:
        top = []
    for folder in {Path("."), Path(DOUBTFUL, "faces"), *folders, *top}:
        _discard(output / folder / TMP_NAME)


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink()
    except OSError:
        pass


_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    """A link fallback is warned about once per process, not once per photo: under the systemd
    sandbox (photos and output on different mounts) every hard link falls back to a symlink."""
    if key in _warned:
        log.debug(msg, *args, "")
        return
    _warned.add(key)
    log.warning(msg, *args, " (set service.link_mode to stop this warning; further ones are not logged)")


def _place_link(source: str, dst: Path, link_mode: str) -> str:
    """Create dst pointing at source; returns the mode actually used."""
    if link_mode == "hardlink":
        try:
            os.link(source, dst)
            return "hardlink"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            _warn_once(f"hardlink:{exc.errno}", "cannot hard-link %s (%s); using a symlink instead%s",
                       source, exc.strerror)
            link_mode = "symlink"
    if link_mode == "symlink":
        try:
            os.symlink(source, dst)
            return "symlink"
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                raise
            _warn_once(f"symlink:{exc.errno}", "cannot symlink %s (%s); copying instead%s", source, exc.strerror)
    tmp = dst.with_name(TMP_NAME)
    try:
        shutil.copy2(source, tmp)
        os.replace(tmp, dst)
    except BaseException:
        _discard(tmp)
        raise
    return "copy"


def _remember_errors(store: Store, errors: list[str]) -> None:
    """Keep the last reconcile's errors in the store (written only when they change)."""
    before = store.get_meta(OUTPUT_ERRORS)
    now = json.dumps(errors[:50])
    if before != now and (errors or before not in (None, "[]")):
        store.set_meta(OUTPUT_ERRORS, now)


# A change to more than this share of the person folders is reconciled in one pass over every row:
# reading them folder by folder would cost more.
SCOPE_SHARE = 0.25


def tree_scope(store: Store, changes: ChangedFolders, also: set[str] = frozenset()) -> set[str] | None:
    """The top-level folders whose entries ``changes`` may have changed, and those ``also`` named
    (whose entries failed, or the user changed), or None: every folder (not tracked, or most)."""
    if changes.everything:
        return None
    names = {c["id"]: c["name"] for c in store.clusters()}
    scope = {folder_name(cid, name) for cid, name in changes.people}
    scope |= {folder_name(cid, names[cid]) for cid, _ in changes.people if cid in names}
    scope |= set(also) | ({DOUBTFUL} if changes.doubtful else set())
    return None if len(scope) > max(20, SCOPE_SHARE * len(names)) else scope


def reconcile(store: Store, output: Path, link_mode: str = "hardlink", max_pixels: int = 100_000_000,
              verify: bool = True, logged: set[str] | None = None, scope: set[str] | None = None) -> ReconcileReport:
    """Bring ``output`` in line with the store, touching only entries the organizer created.

    ``verify``: also check on disk that every entry made earlier is still there and still ours
    (putting back what someone deleted), and remove every folder left empty. Without it (the
    service after each batch) an entry the manifest records as made, for the same source, is
    trusted, not a stat of every entry of the tree. Scans, the start and the periodic rescan verify.

    ``scope`` (only without ``verify``): reconcile only these top-level folders (:func:`tree_scope`
    of what changed since the last update): the cost is what the batch touched, not one pass over
    every row of the store (bench_output.py). The others are left as they are.

    ``logged``: errors already logged in this update (the caller's set, added to here; a scan
    starts a new one): an entry that fails again in the next batch is not logged again.
    """
    output = Path(output)
    report = ReconcileReport()
    scope = None if verify else scope
    manifest, idents = store.manifest(scope)
    desired = desired_tree(store, manifest, scope)
    report.wanted = len(desired)

    # 1. forget and delete entries that are no longer wanted (or whose source changed)
    stale = [rp for rp, entry in manifest.items() if desired.get(rp) != entry]
    log.debug("reconciling %s: %d entries wanted, %d known, %d stale", output, len(desired), len(manifest), len(stale))
    for relpath in stale:
        kind, source = manifest[relpath]
        dst = output / relpath
        try:
            if dst.is_symlink() or dst.exists():
                if _is_ours(dst, idents.get(relpath)):
                    dst.unlink()
                    report.removed += 1
                else:
                    log.warning("leaving %s alone: it was changed by someone else", dst)
        except OSError as exc:
            report.failed(f"cannot remove {dst}: {exc.strerror}", exc.strerror or str(exc), relpath)
            continue
        store.manifest_remove(relpath)
        manifest.pop(relpath)

    # 2. record intent, then create what is missing
    todo = []
    with store.db.atomic():
        for relpath, (kind, source) in sorted(desired.items()):
            if not verify and idents.get(relpath) is not None and manifest.get(relpath) == (kind, source):
                continue  # made earlier and unchanged: trusted (see ``verify``)
            dst = output / relpath
            exists = os.path.lexists(dst)  # never raises (a folder we may not enter: "missing")
            if relpath in manifest:
                if exists and _is_ours(dst, idents.get(relpath)):
                    if kind != "link" and idents[relpath] == ident_key(idents[relpath]):  # recorded without size and mtime
                        store.manifest_set_ident(relpath, entry_ident(dst, kind))
                    continue
                if exists and idents.get(relpath) is None and _adoptable(dst, kind, source):
                    store.manifest_set_ident(relpath, entry_ident(dst, kind))
                    continue
                if exists:  # someone replaced our entry with their own file: theirs now
                    log.warning("leaving %s alone: it was replaced by someone else", dst)
                    store.manifest_remove(relpath)
                    continue
            elif exists:
                log.warning("not overwriting %s: a file the organizer did not create is there", dst)
                continue
            store.manifest_add(relpath, kind, source)
            todo.append((relpath, kind, source))
    for relpath, kind, source in todo:
        dst = output / relpath
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if kind == "link":
                _place_link(source, dst, link_mode)
            else:
                _write_crop(source, dst, max_pixels, kind)
            store.manifest_set_ident(relpath, entry_ident(dst, kind))
            report.created += 1
        except FileNotFoundError:
            # the original vanished since the last scan; the watcher will drop it from the store
            report.failed(f"source of {relpath} is gone", "the original is gone", relpath)
        except (OSError, IngestError) as exc:
            msg = getattr(exc, "strerror", None) or str(exc)
            report.failed(f"cannot create {dst}: {msg}", msg, relpath)
    for err in report.errors:
        if logged is None or err not in logged:
            log.error("output: %s", err)
    if logged is not None:
        logged.update(report.errors)
    _remember_errors(store, report.errors)
    log.debug("reconciled %s: %d created, %d removed, %d errors", output, report.created, report.removed,
              len(report.errors))

    # 3. remove folders left empty (only those that can hold our entries)
    # (``verify``: every folder that can hold our entries; otherwise those an entry left just now)
    folders = {Path(rp).parent for rp in (list(manifest) if verify else []) + stale}
    if verify:
        _discard_temporaries(output, folders)
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        d = output / folder
        try:
            if folder != Path(".") and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        except OSError:
            pass
    return report


class FolderEvents:
    """Logs at INFO when a person folder is created, renamed, merged into another, split off
    another or removed, so the journal tells why the tree changed. Face assignments are read only
    when the set of people or their names changed (not on every batch)."""

    def __init__(self, store: Store):
        self.store = store
        self._folders: dict[int, str] | None = None
        self._assign: dict[int, int | None] = {}

    def _now(self) -> dict[int, str]:
        names = {c["id"]: c["name"] for c in self.store.clusters()}
        return {cid: folder_name(cid, names[cid]) for cid in self.store.people_with_faces() if cid in names}

    def update(self) -> None:
        folders = self._now()
        if self._folders is None:  # start-up: what is there now is the baseline
            self._folders, self._assign = folders, self.store.cluster_assignments()
            return
        if folders == self._folders:
            return
        before, old = self._folders, self._assign
        assign = self.store.cluster_assignments()
        faces_of: dict[int, list[int]] = defaultdict(list)
        for f, c in old.items():
            if c is not None:
                faces_of[c].append(f)
        for cid in sorted(set(folders) & set(before)):
            if folders[cid] != before[cid]:
                log.info("person folder renamed: %s -> %s", before[cid], folders[cid])
        for cid in sorted(set(before) - set(folders)):
            went = Counter(assign.get(f) for f in faces_of.get(cid, ()) if assign.get(f) in folders)
            if went:
                log.info("person folder %s merged into %s", before[cid], folders[went.most_common(1)[0][0]])
            else:
                log.info("person folder removed: %s (its photos are gone or doubtful)", before[cid])
        for cid in sorted(set(folders) - set(before)):
            came = Counter(old.get(f) for f, c in assign.items() if c == cid and old.get(f) in before)
            if came:
                log.info("person folder %s split off %s", folders[cid], before[came.most_common(1)[0][0]])
            else:
                log.info("person folder created: %s", folders[cid])
        self._folders, self._assign = folders, assign
