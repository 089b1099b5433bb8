"""Pipeline: the Python API that moves photos through ingest -> encode -> store -> cluster -> output.

`organizer scan` calls :meth:`Organizer.scan`; the service (service.py) calls :meth:`Organizer.process`
with the paths the watcher reports and :meth:`Organizer.scan` for periodic rescans.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cluster import REASON_UNUSABLE, ClusterResult, Neighbours, average_linkage_split, People, batch_labels
from .constraints import Constraints
from .incremental_dbscan import IncrementalDBSCAN, load_arrays, load_state, save_arrays, save_state

from .config import Settings
from .encode import EncoderPool, encoder_id
from .ingest import IngestError, check_readable, discover, is_candidate, sha256_file
from .output import reconcile
from .store import ENCODER, REENCODING, Store

log = logging.getLogger(__name__)

# Photos re-encoded per commit when a store is upgraded to another encoder (a crash loses at most these).
REENCODE_CHUNK = 256

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class ScanReport:
    seen: int = 0
    new: int = 0
    encoded: int = 0
    duplicates: int = 0
    failed: int = 0
    removed: int = 0
    unsettled: list[Path] = field(default_factory=list)


def has_entries(folder: Path) -> bool:
    """False for an empty folder, and for one that is missing or cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


def _quality(sharpness: float, size: float) -> float:
    """How good a face is as a folder's representative: sharp and large."""
    return float(np.log1p(sharpness) + np.log1p(size))


class Organizer:
    """One organizer over one store. Not thread-safe: call it from one thread."""

    def __init__(self, settings: Settings, store: Store, workers: int | None = None):
        self.settings = settings
        self.store = store
        self.watch = Path(os.path.abspath(settings.paths.watch)) if settings.paths.watch else None
        self.output = Path(os.path.abspath(settings.paths.output))
        n = settings.service.workers if workers is None else workers
        self.encoder = EncoderPool(settings.detection_settings(), n or (os.cpu_count() or 1))
        self._retry_failed = True  # failed files are retried once per start-up
        self._engine: IncrementalDBSCAN | None = None  # built from the store on first use
        self._people: People | None = None
        self._meta: dict[int, tuple[str, float]] = {}  # usable face -> (photo sha256, quality)
        self._constraints: Constraints | None = None  # the user's corrections (people layer, last step)

    def close(self) -> None:
        self.save_engine()
        self.encoder.close()

    # ---- discovery -------------------------------------------------------------------------
    def excluded(self) -> list[Path]:
        """Folders under the watched tree the organizer must never read as input."""
        return [self.output, Path(os.path.abspath(self.store.path)).parent]

    def scan(
        self,
        progress: Progress | None = None,
        stop: Callable[[], bool] = lambda: False,
        settle_seconds: float = 0.0,
    ) -> ScanReport:
        """Full pass: process new/changed photos, forget vanished ones, update the tree.

        Files modified less than ``settle_seconds`` ago are not processed but returned in
        ``report.unsettled`` (the service hands them to its settler).
        """
        if self.watch is None:
            raise ValueError("no folder to watch: set --watch or paths.watch")
        if not self.watch.is_dir():
            raise FileNotFoundError(f"the watched folder {self.watch} does not exist")
        report = ScanReport()
        known = self.store.photo_states()
        if known and not has_entries(self.watch):
            # an empty mount point: its disk is not mounted. Forgetting every photo would also
            # lose every name given to a person; keep all until the folder has files again.
            log.error("the watched folder %s is empty but the store knows %d photos in it: assuming its disk "
                      "is not mounted, nothing is forgotten (if you really removed every photo, delete the "
                      "store %s)", self.watch, len(known), self.store.path)
            self.refresh()
            return report
        found: list[Path] = []
        unreadable: list[Path] = []
        now = time.time()
        for path in discover(self.watch, self.excluded(), unreadable):
            report.seen += 1
            if settle_seconds:
                try:
                    if now - os.lstat(path).st_mtime < settle_seconds:
                        report.unsettled.append(path)
                        known.pop(str(path), None)
                        continue
                except OSError:
                    pass
            found.append(path)
        seen = {str(p) for p in found} | {str(p) for p in report.unsettled}
        # photos in a folder that could not be listed are out of reach, not gone
        hidden = tuple(str(u).rstrip(os.sep) + os.sep for u in unreadable)
        vanished = [p for p in known if p not in seen and not p.startswith(hidden)]
        if vanished:
            self.store.remove_photos(vanished)
            report.removed = len(vanished)
            log.info("removed %d photos that are no longer in the watched folder", len(vanished))
        self.process(found, progress=progress, stop=stop, report=report)
        self._retry_failed = False
        if not stop():
            # also when nothing changed: finishes an update a crash interrupted and puts back
            # links someone deleted by hand (only the organizer's own entries)
            self.refresh()
        return report

    # ---- processing ------------------------------------------------------------------------
    def process(
        self,
        paths: Iterable[Path],
        progress: Progress | None = None,
        stop: Callable[[], bool] = lambda: False,
        report: ScanReport | None = None,
    ) -> ScanReport:
        """Process candidate photos (new or changed ones; known unchanged ones are skipped).

        Results are committed photo by photo as they arrive, clusters and the output tree once
        per batch. ``stop()`` is checked between batches: the current batch is always finished.
        """
        report = report or ScanReport()
        if not self.upgrade_encodings(stop):  # before new faces join the old ones
            return report
        paths = [p for p in (Path(os.path.abspath(p)) for p in paths) if is_candidate(p)]
        known = self.store.photo_states(str(p) for p in paths)
        todo = []
        for path in paths:
            try:
                st = os.stat(path)
                state = known.get(str(path))
                if state and state[0] == st.st_size and state[1] == st.st_mtime:
                    if state[2] == "ok" or not self._retry_failed:
                        continue
            except OSError:
                pass  # check_readable reports it properly below
            todo.append(path)
        report.new += len(todo)
        total = len(todo)
        done = 0
        if progress:
            progress(0, total)
        batch_size = self.settings.service.batch_size
        for start in range(0, total, batch_size):
            if stop():
                log.info("stop requested: %d photos left for the next run", total - done)
                break
            batch = todo[start : start + batch_size]
            self._process_batch(batch, report, lambda: progress and progress(done + 1, total))
            done += len(batch)
            if progress:
                progress(done, total)
            self.refresh(verify=False)  # a scan verifies the whole tree once at its end
        return report

    def _process_batch(self, batch: list[Path], report: ScanReport, tick) -> None:
        to_encode: dict[Path, tuple[str, int, float]] = {}
        for path in batch:
            try:
                st = check_readable(path, self.watch or path.parent)
                sha = sha256_file(path)
            except IngestError as exc:
                self._fail(path, str(exc), report)
                continue
            if self.store.known_sha(sha):
                self.store.record_batch([], [(str(path), sha, st.st_size, st.st_mtime)], [])
                report.duplicates += 1
                continue
            to_encode[path] = (sha, st.st_size, st.st_mtime)
        # identical bytes under two names in one batch: encode the first, link the rest after it
        first_of: dict[str, Path] = {}
        later: list[Path] = []
        for path, (sha, _, _) in to_encode.items():
            if sha in first_of:
                later.append(path)
            else:
                first_of[sha] = path
        for result in self.encoder.map(first_of.values()):
            sha, size, mtime = to_encode[result.path]
            if result.error:
                self._fail(result.path, result.error, report, size, mtime)
                continue
            self.store.record_batch([(str(result.path), sha, size, mtime, result)], [], [])
            report.encoded += 1
            log.info("encoded %s: %d face(s)", result.path, len(result.faces))
        for path in later:
            sha, size, mtime = to_encode[path]
            if self.store.known_sha(sha):
                self.store.record_batch([], [(str(path), sha, size, mtime)], [])
                report.duplicates += 1
            else:
                self._fail(path, self.store.error_of(str(first_of[sha])) or "could not be decoded", report, size, mtime)

    def _fail(self, path: Path, reason: str, report: ScanReport, size: int = 0, mtime: float = 0.0) -> None:
        if not size:
            try:
                st = os.lstat(path)
                size, mtime = st.st_size, st.st_mtime
            except OSError:
                pass
        log.warning("cannot use %s: %s", path, reason)
        self.store.record_batch([], [], [(str(path), size, mtime, reason)])
        report.failed += 1

    def forget(self, paths: Iterable[Path]) -> int:
        """Drop photos whose originals were deleted or moved away, then update the tree."""
        known = self.store.photo_states()
        gone = [str(p) for p in paths if str(p) in known and not os.path.lexists(p)]
        # a deleted folder: forget everything under it
        for p in paths:
            prefix = str(p).rstrip("/") + "/"
            gone += [k for k in known if k.startswith(prefix) and not os.path.lexists(k)]
        gone = sorted(set(gone))
        if gone:
            self.store.remove_photos(gone)
            log.info("forgot %d removed photo(s)", len(gone))
            self.refresh(verify=False)
        return len(gone)

    # ---- clustering + output ---------------------------------------------------------------
    def recluster(self) -> None:
        """Batch: scikit-learn DBSCAN over every usable face, people derived from scratch.

        The reference for the incremental engine and a repair tool; ids stay stable.
        """
        self.upgrade_encodings()
        c, d = self.settings.clustering, self.settings.detection
        ids, shas, enc, sharp, size = self.store.usable_encodings(d.min_face_size, d.min_sharpness)
        t0 = time.monotonic()
        labels = batch_labels(enc, c.eps, c.min_samples)
        log.info("batch DBSCAN (scikit-learn) over %d faces: %d clusters in %.1f s", len(ids),
                 len(set(labels.tolist()) - {-1}), time.monotonic() - t0)
        clusters = {int(lab): ids[labels == lab].tolist() for lab in np.unique(labels) if lab >= 0}
        index = Neighbours(ids, enc)
        row = {int(f): i for i, f in enumerate(ids)}
        people = People(c, average_linkage_split if c.linkage_threshold > 0 else None)
        result = people.derive(
            clusters,
            vec=lambda f: enc[row[f]],
            photo=lambda f: shas[row[f]],
            quality=lambda f: _quality(sharp[row[f]], size[row[f]]),
            within_many=index.within_many,
            all_faces=ids.tolist(),
            previous={f: a[0] for f, a in self.store.raw_assignments().items()},
            next_id=self.store.next_cluster_id(),
        )
        self._constraints = Constraints(self.store)
        self._save(result, full=True, unusable_hint=lambda v, r: index.within_many(v[None, :], r)[0], cid=people.cid,
                   people=people, vecs=lambda keys: enc[[row[f] for f in keys]],
                   quality=lambda f: _quality(sharp[row[f]], size[row[f]]))
        self._engine = None  # the incremental state is rebuilt from the store on next use
        self._people = None

    def update_clusters(self) -> None:
        """Incremental: feed new and removed faces to the DBSCAN engine, re-derive what changed."""
        c, d = self.settings.clustering, self.settings.detection
        if self._engine is None:
            self._start_engine()
            return
        engine, people = self._engine, self._people
        # what changed since the last update, without an O(faces) query: new faces have higher
        # ids (ids only grow), deleted ones are logged by a trigger in the store
        top = self.store.max_face_id()
        added = sorted(self.store.usable_ids(d.min_face_size, d.min_sharpness, after=self._seen_face_id))
        self._seen_face_id = max(self._seen_face_id, top)
        deleted = sorted(f for f in self.store.take_removed_faces() if f in self._meta)
        if not added and not deleted and not self.store.unassigned_faces():
            return
        touched_faces: set[int] = set()
        touched_labels: set[int] = set()
        if deleted:
            upd = engine.delete(deleted)
            touched_faces |= upd.changed_keys
            touched_labels |= upd.touched_labels
            for f in deleted:
                self._meta.pop(f, None)
        if added:
            ids, shas, enc, sharp, size = self.store.faces_by_id(added)
            for i, f in enumerate(ids.tolist()):
                self._meta[f] = (shas[i], _quality(sharp[i], size[i]))
            upd = engine.insert(ids.tolist(), enc)
            touched_faces |= upd.changed_keys
            touched_labels |= upd.touched_labels
        touched_faces = {f for f in touched_faces if f in engine}
        result = people.derive(
            {lab: m for lab in sorted(touched_labels) if (m := engine.members(lab))},
            vec=engine.vector,
            photo=lambda f: self._meta[f][0],
            quality=lambda f: self._meta[f][1],
            within_many=engine.within_many,
            vecs=engine.vectors,
            all_faces=engine,  # `in` is all derive needs of it
            previous=people.cid,  # read before it changes; no O(n) copy per update
            next_id=self.store.next_cluster_id(),
            touched_faces=touched_faces,
            removed_faces=deleted,
        )
        self._save(result, full=False, unusable_hint=engine.within, cid=people.cid, **self._people_args())

    def _fingerprint(self) -> str:
        """Settings that shape the clustering: a saved clustering made with others is redone."""
        c, d = self.settings.clustering, self.settings.detection
        return "clean:" + json.dumps([c.model_dump(), d.min_face_size, d.min_sharpness,
                                      encoder_id(self.encoder.settings)], sort_keys=True)

    def upgrade_encodings(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Re-encode the stored faces when they were made by another encoder (an older version,
        or other encoding settings), so that every distance compares like with like. Returns
        False if ``stop()`` interrupted it (it resumes where it stopped at the next call).

        Faces keep their ids, boxes and people (the clustering is then redone, ids matched by
        overlap as usual); only the 128-d vectors change. Work is committed every
        REENCODE_CHUNK photos, so an interruption loses at most one chunk. A photo that cannot be
        read now is forgotten, and a later scan encodes it afresh if it is still there. Runs
        once: the store records which encoder made its faces.
        """
        want = encoder_id(self.encoder.settings)
        have = self.store.get_meta(ENCODER)
        if have == want:
            return True
        images = self.store.faces_by_image()  # in sha256 order: the order progress is kept in
        saved = json.loads(self.store.get_meta(REENCODING) or "{}")
        after = saved.get("after", "") if saved.get("encoder") == want else ""
        todo = [img for img in images if img[0] > after and img[1]]
        if todo:
            log.warning("the store's faces were encoded by %s; re-encoding them with %s (once; %d of %d photos "
                        "to go)", have or "an earlier version", want, len(todo), len(images))
            t0, n_done = time.monotonic(), 0
            for start in range(0, len(todo), REENCODE_CHUNK):
                if stop():
                    log.info("re-encoding interrupted after %d photos; it resumes at the next start", start)
                    return False
                part = todo[start : start + REENCODE_CHUNK]
                ids_of = {paths[0]: ids for _, paths, ids, _ in part}
                done, lost = {}, []
                for path, encs, error in self.encoder.reencode([(Path(paths[0]), boxes) for _, paths, _, boxes in part]):
                    if encs is None:
                        log.warning("cannot re-encode %s (%s): forgotten, a later scan encodes it again", path, error)
                        lost.append(str(path))
                    else:
                        done.update(zip(ids_of[str(path)], encs))
                if not done:
                    # nothing readable at all: an unmounted disk, not photos to forget
                    raise FileNotFoundError(f"cannot read any photo to re-encode its faces (is {self.watch} "
                                            "mounted?); nothing more was changed, it is tried again at the next scan")
                self.store.set_encodings(done, progress=json.dumps({"encoder": want, "after": part[-1][0]}))
                if lost:
                    self.store.remove_photos(p for _, paths, _, _ in part if paths[0] in lost for p in paths)
                n_done += len(done)
            log.info("re-encoded %d faces in %.1f s", n_done, time.monotonic() - t0)
        # the saved states hold the old vectors: rebuilding beats patching every point
        self._engine = None
        for state in (self.engine_state_path, self.people_state_path):
            state.unlink(missing_ok=True)
        self.store.set_meta(ENCODER, want)
        self.store.delete_meta(REENCODING)
        return True

    def _start_engine(self) -> None:
        """Build the engine from the store (start-up); re-derive people only if the saved
        clustering is stale (a crash between two commits, or changed settings)."""
        self.upgrade_encodings()
        c, d = self.settings.clustering, self.settings.detection
        self.store.take_removed_faces()  # the engine is reconciled with every face below
        self._seen_face_id = self.store.max_face_id()
        ids, shas, enc, sharp, size = self.store.usable_encodings(d.min_face_size, d.min_sharpness)
        self._engine = self._load_engine(ids, enc)
        self._meta = {int(f): (shas[i], _quality(sharp[i], size[i])) for i, f in enumerate(ids)}
        self._people = People(c, average_linkage_split if c.linkage_threshold > 0 else None)
        if self.store.clustering_clean(self._fingerprint()):
            t0 = time.monotonic()
            reused = self._people.load(self.store.raw_assignments(), self._meta, self._engine.vector,
                                       self._engine.within_many, vecs=self._engine.vectors,
                                       near=load_arrays(self.people_state_path))
            log.info("people loaded from the store in %.1f s (nearest faces %s)", time.monotonic() - t0,
                     "from the saved state" if reused else "recomputed")
            self._constraints = Constraints(self.store)
            self._constraints.load(self.store.cluster_assignments(), self.store.auto_assignments())
            # corrections made while nothing held the engine (the CLI, the folders at start-up)
            self._apply_groups(self._constraints.affected_groups(self._people.cid))
            return
        result = self._people.derive(
            self._engine.clusters(),
            vec=self._engine.vector,
            photo=lambda f: self._meta[f][0],
            quality=lambda f: self._meta[f][1],
            within_many=self._engine.within_many,
            vecs=self._engine.vectors,
            all_faces=ids.tolist(),
            previous={f: a[0] for f, a in self.store.raw_assignments().items()},
            next_id=self.store.next_cluster_id(),
        )
        self._constraints = Constraints(self.store)
        self._save(result, full=True, unusable_hint=self._engine.within, cid=self._people.cid, **self._people_args())

    @property
    def engine_state_path(self) -> Path:
        return Path(str(self.store.path) + ".engine.npz")

    def _load_engine(self, ids: np.ndarray, enc: np.ndarray) -> IncrementalDBSCAN:
        """The engine for the store's faces: the saved state brought up to date (faces added or
        removed since it was saved are inserted/deleted), or a full build when there is none."""
        c = self.settings.clustering
        eng = load_state(self.engine_state_path, c.eps, c.min_samples)
        if eng is not None:
            row = {int(f): i for i, f in enumerate(ids)}
            stale = []
            for key in list(eng._row):
                i = row.get(key)
                # a face id SQLite reused for another face counts as removed + added
                if i is None or not np.array_equal(eng.vector(key), enc[i]):
                    stale.append(key)
            eng.delete(stale)
            new = [i for i, f in enumerate(ids.tolist()) if f not in eng._row]
            if new:
                eng.insert(ids[new].tolist(), enc[new])
            log.info("clustering state loaded (%d faces; %d removed, %d added since it was saved)",
                     len(eng), len(stale), len(new))
            return eng
        t0 = time.monotonic()
        eng = IncrementalDBSCAN.build(c.eps, c.min_samples, ids.tolist(), enc)
        log.info("clustering state built from the store in %.1f s (%d faces)", time.monotonic() - t0, len(ids))
        return eng

    @property
    def people_state_path(self) -> Path:
        return Path(str(self.store.path) + ".people.npz")

    def save_engine(self) -> None:
        """Persist the engine and the people layer's nearest faces, so the next start need not
        recompute them (called at shutdown; both are verified against the store when loaded)."""
        if self._engine is not None:
            try:
                save_state(self._engine, self.engine_state_path)
                near = self._people.near_state()
                save_arrays(self.people_state_path, lambda fh: np.savez(fh, **near))
            except OSError as exc:
                log.warning("could not save the clustering state: %s", exc)

    def _people_args(self) -> dict:
        """What the corrections step needs of the incremental state (see :meth:`_save`)."""
        return {"people": self._people, "vecs": self._engine.vectors, "quality": lambda f: self._meta[f][1]}

    def apply_corrections(self) -> bool:
        """Re-read the user's corrections and redo the people they touch (after one was recorded,
        by this process or another). True if anything had to be redone."""
        if self._engine is None:
            self._start_engine()  # applies the corrections as they are now
            return True
        groups = self._constraints.reload_rules(self._people.cid)
        if groups is None:
            return False
        self._apply_groups(groups)
        return True

    def _apply_groups(self, groups) -> None:
        self._save(ClusterResult(next_id=self.store.next_cluster_id()), full=False, unusable_hint=self._engine.within,
                   cid=self._people.cid, groups=groups, **self._people_args())

    def _save(self, result, full: bool, unusable_hint, cid, people=None, vecs=None, quality=None, groups=()) -> None:
        """Store a clustering result, plus doubt for faces too small or blurred to cluster.

        With ``people`` (the people layer the result came from) the user's corrections are applied
        to it first (:class:`organizer.constraints.Constraints`; ``groups``: raw groups to redo)."""
        d = self.settings.detection
        auto: dict = {}
        if people is not None:
            result, auto = self._constraints.apply(result, people, vecs, quality, full, groups)
        assignments = {
            f: (a.cluster_id, a.doubtful, a.reason, a.nearest_cluster) for f, a in result.assignments.items()
        }
        # incremental: only faces not yet given a reason (no O(faces) query per update)
        ids, _, enc, _, _ = self.store.usable_encodings(d.min_face_size, d.min_sharpness, usable=False,
                                                        pending=not full)
        for i, f in enumerate(ids.tolist()):
            near, dist = unusable_hint(enc[i], self.settings.clustering.eps)
            best = sorted((dd, cid[g]) for g, dd in zip(near.tolist(), dist.tolist()) if cid.get(g) is not None)
            assignments[f] = (None, True, REASON_UNUSABLE, best[0][1] if best else None)
        if people is not None:  # a face too small to cluster that the user placed goes where told
            rules = self._constraints.rules
            for f in [f for f in rules.faces() if f not in people.cid]:
                p = rules.resolve(rules.anchor.get(f))
                assignments[f] = (p, False, None, p) if p is not None else (None, True, REASON_UNUSABLE, None)
        with self.store.db.atomic():
            self.store.save_clustering(
                assignments, result.clusters, result.removed, result.next_id, full=full, fingerprint=self._fingerprint()
            )
            self.store.save_corrected(auto)

    def refresh(self, verify: bool = True) -> None:
        """Update clusters (incrementally) and reconcile the output tree with the store
        (``verify``: check every entry on disk too, see :func:`organizer.output.reconcile`)."""
        self.update_clusters()
        self.reconcile(verify)

    def read_tree_edits(self, tops=None, apply: bool = True) -> bool:
        """Record what the user changed in the person folders (all of them, or the ``tops``
        top-level folders) as corrections and apply them (unless not ``apply``: a recluster
        follows); before any tree update, which would otherwise put moved links back. True if a
        correction was made."""
        from .tree_edits import TreeEdits

        report = TreeEdits(self.store, self.output).interpret(tops)
        if report.corrections and apply:
            self.apply_corrections()
        return bool(report.corrections)

    def reconcile(self, verify: bool = True, tops=()):
        """Update the tree; the user's changes in it are read first (``verify``: in every folder,
        otherwise in the ``tops`` folders the service saw change)."""
        self.read_tree_edits(None if verify else tops)
        s = self.settings
        return reconcile(self.store, self.output, s.service.link_mode, s.detection.max_pixels, verify)
