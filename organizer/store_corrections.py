"""Correction rows: the store's tables of the user's corrections (issue 14).

One row per correction, with the faces it is about by photo content and index (so a photo
removed and put back keeps its corrections), never rewritten except to mark it undone; and
``auto_assign``, the people layer's own decision for each face a correction overrode. What each
kind of correction means: :mod:`organizer.corrections` (the API that records them);
:mod:`organizer.constraints` applies them. Part of the store (the only code that writes SQL, see
store.py), over the :class:`~organizer.store.Store`'s own connection and writer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .store import FaceClustering, Store, chunks


@dataclass
class CorrectionRow:
    """One correction as stored (see :mod:`organizer.corrections` for what each kind means)."""
    id: int
    kind: str  # name, assign, split, reject, merge, hide, unhide
    person: int | None
    other: int | None  # assign/split: the person the faces came from; merge: the person merged away
    name: str | None
    before: str | None  # JSON: what undo restores
    source: str  # folders, cli, known
    created_at: float
    undone: bool
    faces: list[int]  # current face ids (faces of photos no longer in the library are left out)
    horizon: int = 0  # the highest face id when it was made: faces above it arrived later


class CorrectionLog:
    """The corrections rows (record, list, undo) and the people layer's decisions they overrode."""

    def __init__(self, store: Store):
        self.store = store
        self.db = store.db

    def add(self, kind: str, source: str, person: int | None = None, other: int | None = None,
            name: str | None = None, faces: Iterable[int] = (), before=None) -> int:
        """Record one correction (and the faces it is about); returns its id."""
        with self.db.atomic():
            cur = self.db.execute(
                "insert into corrections (kind, person, other, name, before, source, created_at, undone, horizon)"
                " values (?, ?, ?, ?, ?, ?, ?, 0, (select coalesce(max(id), 0) from faces))",
                [kind, person, other, name, None if before is None else json.dumps(before), source, time.time()])
            cid = cur.lastrowid
            faces = [int(f) for f in faces]
            for chunk in chunks(faces):
                self.db.execute(
                    "insert into correction_faces (correction, sha256, idx) select ?, sha256, idx from faces"
                    f" where id in ({','.join('?' * len(chunk))})", [cid, *chunk])
        return cid

    def rows(self, include_undone: bool = True) -> list[CorrectionRow]:
        """Every correction in the order it was made, with its faces as current face ids."""
        faces: dict[int, list[int]] = {}
        for corr, fid in self.db.execute(
            "select cf.correction, f.id from correction_faces cf join faces f"
            " on f.sha256 = cf.sha256 and f.idx = cf.idx order by cf.correction, f.id"
        ):
            faces.setdefault(corr, []).append(fid)
        where = "" if include_undone else " where undone=0"
        return [
            CorrectionRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), faces.get(r[0], []), r[9] or 0)
            for r in self.db.execute(
                "select id, kind, person, other, name, before, source, created_at, undone, horizon from corrections"
                f"{where} order by id")
        ]

    def last(self) -> CorrectionRow | None:
        """The latest correction not undone yet."""
        row = self.db.execute("select max(id) from corrections where undone=0").fetchone()
        if not row or row[0] is None:
            return None
        return next(c for c in self.rows(include_undone=False) if c.id == row[0])

    def mark_undone(self, correction_id: int) -> None:
        self.db.execute("update corrections set undone=1 where id=?", [correction_id])

    # ---- the people layer's own decisions, where a correction overrode them ------------------
    def auto_assignments(self) -> dict[int, FaceClustering]:
        """The people layer's own decision for faces a correction overrode."""
        return {r[0]: FaceClustering(r[1], bool(r[2]), r[3], r[4]) for r in self.db.execute(
            "select face, cluster_id, doubtful, doubt_reason, nearest_cluster from auto_assign")}

    def raw_assignments(self) -> dict[int, FaceClustering]:
        """Like :meth:`Store.saved_assignments`, but the people layer's own decisions (before corrections)."""
        out = self.store.saved_assignments()
        out.update({f: a for f, a in self.auto_assignments().items() if f in out})
        return out

    def save_corrected(self, auto: dict[int, tuple | None]) -> None:
        """Record (tuple) or clear (None) the people layer's own decision of overridden faces."""
        with self.db.atomic():
            self.db.conn.executemany("delete from auto_assign where face=?",
                                     [(f,) for f, a in auto.items() if a is None])
            self.db.conn.executemany(
                "insert or replace into auto_assign (face, cluster_id, doubtful, doubt_reason, nearest_cluster)"
                " values (?, ?, ?, ?, ?)",
                [(f, a[0], int(a[1]), a[2], a[3]) for f, a in auto.items() if a is not None])
