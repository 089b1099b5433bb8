"""Pipeline: the Python API that moves photos through ingest -> encode -> store -> cluster -> output.

`organizer scan` calls :meth:`Organizer.scan`; the service (service.py) calls :meth:`Organizer.process`
with the paths the watcher reports and :meth:`Organizer.scan` for periodic rescans.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cluster import FaceAssignment, assign_clusters, batch_labels
from .config import Settings
from .encode import EncoderPool
from .ingest import IngestError, check_readable, discover, is_candidate, sha256_file
from .output import reconcile
from .store import Store

log = logging.getLogger(__name__)

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

    def close(self) -> None:
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
        found: list[Path] = []
        now = time.time()
        for path in discover(self.watch, self.excluded()):
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
        vanished = [p for p in known if p not in seen]
        if vanished:
            self.store.remove_photos(vanished)
            report.removed = len(vanished)
            log.info("removed %d photos that are no longer in the watched folder", len(vanished))
        self.process(found, progress=progress, stop=stop, report=report)
        self._retry_failed = False
        if not found:
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
        known = self.store.photo_states()
        todo = []
        for path in paths:
            path = Path(os.path.abspath(path))
            if not is_candidate(path):
                continue
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
            self.refresh()
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
            self.refresh()
        return len(gone)

    # ---- clustering + output ---------------------------------------------------------------
    def recluster(self) -> None:
        """Recompute clusters from every stored encoding (batch DBSCAN), keeping ids stable."""
        c = self.settings.clustering
        d = self.settings.detection
        ids, shas, enc, sharp, size = self.store.usable_encodings(d.min_face_size, d.min_sharpness)
        labels = batch_labels(enc, c.eps, c.min_samples)
        previous = self.store.cluster_assignments()
        result = assign_clusters(
            ids, shas, enc, labels, previous, self.store.next_cluster_id(), c.doubt_margin, sharp, size
        )
        assignments = dict(result.assignments)
        # faces too small or blurred to trust: doubtful, with their nearest person as a hint
        clustered_ids = [fid for fid, a in assignments.items() if a.cluster_id is not None and not a.doubtful]
        unusable = [f for f in self.store.faces() if f.id not in assignments]
        if unusable:
            hint = self._nearest_cluster(unusable, clustered_ids, assignments)
            for f in unusable:
                assignments[f.id] = FaceAssignment(
                    None, True, "face too small or too blurred to recognise reliably", hint.get(f.id)
                )
        self.store.save_clustering(
            {fid: (a.cluster_id, a.doubtful, a.reason, a.nearest_cluster) for fid, a in assignments.items()},
            result.clusters,
            result.next_id,
        )

    def _nearest_cluster(self, faces, clustered_ids, assignments) -> dict[int, int]:
        if not clustered_ids:
            return {}
        ref = self.store.encodings_for(clustered_ids)
        keys = list(ref)
        mat = np.stack([ref[k] for k in keys])
        mine = self.store.encodings_for(f.id for f in faces)
        out = {}
        for fid, vec in mine.items():
            j = int(np.argmin(np.linalg.norm(mat - vec, axis=1)))
            out[fid] = assignments[keys[j]].cluster_id
        return out

    def refresh(self) -> None:
        """Update clusters and reconcile the output tree with the store."""
        self.recluster()
        self.reconcile()

    def reconcile(self):
        s = self.settings
        return reconcile(self.store, self.output, s.service.link_mode, s.detection.max_pixels)
