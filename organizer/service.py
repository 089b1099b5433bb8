"""Service: the long-running `organizer run` loop.

Start-up: open the store (refusing a second instance), start the watcher, tell systemd READY,
rescan the whole folder (files added while stopped). Then loop: settled files are processed in
batches, vanished ones forgotten, a full rescan runs every ``rescan_interval`` seconds (missed or
overflowed events), and names set with `organizer name` are applied. Signal handlers only set a
flag (as gunicorn does); the loop finishes the current batch, commits and exits 0.

A watched folder that is missing or empty while the store knows photos is taken for an unmounted
disk: rescans pause (nothing is forgotten) until it is back. A watcher that stopped (its folder
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
from .encode import EncoderUnavailable, check_models
from .ingest import discover, is_candidate
from .pipeline import Organizer, has_entries
from .store import Store, StoreError
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


class Service:
    def __init__(self, settings: Settings, on_ready: Callable[[], None] | None = None):
        self.settings = settings
        self.on_ready = on_ready  # called once the store is held (`run --web` then serves its page)
        self.stop_requested = False
        self.notify = _Notifier()

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_requested:
            log.warning("second %s: still finishing the current batch", signal.Signals(signum).name)
        else:
            log.info("%s received: finishing the current batch, then exiting", signal.Signals(signum).name)
        self.stop_requested = True

    def _stopping(self) -> bool:
        return self.stop_requested

    def run(self) -> int:
        s = self.settings
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        watch = Path(os.path.abspath(s.paths.watch))
        if not watch.is_dir():
            log.error("the watched folder %s does not exist", watch)
            return 1
        try:
            check_models()
            store = Store.open(s.db_path)
        except (StoreError, EncoderUnavailable) as exc:
            log.error("%s", exc)
            return 1
        org = Organizer(s, store)
        watcher = Watcher(watch, polling=s.service.polling)
        org.output.mkdir(parents=True, exist_ok=True)
        tree = Watcher(org.output, polling=s.service.polling)  # the user's corrections in the folders
        tree_tops: set[str] = set()
        tree_seen = 0.0
        settler = Settler(s.service.settle_seconds)
        self._paused = False
        try:
            watcher.start()
            tree.start()
            log.info("watching %s (%s), output in %s, store %s", watch,
                     "polling" if s.service.polling else "events", org.output, s.db_path)
            self.notify("READY=1")
            if self.on_ready is not None:
                self.on_ready()
            self._rescan(org, settler)
            last_rescan = time.monotonic()
            data_version = store.data_version()
            while not self.stop_requested:
                time.sleep(TICK)
                for path in watcher.drain():
                    self._enqueue(path, org, settler)
                tops = self._tree_tops(org, tree.drain())
                if tops:
                    tree_tops |= tops
                    tree_seen = time.monotonic()
                elif tree_tops and time.monotonic() - tree_seen >= TREE_QUIET:
                    org.reconcile(verify=False, tops=tree_tops)  # reads the user's changes first
                    tree_tops = set()
                settled, gone = settler.ready()
                if gone and self._watch_available(org):
                    # (not while the whole folder is gone, e.g. moved away or unmounted: the rescan
                    # once it is back forgets what is really gone)
                    org.forget([Path(p) for p in gone])
                files = []
                for p in settled:
                    if os.path.isdir(p) and not os.path.islink(p):
                        for f in discover(Path(p), org.excluded()):  # a folder moved in
                            settler.add(str(f))
                    else:
                        files.append(Path(p))
                if files:
                    org.process(files, stop=self._stopping)
                    self._status(store, settler)
                interval = s.service.rescan_interval
                due = interval and time.monotonic() - last_rescan >= interval
                if watcher.overflowed():
                    log.warning("the kernel dropped file events (inotify queue overflow): rescanning")
                    due = True
                if (due or self._paused or not watcher.alive) and not self.stop_requested:
                    if not watcher.alive and self._watch_available(org):
                        # watchdog stops silently when its folder is deleted or replaced (e.g.
                        # remounted): watch the folder that is there now, and catch up
                        log.error("the file watcher stopped; restarting it (a rescan catches up)")
                        watcher.stop()
                        try:
                            watcher = Watcher(watch, polling=s.service.polling)
                            watcher.start()
                        except OSError as exc:
                            log.error("cannot watch %s yet: %s", watch, exc.strerror or exc)
                        due = True
                    if due or self._paused:
                        self._rescan(org, settler)
                        last_rescan = time.monotonic()
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
            watcher.stop()
            tree.stop()
            org.close()
            store.close()

    def _enqueue(self, path: str, org: Organizer, settler: Settler) -> None:
        p = Path(path)
        if any(p == ex or ex in p.parents for ex in org.excluded()):
            return
        try:
            rel = p.relative_to(org.watch)
        except ValueError:
            return
        if any(part.startswith(".") for part in rel.parts):
            return
        if os.path.isdir(p) or is_candidate(p) or not os.path.lexists(p):
            settler.add(path)

    @staticmethod
    def _tree_tops(org: Organizer, paths: set[str]) -> set[str]:
        """The top-level folders of the output tree that changed (the store's own folder aside)."""
        tops = set()
        for path in paths:
            try:
                rel = Path(path).relative_to(org.output)
            except ValueError:
                continue
            if rel.parts and not rel.parts[0].startswith("."):
                tops.add(rel.parts[0])
        return tops

    def _watch_available(self, org: Organizer) -> bool:
        """Is the watched folder there? Missing, unlistable, or empty while the store knows photos
        means an unmounted disk or share (a rescan would forget every photo, and the names given
        to people with them): rescans pause until it is back."""
        available = has_entries(org.watch) or (org.watch.is_dir() and not org.store.has_photos())
        if available and self._paused:
            log.info("the watched folder %s is back; catching up", org.watch)
        elif not available and not self._paused:
            log.error("the watched folder %s is missing or empty but the store knows photos in it: "
                      "assuming its disk is not mounted. Nothing is forgotten; waiting for it to come back "
                      "(if you really removed every photo, stop the service and delete the store)", org.watch)
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
        for p in report.unsettled:
            settler.add(str(p))
        log.info("rescan: %d photos, %d new, %d encoded, %d failed, %d removed",
                 report.seen, report.new, report.encoded, report.failed, report.removed)
        self._status(org.store, settler)

    def _status(self, store: Store, settler: Settler) -> None:
        st = store.status(0)
        self.notify(
            f"STATUS={st['photos']} photos, {st['clusters']} people, {st['doubtful_faces']} doubtful, "
            f"{st['failed']} failed, {len(settler)} waiting"
        )
