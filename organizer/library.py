"""Library: the watched folder against the store, for a scan and for the watcher's deletions.

Which files a scan finds to process (and which are still being written), which known photos need
processing again, whether a file that failed is broken or still being copied, and which photos
the store knows are gone. Forgetting is guarded: nothing is
forgotten while the watched folder is out of reach (an unmounted disk), nor more than
``service.max_forget_share`` of the library at once (a moved folder or a changed --watch), unless
the watcher saw them go.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .ingest import discover
from .layout import Layout, WatchState
from .store import PhotoFile, PhotoState, Store

if TYPE_CHECKING:
    from .pipeline import ScanReport

log = logging.getLogger(__name__)

# Decode failures that a file still being written also gives (a copy paused mid-file).
MAYBE_INCOMPLETE = ("empty file", "truncated", "not a recognised image format", "cannot decode image",
                    "file disappeared")


def growing_grace(settle_seconds: float) -> float:
    """How long after its last change an incomplete-looking file is still taken for one being
    copied (and retried) rather than recorded as broken."""
    return max(60.0, 20 * settle_seconds)


@dataclass
class Listing:
    """What a scan found in the watched folder."""

    found: list[Path] = field(default_factory=list)  # to process
    unsettled: list[Path] = field(default_factory=list)  # modified less than the settle time ago
    unreadable: list[Path] = field(default_factory=list)  # folders that could not be listed


class Library:
    """Finds the photos to process in the watched folder, tells a broken file from one being
    copied, and forgets the photos gone from the folder (guarded)."""

    def __init__(self, store: Store, layout: Layout, watch: Path, max_forget_share: float):
        self.store = store
        self.layout = layout
        self.watch = watch
        self.max_forget_share = max_forget_share
        self._witnessed: set[str] = set()  # paths the watcher saw go while the folder was unavailable

    def listing(self, known: dict[str, PhotoState], settle_seconds: float = 0.0) -> Listing:
        """Every input file below the watched folder; with ``settle_seconds``, those modified more
        recently go to ``unsettled`` (and out of ``known``: they are not counted as the library)."""
        out = Listing()
        now = time.time()
        for path in discover(self.watch, self.layout, out.unreadable):
            if settle_seconds:
                try:
                    if now - os.lstat(path).st_mtime < settle_seconds:
                        out.unsettled.append(path)
                        known.pop(str(path), None)
                        continue
                except OSError:
                    pass
            out.found.append(path)
        return out

    def forget_vanished(self, known: dict[str, PhotoState], listing: Listing, forget_anyway: bool = False
                        ) -> tuple[int, int]:
        """Forget the ``known`` photos the listing did not find; returns (removed, kept).

        Photos in a folder that could not be listed are out of reach, not gone. Those the watcher
        saw go are forgotten whatever their number; the rest only when they are at most
        ``max_forget_share`` of the library (or ``forget_anyway``), else all are kept."""
        seen = {str(p) for p in listing.found} | {str(p) for p in listing.unsettled}
        hidden = tuple(str(u).rstrip(os.sep) + os.sep for u in listing.unreadable)
        vanished = [p for p in known if p not in seen and not p.startswith(hidden)]
        went = tuple(w.rstrip(os.sep) + os.sep for w in self._witnessed)
        witnessed = [p for p in vanished if p in self._witnessed or p.startswith(went)]
        self._witnessed.clear()
        removed = kept = 0
        if witnessed:
            self.store.remove_photos(witnessed)
            removed = len(witnessed)
            log.info("removed %d photos deleted from the watched folder", len(witnessed))
            gone = set(witnessed)
            vanished = [p for p in vanished if p not in gone]
        share = self.max_forget_share
        if vanished and len(vanished) > share * len(known) and not forget_anyway:
            log.error("%d of the %d photos the store knows are no longer found in %s: more than %d%% at once looks "
                      "like a moved or unmounted folder or a changed --watch/--output/--db, not a deletion, so "
                      "nothing is forgotten. If you did remove them, run `organizer scan --forget-anyway` "
                      "(service.max_forget_share sets the limit)", len(vanished), len(known), self.watch,
                      round(share * 100))
            kept = len(vanished)
        elif vanished:
            self.store.remove_photos(vanished)
            removed += len(vanished)
            log.info("removed %d photos that are no longer in the watched folder", len(vanished))
        return removed, kept

    def forget(self, paths: Iterable[Path]) -> int:
        """Drop photos the watcher saw go (files or whole folders) whose file is really gone from
        an available watched folder; returns how many. While it is unavailable they are
        remembered for the next scan's :meth:`forget_vanished`."""
        known = self.store.photo_states()
        paths = list(paths)
        if self.layout.watch_state(bool(known)) is not WatchState.AVAILABLE:
            # not now (the whole folder may be a disk being remounted); the rescan once it is back
            # forgets those of them still gone, however many (a deletion was seen)
            self._witnessed.update(str(p) for p in paths if Path(p) != self.watch)
            return 0
        gone = [str(p) for p in paths if str(p) in known and not os.path.lexists(p)]
        # a deleted folder: forget everything under it
        for p in paths:
            prefix = str(p).rstrip("/") + "/"
            gone += [k for k in known if k.startswith(prefix) and not os.path.lexists(k)]
        gone = sorted(set(gone))
        if gone:
            self.store.remove_photos(gone)
            log.info("forgot %d removed photo(s)", len(gone))
        return len(gone)

    def to_process(self, paths: Iterable[Path], retry_failed: bool) -> list[Path]:
        """The input paths among ``paths`` (absolute) that are new or changed since the store saw
        them (size or mtime); failed ones too when ``retry_failed``."""
        paths = [p for p in (Path(os.path.abspath(p)) for p in paths) if self.layout.is_input(p)]
        known = self.store.photo_states(str(p) for p in paths)
        todo = []
        for path in paths:
            try:
                st = os.stat(path)
                state = known.get(str(path))
                if state and state[0] == st.st_size and state[1] == st.st_mtime:
                    if state[2] == "ok" or not retry_failed:
                        continue
            except OSError:
                pass  # check_readable says why when it is processed
            todo.append(path)
        return todo

    def fail(self, path: Path, reason: str, report: ScanReport, size: int = 0, mtime: float = 0.0,
             settle_seconds: float = 0.0) -> None:
        """A file that could not be used (``reason``): with ``settle_seconds`` (the service), one
        still being written goes back to ``report.unsettled``, or to ``report.incomplete`` when it
        reads as a paused copy; otherwise it is recorded as failed."""
        try:
            st = os.lstat(path)
            if not size:
                size, mtime = st.st_size, st.st_mtime
            changed = (st.st_size, st.st_mtime) != (size, mtime)
            recent = time.time() - st.st_mtime < growing_grace(settle_seconds)
        except OSError:
            changed = recent = False
        if settle_seconds and changed:
            # written to while it was read: still being copied. Not a failure: it settles again
            log.debug("%s changed while it was read; trying again once it settles", path)
            report.unsettled.append(path)
            return
        if settle_seconds and recent and reason.startswith(MAYBE_INCOMPLETE):
            # a copy that paused for longer than the settle time looks like this too
            log.debug("%s looks incomplete (%s); trying again when it changes", path, reason)
            report.incomplete.append((path, size, mtime))
            return
        log.warning("cannot use %s: %s", path, reason)
        self.store.record_failure(PhotoFile(str(path), size, mtime), reason)
        report.failed += 1
