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
from .executors import encoder_for
from .ingest import IngestError, check_readable, sha256_file
from .known import KnownPeople
from .layout import Layout, WatchState
from .library import Library
from .reencode import EncodingUpgrade
from .output import CROPS
from .store import PhotoFile, Store
from .tree import OutputTree

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
    # (path, size, mtime as read) of recent files that read as incomplete: a copy that paused
    # longer than the settle time; the service holds them until they change (or age)
    incomplete: list[tuple[Path, int, float]] = field(default_factory=list)
    # photos a scan would have forgotten but did not: more than service.max_forget_share of the
    # library at once (see Organizer.scan), or the watched folder was not available
    kept: int = 0
    unavailable: WatchState | None = None
    tree_failed: int = 0  # output entries that could not be made or removed at the end
    tree_reasons: dict[str, int] = field(default_factory=dict)  # why (strerror) -> how many


class Organizer:
    """Runs the stages over one store: finds photos, has them ingested, encoded and stored, then
    has the clustering (:class:`~organizer.clustering.Clustering`) and the output tree updated.
    Not thread-safe: call it from one thread."""

    def __init__(self, settings: Settings, store: Store, workers: int | None = None, encoder=None):
        """``encoder``: one already made (and perhaps started) by :func:`~organizer.executors.encoder_for`;
        otherwise one is made here with ``workers`` processes."""
        self.settings = settings
        self.store = store
        sv = settings.service
        self.watch = Path(os.path.abspath(settings.paths.watch)) if settings.paths.watch else None
        self.output = Path(os.path.abspath(settings.paths.output))
        self.encoder = encoder or encoder_for(settings, workers)
        self._retry_failed = True  # failed files are retried once per start-up
        self.clustering = Clustering(store, settings, encoder_id(self.encoder.settings))
        self.encodings = EncodingUpgrade(store, self.encoder, self.watch, on_done=self.clustering.discard_state)
        self.known = KnownPeople(store, settings, self.encoder, encoder_id(self.encoder.settings))
        self.layout = Layout(self.watch, self.output, Path(os.path.abspath(store.path)),
                             Path(os.path.abspath(settings.paths.known)) if settings.paths.known else None)
        self.library = Library(store, self.layout, self.watch, sv.max_forget_share)
        self.tree = OutputTree(store, self.output, sv.link_mode, settings.detection.max_pixels, self.apply_corrections)
        self._refreshed_at, self._refresh_cost = time.monotonic(), 0.0  # see PARTIAL_REFRESH_SECONDS

    def close(self) -> None:
        self.clustering.save()
        self.encoder.close()

    # ---- discovery -------------------------------------------------------------------------
    def scan(
        self,
        progress: Progress | None = None,
        stop: Callable[[], bool] = lambda: False,
        settle_seconds: float = 0.0,
        forget_anyway: bool = False,
    ) -> ScanReport:
        """Full pass: process new/changed photos, forget vanished ones, update the tree.

        Files modified less than ``settle_seconds`` ago are not processed but returned in
        ``report.unsettled`` (the service hands them to its settler). Nothing is forgotten when
        the watched folder is not available (``report.unavailable``), nor when more than
        ``service.max_forget_share`` of the known photos would go at once unless
        ``forget_anyway`` (``report.kept``): a layout or mount mistake, not a deletion.
        """
        if self.watch is None:
            raise ValueError("no folder to watch: set --watch or paths.watch")
        self.tree.logged.clear()  # each failing output entry is logged once per scan
        report = ScanReport()
        known = self.store.photo_states()
        state = self.layout.watch_state(bool(known))
        if state is not WatchState.AVAILABLE:
            if not known:
                raise FileNotFoundError(f"the watched folder {self.watch} does not exist or cannot be listed")
            log.error("%s", self.layout.unavailable_message(state, len(known)))
            report.unavailable, report.kept = state, len(known)
            self._finish(report, verify=True)
            return report
        listing = self.library.listing(known, settle_seconds)
        report.seen = len(listing.found) + len(listing.unsettled)
        report.unsettled = listing.unsettled
        report.removed, report.kept = self.library.forget_vanished(known, listing, forget_anyway)
        self.process(listing.found, progress=progress, stop=stop, report=report, settle_seconds=settle_seconds)
        self._retry_failed = False
        if not stop():
            # also when nothing changed: finishes an update a crash interrupted and puts back
            # links someone deleted by hand (only the organizer's own entries)
            self._finish(report, verify=True)
        return report

    def _finish(self, report: ScanReport, verify: bool) -> None:
        """Update clusters and the tree; the tree's failures go into ``report``."""
        self.refresh(verify)
        tree = self.tree.last
        if tree is not None:
            report.tree_failed = len(tree.errors)
            report.tree_reasons = dict(getattr(tree, "reasons", {}) or {})

    # ---- processing ------------------------------------------------------------------------
    def process(
        self,
        paths: Iterable[Path],
        progress: Progress | None = None,
        stop: Callable[[], bool] = lambda: False,
        report: ScanReport | None = None,
        settle_seconds: float = 0.0,
    ) -> ScanReport:
        """Process photos (new or changed ones; known unchanged ones, and paths that are not input
        by :meth:`Layout.is_input`, are skipped).

        Results are committed photo by photo as they arrive, clusters and the output tree once
        per batch. ``stop()`` is checked between photos: the photos being encoded are finished
        and committed, the rest is left for the next run. With ``settle_seconds`` (the service),
        a recently written file that reads as incomplete is not a failure but is handed back in
        ``report.unsettled`` (a slow copy that paused longer than the settle time).
        """
        report = report or ScanReport()
        if not self.upgrade_encodings(stop):  # before new faces join the old ones
            return report
        todo = self.library.to_process(paths, self._retry_failed)
        report.new += len(todo)
        total = len(todo)
        done = [0]
        if progress:
            progress(0, total)

        def tick() -> None:
            done[0] += 1
            if progress:
                progress(done[0], total)

        batch_size = self.settings.service.batch_size
        for start in range(0, total, batch_size):
            if stop():
                break
            batch = todo[start : start + batch_size]
            # the next batch too: the workers encode it while this one is committed and the tree updated
            ahead = todo[start if start == 0 else start + batch_size : start + 2 * batch_size]
            self.encoder.prefetch(self._encodable(ahead))
            self._process_batch(batch, report, tick, stop, settle_seconds)
            self.refresh(verify=False)  # a scan verifies the whole tree once at its end
        if done[0] < total:
            log.info("stop requested: %d photos left for the next run", total - done[0])
        return report

    def _encodable(self, paths: list[Path]) -> list[Path]:
        """The paths that pass :func:`check_readable`: only those may reach the workers, also
        ahead of time (a symlink out of the watched folder is never read; a FIFO never opened).
        Copies of a photo the store knows, or of one already in the list, are left out: encoding
        them ahead would be wasted (a folder of copies would be encoded in full)."""
        out, seen = [], set()
        for path in paths:
            try:
                check_readable(path, self.watch or path.parent)
                sha = sha256_file(path)
            except IngestError:
                continue  # _process_batch records why
            if sha not in seen and not self.store.known_sha(sha):
                seen.add(sha)
                out.append(path)
        return out

    def _process_batch(self, batch: list[Path], report: ScanReport, tick: Callable[[], None],
                       stop: Callable[[], bool] = lambda: False, settle_seconds: float = 0.0) -> None:
        to_encode: dict[Path, tuple[str, int, float]] = {}
        for path in batch:
            if stop():
                return
            try:
                st = check_readable(path, self.watch or path.parent)
                sha = sha256_file(path)
            except IngestError as exc:
                self.library.fail(path, str(exc), report, settle_seconds=settle_seconds)
                tick()
                continue
            if self.store.known_sha(sha):
                self.store.record_duplicate(PhotoFile(str(path), st.st_size, st.st_mtime), sha)
                report.duplicates += 1
                tick()
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
        results = self.encoder.map(first_of.values())
        try:
            for result in results:
                sha, size, mtime = to_encode[result.path]
                if result.error:
                    self.library.fail(result.path, result.error, report, size, mtime, settle_seconds)
                else:
                    self.store.record_encoded(PhotoFile(str(result.path), size, mtime), sha, result)
                    CROPS.receive(result.path, result.faces)
                    report.encoded += 1
                    log.info("encoded %s: %d face(s)", result.path, len(result.faces))
                tick()
                if stop():
                    # the photos being encoded right now are dropped with the pool's queue (closing
                    # the generator cancels what has not started); all of them are retried next time
                    return
                since = time.monotonic() - self._refreshed_at
                if since >= max(PARTIAL_REFRESH_SECONDS, PARTIAL_REFRESH_SHARE * self._refresh_cost):
                    self.refresh(verify=False)  # folders update as photos finish, not only per batch
        finally:
            results.close()
        for path in later:
            sha, size, mtime = to_encode[path]
            if self.store.known_sha(sha):
                self.store.record_duplicate(PhotoFile(str(path), size, mtime), sha)
                report.duplicates += 1
            else:
                self.library.fail(path, self.store.error_of(str(first_of[sha])) or "could not be decoded", report, size,
                           mtime, settle_seconds)
            tick()

    def forget(self, paths: Iterable[Path]) -> int:
        """Drop photos whose originals were deleted or moved away (the watcher saw them go, see
        :meth:`Library.forget`), then update the tree; returns how many."""
        gone = self.library.forget(paths)
        if gone:
            self.refresh(verify=False)
        return gone

    # ---- clustering + output ---------------------------------------------------------------
    def upgrade_encodings(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Re-encode the stored faces if another encoder made them (see :class:`EncodingUpgrade`);
        False if ``stop()`` interrupted it."""
        return self.encodings.run(stop)

    def recluster(self, algorithm: str = "dbscan") -> None:
        """Batch DBSCAN over every usable face, people derived from scratch (ids stay stable);
        ``algorithm``: another batch method, for comparison (see :meth:`Clustering.recluster`)."""
        self.upgrade_encodings()
        self.clustering.recluster(algorithm)
        self._vote_known(rescan=True)

    def refresh(self, verify: bool = True) -> None:
        """Update clusters (incrementally) and reconcile the output tree with the store
        (``verify``: check every entry on disk too, see :func:`organizer.output.reconcile`)."""
        t0 = time.monotonic()
        self.upgrade_encodings()  # before any clustering: distances compare like with like
        self.clustering.update()
        self._vote_known(rescan=verify)
        self.reconcile(verify)
        self._refreshed_at = time.monotonic()
        self._refresh_cost = self._refreshed_at - t0

    def _vote_known(self, rescan: bool) -> None:
        """Name the new faces of known people (:mod:`organizer.known`; ``rescan``: read the reference
        photos again) and apply the corrections that made."""
        if self.known.update(rescan):
            self.clustering.apply_corrections()

    def apply_corrections(self) -> bool:
        """Apply corrections recorded since the last update (see :meth:`Clustering.apply_corrections`)."""
        self.upgrade_encodings()
        return self.clustering.apply_corrections()

    def reconcile(self, verify: bool = True, tops=()):
        """Update the tree, the user's changes in it read first (see :meth:`OutputTree.update`)."""
        return self.tree.update(verify, tops)
