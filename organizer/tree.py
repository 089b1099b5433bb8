"""Tree: one output tree kept in line with the store.

Each update first reads what the user changed in the person folders (tree_edits.py: recorded as
corrections, applied before the tree is touched, which would otherwise put moved links back),
then reconciles the tree (output.py) and logs the person folders that changed (FolderEvents).
An update without ``verify`` reconciles only the folders the store's writers marked as changed
since the last update (Store.take_tree_changes), those the user changed, and those whose entries
failed last time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from .output import FolderEvents, ReconcileReport, reconcile, tree_scope
from .store import Store
from .tree_edits import TreeEdits


class OutputTree:
    """Updates one output tree from the store, the user's edits in it read first."""

    def __init__(self, store: Store, output: Path, link_mode: str, max_pixels: int,
                 apply_corrections: Callable[[], object]):
        self.store = store
        self.output = output
        self.link_mode = link_mode
        self.max_pixels = max_pixels
        self.apply_corrections = apply_corrections  # has the people layer apply new corrections
        self.last: ReconcileReport | None = None  # the last update's report
        self.logged: set[str] = set()  # output errors logged since the last scan began
        self._failing: set[str] = set()  # top-level folders with entries that failed (tried again)
        self._folder_events = FolderEvents(store)
        self._folder_events.update()  # the baseline: what the tree holds at the start

    def read_edits(self, tops: Iterable[str] | None = None, apply: bool = True) -> bool:
        """Record what the user changed in the person folders (all of them, or the ``tops``
        top-level folders) as corrections and apply them (unless not ``apply``: a recluster
        follows). True if a correction was made."""
        report = TreeEdits(self.store, self.output).interpret(tops)
        if report.corrections and apply:
            self.apply_corrections()
        return bool(report.corrections)

    def update(self, verify: bool = True, tops: Iterable[str] = ()) -> ReconcileReport:
        """Update the tree; the user's changes in it are read first (``verify``: in every folder,
        and every entry checked on disk, see :func:`organizer.output.reconcile`; otherwise in the
        ``tops`` folders the service saw change)."""
        tops = set(tops)
        self.read_edits(None if verify else tops)
        changes = self.store.take_tree_changes()  # (after the edits: their corrections are changes too)
        # (the folders the user changed too: the entries moved there, or away, are the manifest's)
        scope = None if verify else tree_scope(self.store, changes, self._failing | set(tops))
        self.last = reconcile(self.store, self.output, self.link_mode, self.max_pixels, verify, logged=self.logged,
                              scope=scope)
        self._failing = self.last.failed_folders | (self._failing - scope if scope is not None else set())
        self._folder_events.update()
        return self.last
