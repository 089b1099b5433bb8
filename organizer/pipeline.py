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

from .clustering import Clustering
from .config import Settings
from .encode import encoder_id
from .executors import make_encoder
from .ingest import IngestError, check_readable, discover, is_candidate, sha256_file
from .output import reconcile
from .reencode import EncodingUpgrade
from .store import PhotoFile, Store

log = logging.getLogger(__name__)

# Inside a batch the folders are updated as photos finish, at most every this many seconds and
# every PARTIAL_REFRESH_SHARE times the last update's cost: the writer spends at most ~1/5 of its
# time on them, so it never holds the encoders back, however large the tree.
PARTIAL_REFRESH_SECONDS = 1.0
PARTIAL_REFRESH_SHARE = 4.0

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


class Organizer:
    """Runs the stages over one store: finds photos, has them ingested, encoded and stored, then
    has the clustering (:class:`~organizer.clustering.Clustering`) and the output tree updated.
    Not thread-safe: call it from one thread."""

    def __init__(self, settings: Settings, store: Store, workers: int | None = None):
        self.settings = settings
        self.store = store
        self.watch = Path(os.path.abspath(settings.paths.watch)) if settings.paths.watch else None
        self.output = Path(os.path.abspath(settings.paths.output))
        n = settings.service.workers if workers is None else workers
        sv = settings.service
        self.encoder = make_encoder(settings.detection_settings(), n or (os.cpu_count() or 1), sv.executor, sv.scheduler)
        self._retry_failed = True  # failed files are retried once per start-up
        self.clustering = Clustering(store, settings, encoder_id(self.encoder.settings))
        self.encodings = EncodingUpgrade(store, self.encoder, self.watch, on_done=self.clustering.discard_state)
        self._refreshed_at, self._refresh_cost = time.monotonic(), 0.0  # see PARTIAL_REFRESH_SECONDS

    def close(self) -> None:
        self.clustering.save()
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
            # the next batch too: the workers encode it while this one is committed and the tree updated
            self.encoder.prefetch(todo[start : start + 2 * batch_size], self._readable)
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
                self.store.record_duplicate(PhotoFile(str(path), st.st_size, st.st_mtime), sha)
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
            self.store.record_encoded(PhotoFile(str(result.path), size, mtime), sha, result)
            report.encoded += 1
            log.info("encoded %s: %d face(s)", result.path, len(result.faces))
            since = time.monotonic() - self._refreshed_at
            if since >= max(PARTIAL_REFRESH_SECONDS, PARTIAL_REFRESH_SHARE * self._refresh_cost):
                self.refresh(verify=False)  # folders update as photos finish, not only per batch
        for path in later:
            sha, size, mtime = to_encode[path]
            if self.store.known_sha(sha):
                self.store.record_duplicate(PhotoFile(str(path), size, mtime), sha)
                report.duplicates += 1
            else:
                self._fail(path, self.store.error_of(str(first_of[sha])) or "could not be decoded", report, size, mtime)

    def _readable(self, path: Path) -> bool:
        """May the encoders read this file ahead of its batch (see check_readable)?"""
        try:
            check_readable(path, self.watch or path.parent)
        except IngestError:
            return False
        return True

    def _fail(self, path: Path, reason: str, report: ScanReport, size: int = 0, mtime: float = 0.0) -> None:
        if not size:
            try:
                st = os.lstat(path)
                size, mtime = st.st_size, st.st_mtime
            except OSError:
                pass
        log.warning("cannot use %s: %s", path, reason)
        self.store.record_failure(PhotoFile(str(path), size, mtime), reason)
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
    def upgrade_encodings(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Re-encode the stored faces if another encoder made them (see :class:`EncodingUpgrade`);
        False if ``stop()`` interrupted it."""
        return self.encodings.run(stop)

    def recluster(self) -> None:
        """Batch DBSCAN over every usable face, people derived from scratch (ids stay stable)."""
        self.upgrade_encodings()
        self.clustering.recluster()

    def refresh(self, verify: bool = True) -> None:
        """Update clusters (incrementally) and reconcile the output tree with the store
        (``verify``: check every entry on disk too, see :func:`organizer.output.reconcile`)."""
        t0 = time.monotonic()
        self.upgrade_encodings()  # before any clustering: distances compare like with like
        self.clustering.update()
        self.reconcile(verify)
        self._refreshed_at = time.monotonic()
        self._refresh_cost = self._refreshed_at - t0

    def reconcile(self, verify: bool = True):
        s = self.settings
        return reconcile(self.store, self.output, s.service.link_mode, s.detection.max_pixels, verify)
