"""Layout: where the watched folder, the output tree and the store are, and the two rules that
follow from it: "is this path input?" (:meth:`Layout.is_input`) and "is the watched folder
available?" (:meth:`Layout.watch_state`). Every place that decides either asks here.

The three places may nest in any way but two: the watched folder cannot be the output folder nor
lie inside it (the person folders would be mixed with the photos). Whatever lies *inside* the
watched folder and belongs to the organizer -- the output tree, the store and its side files --
is not input; a folder that merely *contains* them (the watched folder's parent holding the store,
say) excludes nothing.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from .ingest import is_candidate

# Side files of the store at <db>: SQLite's (-wal, -shm, -journal), the instance lock and the saved
# clustering states (<db>.lock, <db>.engine.npz, <db>.people.npz and their temporary files).
_STORE_SIDE = ("-", ".")


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


class WatchState(enum.Enum):
    AVAILABLE = "available"
    MISSING = "missing"  # does not exist (or is not a folder)
    UNLISTABLE = "unlistable"  # exists, but cannot be listed (permissions, I/O error)
    EMPTY = "empty"  # exists and is empty, while the store knows photos in it: an unmounted disk


@dataclass(frozen=True)
class Layout:
    """Absolute paths of the watched folder (None for commands that do not read it), the output
    folder, the store and the known people's reference photos (None: none)."""

    watch: Path | None
    output: Path
    db: Path
    known: Path | None = None

    @classmethod
    def of(cls, settings) -> "Layout":
        w = settings.paths.watch
        k = settings.paths.known
        return cls(Path(os.path.abspath(w)) if w is not None else None,
                   Path(os.path.abspath(settings.paths.output)), Path(os.path.abspath(settings.db_path)),
                   Path(os.path.abspath(k)) if k is not None else None)

    # ---- "is this path input?" --------------------------------------------------------------
    def _excluded_dirs(self) -> list[Path]:
        """The output tree, spelled under the watched folder, when it lies inside it (also when
        one of the two is reached through a symlink)."""
        if self.watch is None:
            return []
        out = []
        for w, o in ((self.watch, self.output), (_real(self.watch), _real(self.output))):
            if _within(o, w) and o != w:
                out.append(self.watch / o.relative_to(w))
        return out

    def _is_store_file(self, path: Path) -> bool:
        for db in (self.db, _real(self.db)):
            if path.parent in (db.parent, _real(db.parent)):
                name = path.name
                if name == db.name or (name.startswith(db.name) and name[len(db.name)] in _STORE_SIDE):
                    return True
        return False

    def is_input(self, path: Path, is_dir: bool = False) -> bool:
        """True when ``path`` (a file, or with ``is_dir`` a folder) is in the watched tree and is
        the user's: not hidden (no part of it below the watched folder starts with "."), not in
        the output tree, not one of the store's files, and for a file a photo's name
        (:func:`organizer.ingest.is_candidate`: no partial downloads, no editor's lock files)."""
        if self.watch is None:
            return False
        path = Path(os.path.abspath(path))
        if not _within(path, self.watch):
            return False
        rel = path.relative_to(self.watch).parts
        if any(part.startswith(".") for part in rel):
            return False
        if any(_within(path, ex) for ex in self._excluded_dirs()):
            return False
        if is_dir:
            return True
        return is_candidate(path) and not self._is_store_file(path)

    # ---- "is the watched folder available?" -------------------------------------------------
    def watch_state(self, knows_photos: bool) -> WatchState:
        """Missing, unlistable, or empty while the store knows photos in it: the disk or share is
        not mounted (a rescan would forget every photo, and the names given to people with them)."""
        try:
            with os.scandir(self.watch) as entries:
                empty = next(entries, None) is None
        except (FileNotFoundError, NotADirectoryError):
            return WatchState.MISSING
        except OSError:
            return WatchState.UNLISTABLE
        if empty and knows_photos:
            return WatchState.EMPTY
        return WatchState.AVAILABLE

    def unavailable_message(self, state: WatchState, known: int) -> str:
        why = {WatchState.MISSING: "does not exist", WatchState.UNLISTABLE: "cannot be listed",
               WatchState.EMPTY: "is empty"}[state]
        return (f"the watched folder {self.watch} is missing or empty ({why}) but the store knows {known} photos "
                f"in it: assuming its disk is not mounted, nothing is forgotten (if you really removed every "
                f"photo, delete the store {self.db})")

    # ---- layouts refused at start -----------------------------------------------------------
    def problems(self) -> list[str]:
        """What makes this layout unusable, each with what to do; checked before anything is
        written. A missing watched folder is not one (`run` creates it or waits for it)."""
        out: list[str] = []
        for what, p in (("watched folder", self.watch), ("output folder", self.output)):
            if p is not None and p.exists() and not p.is_dir():
                out.append(f"the {what} {p} is a file, not a folder")
        if self.db.is_dir():
            out.append(f"the store {self.db} is a folder; --db (paths.db) names the database file, "
                       f"e.g. {self.db / 'organizer.db'}")
        if self.watch is not None:
            for w, o in ((self.watch, self.output), (_real(self.watch), _real(self.output))):
                if w == o:
                    out.append(f"the watched folder and the output folder are the same ({self.watch}); "
                               f"choose an output folder outside the photos, e.g. {self.watch.parent / 'people'}")
                    break
                if _within(w, o):
                    out.append(f"the watched folder {self.watch} is inside the output folder {self.output}: the "
                               "person folders would be mixed with your photos. Choose an output folder that does "
                               f"not contain the photos, e.g. {self.output.parent / (self.output.name + '-people')}")
                    break
        out += _known_problems(self)
        for what, p in (("output folder", self.output), ("store's folder", self.db.parent)):
            base = _existing_ancestor(p)  # (an existing one that is read-only: reported per entry)
            if base not in (None, p) and base.is_dir() and not os.access(base, os.W_OK | os.X_OK):
                out.append(f"cannot create the {what} {p}: {base} is not writable")
        return list(dict.fromkeys(out))


def _known_problems(layout: Layout) -> list[str]:
    """The reference photos must not be input (they would be sorted into the folders too, and the
    known people would find themselves), nor share a folder with the output tree."""
    k = layout.known
    if k is None:
        return []
    if k.exists() and not k.is_dir():
        return [f"the known-people folder {k} is a file, not a folder (paths.known: one sub-folder per person)"]
    w = layout.watch
    for kk, ww, oo in ((k, w, layout.output), (_real(k), w and _real(w), _real(layout.output))):
        if ww is not None and (_within(ww, kk) or layout.is_input(kk, is_dir=True)):
            return [f"the known-people folder {k} overlaps the watched folder {w}: its reference photos would be "
                    f"sorted as photos too. Keep it outside the photos (e.g. {w.parent / 'known-people'}), or "
                    "inside them as a hidden folder (a name starting with '.')"]
        if _within(kk, oo) or _within(oo, kk):
            return [f"the known-people folder {k} overlaps the output folder {layout.output}; keep the two apart"]
    return []


def _existing_ancestor(path: Path) -> Path | None:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return None
