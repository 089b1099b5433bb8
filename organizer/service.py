"""Service: the long-running `organizer run` loop.

Start-up: open the store (refusing a second instance), start the watcher, tell systemd READY,
rescan the whole folder (files added while stopped). Then loop: settled files are processed in
batches, vanished ones forgotten, a full rescan runs every ``rescan_interval`` seconds (missed or
overflowed events), and names set with `organizer name` are applied. Signal handlers only set a
flag (as gunicorn does); the photos being encoded are finished and committed, the rest of the
batch is left for the next start, and the service exits 0.

A watched folder that is missing on a new store is created (a first start); one that is missing,
unlistable or empty while the store knows photos is taken for an unmounted disk: the watcher waits
and rescans pause (nothing is forgotten) until it is back. A watcher that stopped (its folder
was deleted or replaced) is restarted. When the store cannot be written (disk full, I/O error,
damage) the service logs why and exits 1 without losing anything committed; systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from .config import Settings
from .encode import EncoderUnavailable
from .executors import encoder_for
from .ingest import discover
from .layout import Layout, WatchState
from .library import growing_grace
from .pipeline import Organizer
from .store import Store, StoreError
from .store_review import ReviewQueries
from .storefile import unusable_message
from .watch import Settler, Watcher

log = logging.getLogger(__name__)

TICK = 0.5  # seconds between checks of the event queue
TREE_QUIET = 1.0  # seconds without changes in the person folders before they are read (a folder
# deleted file by file, or many links moved, is read as one change, not as its first steps)


class _Notifier:
    """sd_notify when run by systemd (NOTIFY_SOCKET set); silent otherwise."""

    def __init__(self):
        self._n = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._n = sdnotify.SystemdNotifier()

    def __call__(self, msg: str) -> None:
        if self._n is not None:
            self._n.notify(msg)


class TreeChanges:
    """The user's changes in the output tree as its watcher reports them: read (and the tree
    updated) once the changed top-level folders have been quiet for TREE_QUIET seconds."""

    def __init__(self, org: Organizer, watcher: Watcher | None):
        self.org = org
        self.watcher = watcher  # None: the tree cannot be watched now (read at the next rescan)
        self.tops: set[str] = set()  # the top-level folders changed and not read yet
        self.seen = 0.0  # when the last change came

    def poll(self) -> None:
        if self.watcher is None:
            return
        tops = self._tops(self.watcher.drain())
        if tops:
            self.tops |= tops
            self.seen = time.monotonic()
        elif self.tops and time.monotonic() - self.seen >= TREE_QUIET:
            self.org.reconcile(verify=False, tops=self.tops)  # reads the user's changes first
            self.tops = set()

    def _tops(self, paths: set[str]) -> set[str]:
        """The top-level folders of the output tree that changed (the store's own folder aside)."""
        tops = set()
        for path in paths:
            try:
                rel = Path(path).relative_to(self.org.output)
            except ValueError:
                continue
            if rel.parts and not rel.parts[0].startswith("."):
                tops.add(rel.parts[0])
        return tops

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()


class Service:
    """`organizer run`: one store, its watchers and the loop that feeds the :class:`Organizer`."""

    def __init__(self, settings: Settings, on_ready: Callable[[], None] | None = None):
        self.settings = settings
        self.on_ready = on_ready  # called once the store is held (`run --web` then serves its page)
        self.stop_requested = False
        self.notify = _Notifier()
        self.watcher: Watcher | None = None  # on the watched folder (None while it is not there)
        self._paused = False  # the watched folder is not available: rescans wait for it
        self._last_rescan = 0.0

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_requested:
            log.warning("second %s: still finishing the photos in progress", signal.Signals(signum).name)
        else:
            log.info("%s received: finishing the photos in progress, then exiting", signal.Signals(signum).name)
        self.stop_requested = True

    def _stopping(self) -> bool:
        return self.stop_requested

    def run(self) -> int:
        s = self.settings
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        layout = Layout.of(s)
        # workers ready before the first photo arrives (a drop is seen in seconds); they load the
        # models while this process opens the store
        encoder = None
        try:
            encoder = encoder_for(s)
            encoder.start()
            store = Store.open(s.db_path)
        except (StoreError, EncoderUnavailable) as exc:
            if encoder is not None:
                encoder.close()
            log.error("%s", exc)
            return 1
        tree = None
        org = None
        try:
            org = Organizer(s, store, encoder=encoder)
            try:
                encoder.check()  # the workers load the models: this process never does
            except EncoderUnavailable as exc:
                log.error("%s", exc)
                return 1
            if not self._make_inbox(layout, store):
                return 1
            settler = Settler(s.service.settle_seconds)
            self._paused = False
            self.watcher = self._start_watcher(org)
            tree = TreeChanges(org, self._start_tree_watcher(org))  # the user's corrections in the folders
            log.info("watching %s (%s), output in %s, store %s", layout.watch,
                     "polling" if s.service.polling else "events", org.output, s.db_path)
            self.notify("READY=1")
            if self.on_ready is not None:
                self.on_ready()
            self._rescan(org, settler)
            self._last_rescan = time.monotonic()
            data_version = store.data_version()
            while not self.stop_requested:
                time.sleep(TICK)
                if self.watcher is not None:
                    for path in self.watcher.drain():
                        self._enqueue(path, org, settler)
                tree.poll()
                self._process_settled(org, settler)
                self._rescan_if_due(org, settler)
                dv = store.data_version()
                if dv != data_version:  # another process changed the store (e.g. `organizer name`)
                    data_version = dv
                    org.apply_corrections()  # e.g. `organizer assign`
                    org.reconcile(verify=False)
            self.notify("STOPPING=1")
            log.info("stopped cleanly")
            return 0
        except sqlite3.DatabaseError as exc:  # OperationalError too: disk full, I/O error, read-only
            log.error("%s", unusable_message(s.db_path, exc, "write"))
            self.notify(f"STATUS=stopped: cannot use the store ({exc})")
            return 1
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            if tree is not None:
                tree.stop()
            if org is not None:
                org.close()
            store.close()

    @staticmethod
    def _make_inbox(layout: Layout, store: Store) -> bool:
        """On a first start (README: `organizer run --watch ~/Pictures/inbox ...`) make the watched
        folder if it is missing; False if it cannot be made."""
        if layout.watch_state(False) is WatchState.MISSING and not store.has_photos():
            try:
                layout.watch.mkdir(parents=True, exist_ok=True)
                log.info("created the watched folder %s (it did not exist)", layout.watch)
            except OSError as exc:
                log.error("cannot create the watched folder %s: %s", layout.watch, exc.strerror or exc)
                return False
        return True

    def _process_settled(self, org: Organizer, settler: Settler) -> None:
        """Forget what went, then process the files that settled as one batch (a folder moved in
        gives its files to the settler)."""
        settled, gone = settler.ready()
        if gone:
            # (not while the whole folder is gone, e.g. moved away or unmounted: the rescan
            # once it is back forgets what is really gone)
            self._watch_available(org)
            org.forget([Path(p) for p in gone])
        files = []
        for p in settled:
            if os.path.isdir(p) and not os.path.islink(p):
                for f in discover(Path(p), org.layout):  # a folder moved in
                    settler.add(str(f))
            else:
                files.append(Path(p))
        if files and not self.stop_requested:
            report = org.process(files, stop=self._stopping, settle_seconds=self.settings.service.settle_seconds)
            self._hand_back(report, settler)
            self._status(org, settler)

    def _rescan_if_due(self, org: Organizer, settler: Settler) -> None:
        """Rescan every ``rescan_interval``, after the kernel dropped events, while paused (until
        the watched folder is back), and when the watcher stopped (restarted first)."""
        interval = self.settings.service.rescan_interval
        due = interval and time.monotonic() - self._last_rescan >= interval
        if self.watcher is not None and self.watcher.overflowed():
            log.warning("the kernel dropped file events (inotify queue overflow): rescanning")
            due = True
        alive = self.watcher is not None and self.watcher.alive
        if (due or self._paused or not alive) and not self.stop_requested:
            if not alive and self._watch_available(org):
                # watchdog stops silently when its folder is deleted or replaced (e.g.
                # remounted): watch the folder that is there now, and catch up
                if self.watcher is not None:
                    log.error("the file watcher stopped; restarting it (a rescan catches up)")
                    self.watcher.stop()
                self.watcher = self._start_watcher(org)
                due = True
            if due or self._paused:
                self._rescan(org, settler)
                self._last_rescan = time.monotonic()

    def _start_tree_watcher(self, org: Organizer) -> Watcher | None:
        """A started watcher on the output tree (the user's corrections), or None if the tree
        cannot be made or watched now (its errors are reported by the tree updates; corrections
        are then read at the next start or rescan)."""
        tree = Watcher(org.output, polling=self.settings.service.polling)
        try:
            org.output.mkdir(parents=True, exist_ok=True)
            tree.start()
        except OSError as exc:
            log.error("cannot watch the output folder %s: %s; changes you make there are read at the next "
                      "rescan", org.output, exc.strerror or exc)
            tree.stop()
            return None
        return tree

    def _start_watcher(self, org: Organizer) -> Watcher | None:
        """A started watcher on the watched folder, or None while it is not there (the folder can
        vanish between any check and the start: then the loop tries again)."""
        if not self._watch_available(org):
            return None
        watcher = Watcher(org.watch, polling=self.settings.service.polling)
        try:
            watcher.start()
        except OSError as exc:
            log.error("cannot watch %s yet: %s", org.watch, exc.strerror or exc)
            watcher.stop()
            return None
        return watcher

    def _enqueue(self, path: str, org: Organizer, settler: Settler) -> None:
        p = Path(path)
        if not os.path.lexists(p):  # deleted or moved away: a file or a whole folder
            if org.layout.is_input(p, is_dir=True):
                settler.add(path)
        elif org.layout.is_input(p, is_dir=os.path.isdir(p) and not os.path.islink(p)):
            settler.add(path)

    def _watch_available(self, org: Organizer) -> bool:
        """Is the watched folder there (:meth:`Layout.watch_state`)? If not, rescans pause until it
        is back: nothing is forgotten meanwhile."""
        known = org.store.has_photos()
        state = org.layout.watch_state(known)
        available = state is WatchState.AVAILABLE
        if available and self._paused:
            log.info("the watched folder %s is back; catching up", org.watch)
        elif not available and not self._paused:
            if known:
                photos = ReviewQueries(org.store).status(0)["photos"]
                log.error("%s; waiting for it to come back", org.layout.unavailable_message(state, photos))
            else:
                log.error("the watched folder %s is missing or cannot be listed; waiting for it", org.watch)
            self.notify("STATUS=waiting for the watched folder (missing or empty)")
        self._paused = not available
        return available

    def _rescan(self, org: Organizer, settler: Settler) -> None:
        if not self._watch_available(org):
            return
        self.notify("STATUS=scanning the watched folder")
        try:
            report = org.scan(stop=self._stopping, settle_seconds=self.settings.service.settle_seconds)
        except FileNotFoundError as exc:
            if org.watch.is_dir():  # the photos are out of reach (e.g. re-encoding found none): retried
                log.error("%s", exc)  # at the next rescan
                return
            self._watch_available(org)  # it vanished a moment ago: pause
            return
        if report.unavailable is not None:
            self._watch_available(org)
            return
        self._hand_back(report, settler)
        log.info("rescan: %d photos, %d new, %d encoded, %d failed, %d removed%s",
                 report.seen, report.new, report.encoded, report.failed, report.removed,
                 f", {report.kept} kept (see above)" if report.kept else "")
        self._status(org, settler)

    def _hand_back(self, report, settler: Settler) -> None:
        """Files still being written go back to the settler; one that read as incomplete waits
        until it changes, or is recorded as broken once unchanged for the grace time."""
        for p in report.unsettled:
            settler.add(str(p))
        for p, size, mtime in report.incomplete:
            settler.add(str(p), wait=growing_grace(self.settings.service.settle_seconds), seen=(size, mtime))

    def _status(self, org: Organizer, settler: Settler) -> None:
        st = ReviewQueries(org.store).status(0)
        tree = org.tree.last
        broken = ""
        if tree is not None and tree.errors:
            broken = f", {len(tree.errors)} output entries failed ({reasons_text(tree.reasons)})"
        self.notify(
            f"STATUS={st['photos']} photos, {st['clusters']} people, {st['doubtful_faces']} doubtful, "
            f"{st['failed']} failed, {len(settler)} waiting{broken}"
        )


def reasons_text(reasons: dict[str, int]) -> str:
    """{"Permission denied": 52} -> "52 Permission denied", most frequent first."""
    return ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
