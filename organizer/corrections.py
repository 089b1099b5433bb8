"""Corrections: the one Python API through which people are named, assigned, rejected, merged,
hidden and undone. The CLI, the folder interpreter (tree_edits.py) and the review page all call
it, so a correction from any of them is the same store row.

Every call records one row (``corrections``, with the faces it is about) and changes nothing
else but the person's name or hidden flag; the people layer applies the rows
(:mod:`organizer.constraints`) at its next update, and `organizer recluster` replays them. So
a caller that holds the store's lock runs ``Organizer.apply_corrections()`` and a tree update
afterwards; while the service runs, it notices the change itself (a CLI call) or is the caller
(the folders).

What each kind means for the people layer:

``name``    the person is called so; the faces in its folder now are its faces (anchors)
``assign``  these faces are this person's (confident, whatever the algorithm says)
``split``   a new person with a name, holding these faces (``assign`` to a person made for it)
``reject``  these faces are never put in this person again (doubtful: "removed by you from ...")
``merge``   ``other`` is ``person`` from now on (its faces, and its future faces, go there)
``hide``    the person gets no folder; its faces go nowhere (``unhide`` brings it back)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .output import folder_name, validate_person_name
from .store import Store, StoreError
from .store_corrections import CorrectionLog, CorrectionRow

SOURCES = ("folders", "cli", "known", "page")


class CorrectionError(ValueError):
    """A correction that cannot be made as asked (unknown person or photo, a name taken, ...)."""


@dataclass
class Person:
    id: int
    name: str | None
    folder: str  # its folder in the output tree (none is made while it is hidden or empty)
    faces: int
    hidden: bool


class Corrections:
    def __init__(self, store: Store):
        self.store = store
        self.log = CorrectionLog(store)

    # ---- reading -------------------------------------------------------------------------
    def people(self, hidden: bool = False) -> list[Person]:
        """Every person with faces (or a name); ``hidden``: the hidden ones instead."""
        out = []
        merged = self._merged_away()
        for p in self.store.people():
            if bool(p["hidden"]) != hidden or p["id"] in merged:
                continue
            if not p["size"] and not p["name"] and not hidden:
                continue
            out.append(Person(p["id"], p["name"], folder_name(p["id"], p["name"]), p["size"] or 0, bool(p["hidden"])))
        return out

    def history(self) -> list[CorrectionRow]:
        return self.log.rows()

    def _merged_away(self) -> set[int]:
        return {c.other for c in self.log.rows(include_undone=False) if c.kind == "merge"}

    def person_id(self, ref: str | int, create: bool = False, source: str = "cli") -> int:
        """A person by id, name or folder name (``cluster_7``); ``create``: a name no person has
        yet makes a new person of that name."""
        text = str(ref).strip()
        rows = self.store.people()
        if text.isdigit() and any(p["id"] == int(text) for p in rows):
            return int(text)
        for p in rows:
            if text in (p["name"], folder_name(p["id"], p["name"])):
                return p["id"]
        if create and not text.isdigit():
            try:
                name = validate_person_name(text)
            except ValueError as exc:
                raise CorrectionError(str(exc)) from None
            return self.store.new_person(name)
        raise CorrectionError(f"there is no person {text!r} (see `organizer people`)")

    def faces_of(self, photo: str | Path, output: Path | None = None) -> tuple[list, int | None]:
        """The faces of a photo given by its original path or by a link in the output tree, and
        the person whose folder that link is in (None for an original or a doubtful/ link)."""
        path = os.path.abspath(photo)
        folder_person = None
        if output is not None:
            out = os.path.abspath(output)
            if path.startswith(out.rstrip(os.sep) + os.sep):
                rel = os.path.relpath(path, out)
                entries, _ = self.store.manifest()
                entry = entries.get(rel)
                if entry is None or entry[0] != "link":
                    raise CorrectionError(f"{photo} is not a link the organizer made")
                path = entry[1]
                top = rel.split(os.sep, 1)[0]
                for p in self.store.people():
                    if folder_name(p["id"], p["name"]) == top:
                        folder_person = p["id"]
        faces = self.store.faces_of_photo(path)
        if not faces:
            raise CorrectionError(f"{photo} is not a photo with faces in the library")
        return faces, folder_person

    def face_for(self, photo: str | Path, person: int, reject: bool, output: Path | None = None) -> int:
        """The face of ``photo`` a correction about ``person`` is about: the one in the folder the
        link is in; for a reject, the one in ``person``; for an assign, the only one not already
        there (or the doubtful one nearest to it)."""
        faces, in_folder = self.faces_of(photo, output)
        if in_folder is not None:
            faces_there = [f for f in faces if f.cluster_id == in_folder and not f.doubtful]
            if faces_there:
                return faces_there[0].id
        if reject:
            mine = [f for f in faces if f.cluster_id == person]
            if not mine:
                raise CorrectionError(f"no face of {photo} is in {self.label(person)}")
            return mine[0].id
        if len(faces) == 1:
            return faces[0].id
        cands = [f for f in faces if f.cluster_id != person] or faces
        for pick in ([f for f in cands if f.doubtful and f.nearest_cluster == person],
                     [f for f in cands if f.doubtful], cands):
            if len(pick) == 1:
                return pick[0].id
        raise CorrectionError(f"{photo} holds {len(faces)} faces; move its link from the folder of the face you mean")

    def label(self, person: int) -> str:
        """The person's folder name (cluster_<id> or the name): how the CLI and the page name them."""
        p = self.store.person(person)
        return folder_name(person, p["name"] if p else None)

    def _require(self, person: int) -> dict:
        p = self.store.person(person)
        if p is None:
            raise CorrectionError(f"there is no person {person}")
        return p

    # ---- corrections ---------------------------------------------------------------------
    def name(self, person: int, name: str | None, source: str = "cli") -> int:
        """Name a person (None: clear the name); the faces in its folder now are its faces."""
        p = self._require(person)
        value = None
        if name is not None:
            try:
                value = validate_person_name(name)
            except ValueError as exc:
                raise CorrectionError(str(exc)) from None
        faces = [f.id for f in self.store.faces_where("cluster_id=? and doubtful=0", [person])]
        with self.store.db.atomic():
            try:
                self.store.set_cluster_name(person, value)
            except StoreError as exc:
                raise CorrectionError(str(exc)) from None
            return self.log.add("name", source, person=person, name=value, faces=faces, before={"name": p["name"]})

    def assign(self, faces: list[int], person: int, source: str = "cli", from_person: int | None = None) -> int:
        """These faces are ``person``'s from now on (never again ``from_person``'s)."""
        self._require(person)
        return self.log.add("assign", source, person=person, other=from_person, faces=faces)

    def split(self, name: str, faces: list[int], source: str = "cli", from_person: int | None = None) -> int:
        """A new person called ``name`` holding ``faces``; returns its id."""
        try:
            value = validate_person_name(name)
        except ValueError as exc:
            raise CorrectionError(str(exc)) from None
        if any(p["name"] == value for p in self.store.people()):
            raise CorrectionError(f"the name {value!r} is already used")
        with self.store.db.atomic():
            pid = self.store.new_person(value)
            self.log.add("split", source, person=pid, other=from_person, name=value, faces=faces)
        return pid

    def reject(self, faces: list[int], person: int, source: str = "cli") -> int:
        """These faces are never ``person``'s again."""
        self._require(person)
        return self.log.add("reject", source, person=person, faces=faces)

    def merge(self, a: int, b: int, source: str = "cli") -> int:
        """Person ``a`` is person ``b`` from now on (b keeps its id and name; a's name goes, unless b
        has none)."""
        pa, pb = self._require(a), self._require(b)
        if a == b:
            raise CorrectionError("a person cannot be merged into itself")
        with self.store.db.atomic():
            before = {"a_name": pa["name"], "b_name": pb["name"]}
            if pa["name"] and not pb["name"]:
                self.store.set_cluster_name(a, None)
                self.store.set_cluster_name(b, pa["name"])
            return self.log.add("merge", source, person=b, other=a, before=before)

    def hide(self, person: int, source: str = "cli") -> int:
        self._require(person)
        with self.store.db.atomic():
            self.store.set_hidden(person, True)
            return self.log.add("hide", source, person=person)

    def unhide(self, person: int, source: str = "cli") -> int:
        p = self._require(person)
        if not p["hidden"]:
            raise CorrectionError(f"person {person} is not hidden")
        with self.store.db.atomic():
            self.store.set_hidden(person, False)
            return self.log.add("unhide", source, person=person)

    def undo(self) -> CorrectionRow | None:
        """Undo the latest correction not undone yet (repeatable); returns it, None if none is left."""
        c = self.log.last()
        if c is None:
            return None
        before = json.loads(c.before) if c.before else {}
        with self.store.db.atomic():
            if c.kind == "name":
                try:
                    self.store.set_cluster_name(c.person, before.get("name"))
                except StoreError as exc:
                    raise CorrectionError(f"cannot undo the name: {exc}") from None
            elif c.kind == "merge":
                self.store.set_cluster_name(c.person, None)
                self.store.set_cluster_name(c.other, before.get("a_name"))
                self.store.set_cluster_name(c.person, before.get("b_name"))
            elif c.kind == "split":
                self.store.set_cluster_name(c.person, None)
            elif c.kind in ("hide", "unhide"):
                self.store.set_hidden(c.person, c.kind == "unhide")
            self.log.mark_undone(c.id)
        return c


def describe(c: CorrectionRow, label=lambda p: f"person {p}") -> str:
    """One line for `organizer corrections`."""
    n = len(c.faces)
    what = {
        "name": lambda: f"person {c.person} named {c.name!r}" if c.name else f"cleared the name of person {c.person}",
        "assign": lambda: f"{n} face(s) assigned to {label(c.person)}" + (f" (from {label(c.other)})" if c.other else ""),
        "split": lambda: f"new person {c.name!r} ({c.person}) with {n} face(s)" + (f" from {label(c.other)}" if c.other else ""),
        "reject": lambda: f"{n} face(s) removed from {label(c.person)}",
        "merge": lambda: f"{label(c.other)} merged into {label(c.person)}",
        "hide": lambda: f"{label(c.person)} hidden",
        "unhide": lambda: f"{label(c.person)} shown again",
    }.get(c.kind, lambda: c.kind)()
    return what


def as_dict(c: CorrectionRow) -> dict:
    d = asdict(c)
    d["before"] = json.loads(c.before) if c.before else None
    return d


def record(settings, change):
    """Make one correction, ``change(Corrections(store))``, in a write of its own, and return what
    it returns: the CLI's correction commands and the review page both go through here.

    When no service holds the store this process takes the writer's lock, applies the correction
    to the people and updates the tree now; when one does, SQLite's own locking serialises the
    write and the service, which watches the store's data_version, does both itself.
    A :class:`CorrectionError` leaves the store as it was."""
    from .pipeline import Organizer  # (pipeline imports the clustering, which reads corrections)

    store = Store.open_for_edit(settings.db_path)
    try:
        result = change(Corrections(store))
        if store.locked:
            org = Organizer(settings, store, workers=1)
            try:
                org.apply_corrections()
                org.reconcile()
            finally:
                org.close()
        return result
    finally:
        store.close()
