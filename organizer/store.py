"""Store: the SQLite database of photos, faces, clusters and the output manifest.

This module and its siblings over the same connection, store_review.py (the read queries
behind what the user sees), store_corrections.py (the corrections rows) and store_known.py (the
known people's reference faces), are the only code that writes SQL. The service holds one connection and writes from one thread; each photo's
result, each removal and each clustering update is committed in one transaction, so killing the
process at any moment leaves a consistent database that the next start resumes from. Opening
and locking the file: storefile.py.

The writers of a handle also note which person folders of the output tree they change
(:class:`ChangedFolders`, taken by :meth:`Store.take_tree_changes`), so the service's tree update
after a batch reconciles only those; what is not tracked marks everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sqlite_utils
from sqlite_utils.migrations import Migrations

from .logs import printable
from .storefile import APP_ID, StoreError, StoreLocked, check_file, require_existing, take_lock

__all__ = ["Store", "StoreError", "StoreLocked", "PhotoFile", "PhotoState", "FaceVectors", "FaceClustering", "Face",
           "ChangedFolders"]

migrations = Migrations("organizer")


ENCODER = "encoder"  # meta key: what made the stored encodings (encode.encoder_id)
REENCODING = "reencoding"  # meta key: an unfinished re-encoding, {"encoder": id, "after": last sha256 done}
OUTPUT_ERRORS = "output_errors"  # meta key: the last reconcile's errors (JSON list), for `status`
TREE_UNCLEAR = "tree_unclear"  # meta key: changes in the output tree not understood (JSON list), for `status`


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["meta"].insert_all(
        [{"key": "app", "value": APP_ID}, {"key": "next_cluster_id", "value": "1"}]
    )
    db["images"].create(
        {"sha256": str, "width": int, "height": int, "face_count": int, "encoded_at": float},
        pk="sha256",
    )
    db["photos"].create(
        {
            "path": str,
            "sha256": str,
            "size": int,
            "mtime": float,
            "status": str,  # "ok" or "failed"
            "error": str,
            "updated_at": float,
        },
        pk="path",
    )
    db["photos"].create_index(["sha256"])
    db["photos"].create_index(["status"])
    db["faces"].create(
        {
            "id": int,
            "sha256": str,
            "idx": int,
            "top": int,
            "right": int,
            "bottom": int,
            "left": int,
            "size": int,
            "sharpness": float,
            "encoding": bytes,
            "cluster_id": int,
            "doubtful": int,
            "doubt_reason": str,
            "nearest_cluster": int,
        },
        pk="id",
        foreign_keys=[("sha256", "images", "sha256")],
    )
    db["faces"].create_index(["sha256", "idx"], unique=True)
    db["faces"].create_index(["cluster_id"])
    db["clusters"].create(
        {"id": int, "name": str, "representative_face": int, "size": int}, pk="id"
    )
    db["clusters"].create_index(["name"], unique=True)
    db["output_entries"].create(
        {"relpath": str, "kind": str, "source": str, "ident": str, "created_at": float}, pk="relpath"
    )


@migrations()
def m002_face_ids_never_reused(db: sqlite_utils.Database) -> None:
    """Face ids come from a counter that only grows. SQLite reuses the largest rowid once its row
    is deleted, and a new face under an old id looks unchanged to the clustering engine."""
    (top,) = db.execute("select coalesce(max(id), 0) from faces").fetchone()
    db["meta"].upsert({"key": "next_face_id", "value": str(top + 1)}, pk="key")


@migrations()
def m003_removed_faces_log(db: sqlite_utils.Database) -> None:
    """Deleted face ids are logged by a trigger (whatever deletes them, hand edits included), so
    the clustering learns of removals without comparing every face id on each update."""
    db.execute("create table if not exists removed_faces (id integer primary key)")
    db.execute(
        "create trigger if not exists faces_removed after delete on faces"
        " begin insert or ignore into removed_faces (id) values (old.id); end"
    )


@migrations()
def m004_doubtful_faces_index(db: sqlite_utils.Database) -> None:
    """Doubtful faces by an index of their own (partial: only they are in it), so counting them
    (`status`, the service's status line after every batch) does not read every face's row."""
    db.execute("create index if not exists idx_faces_doubtful on faces (id) where doubtful = 1")


@migrations()
def m005_corrections(db: sqlite_utils.Database) -> None:
    """The user's corrections (issue 14): one row per correction, never rewritten except to mark it
    undone, so a recluster replays them. Faces are referred to by their photo content and index
    (sha256, idx) as well as their id, so a photo removed and put back keeps its corrections.

    ``auto_assign`` keeps the people layer's own decision for the faces a correction overrode
    (the final one is in ``faces``): the next start resumes the people layer from it."""
    db["corrections"].create(
        {"id": int, "kind": str, "person": int, "other": int, "name": str, "before": str,
         "source": str, "created_at": float, "undone": int, "horizon": int},
        pk="id", not_null={"kind", "source", "created_at"}, defaults={"undone": 0},
    )
    db["correction_faces"].create({"correction": int, "sha256": str, "idx": int})
    db["correction_faces"].create_index(["correction"])
    db["auto_assign"].create(
        {"face": int, "cluster_id": int, "doubtful": int, "doubt_reason": str, "nearest_cluster": int}, pk="face"
    )
    db["clusters"].add_column("hidden", int, not_null_default=0)
    # names given before corrections existed: the person is the faces it holds now
    now = time.time()
    for cid, name in db.execute("select id, name from clusters where name is not null").fetchall():
        cur = db.execute(
            "insert into corrections (kind, person, name, source, created_at, undone) values ('name', ?, ?, 'cli', ?, 0)",
            [cid, name, now])
        db.execute("insert into correction_faces (correction, sha256, idx) select ?, sha256, idx from faces"
                   " where cluster_id=? and doubtful=0", [cur.lastrowid, cid])


@migrations()
def m006_reference_faces(db: sqlite_utils.Database) -> None:
    """The known people's reference photos, encoded (known.py): by file content and encoder, so a
    rescan of the reference folder encodes only photos it has not seen (store_known.py)."""
    db["reference_faces"].create({"sha256": str, "encoder": str, "faces": int, "encoding": bytes},
                                 pk=("sha256", "encoder"))


@dataclass
class Face:
    id: int
    sha256: str
    top: int
    right: int
    bottom: int
    left: int
    size: int
    sharpness: float
    cluster_id: int | None
    doubtful: bool
    doubt_reason: str | None
    nearest_cluster: int | None


def db_text(text: str) -> str | bytes:
    """A path (or text holding one) as the store keeps it.

    Paths are SQLite text, which must be UTF-8. A file name that is not (Latin-1 from an old
    camera or archive) reaches Python as lone surrogates (os.fsdecode), which no UTF-8 text can
    hold; it is kept as its raw bytes instead, a BLOB. A BLOB never equals a text value, so both
    kinds live in one column and every lookup goes through this function. (A text escape would
    have to escape its own escape character too, renaming paths already stored.)
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text)


def py_text(value: str | bytes | None) -> str | None:
    """The inverse of :func:`db_text`."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


class PhotoFile(NamedTuple):
    """A photo file as the organizer saw it: a changed size or mtime means changed content."""

    path: str
    size: int
    mtime: float


class PhotoState(NamedTuple):
    size: int
    mtime: float
    status: str  # "ok" or "failed"


class FaceClustering(NamedTuple):
    """What the clustering says of one face."""

    cluster_id: int | None  # its person; None: noise or unusable
    doubtful: bool
    reason: str | None  # why it is doubtful
    nearest_cluster: int | None  # the person it resembles most (a doubtful face's hint)


@dataclass(frozen=True)
class FaceVectors:
    """Faces for the clustering, as parallel arrays in face id order."""

    ids: np.ndarray  # int64
    photos: np.ndarray  # sha256 of each face's photo content
    encodings: np.ndarray  # n x 128 float64 (float32 values, as dlib computes them)
    sharpness: np.ndarray
    size: np.ndarray  # pixels

    @classmethod
    def from_rows(cls, rows) -> "FaceVectors":
        enc = (
            # float32 values, as dlib computes them (and as the clustering engine keeps them)
            np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float64).reshape(len(rows), -1)
            .astype(np.float32).astype(np.float64)
            if rows
            else np.zeros((0, 128))
        )
        return cls(
            ids=np.array([r[0] for r in rows], dtype=np.int64),
            photos=np.array([r[1] for r in rows], dtype=object),
            encodings=enc,
            sharpness=np.array([r[3] for r in rows], dtype=np.float64),
            size=np.array([r[4] for r in rows], dtype=np.float64),
        )

    def __len__(self) -> int:
        return len(self.ids)


_FACE_VECTORS = "select id, sha256, encoding, sharpness, size from faces"


@dataclass
class ChangedFolders:
    """What changed for the output tree since the tree last looked (:meth:`Store.take_tree_changes`):
    the people whose folders may hold other entries now, each with the name it had then (a renamed
    person is there under both names), whether ``doubtful/`` may have changed, or ``everything``
    (not tracked: the tree must be compared in full)."""

    people: set[tuple[int, str | None]] = field(default_factory=set)
    doubtful: bool = False
    everything: bool = False


def chunks(values: list, size: int = 500) -> Iterator[list]:
    """``values`` in slices of ``size``: an ``in (?, ...)`` list stays under SQLite's variable limit."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


class _Database(sqlite_utils.Database):
    """sqlite-utils' Database whose outermost transaction takes the write lock when it begins
    (BEGIN IMMEDIATE). In WAL mode a transaction begun without it that reads, then writes after
    another connection (the review page, a CLI correction) committed, fails at once with "database
    is locked" (SQLITE_BUSY_SNAPSHOT: waiting cannot help, its snapshot is stale); one that holds
    the lock from the start makes the other writer wait its turn (busy_timeout). sqlite-utils
    offers no option for this; nested blocks stay its savepoints."""

    @contextlib.contextmanager
    def atomic(self):
        if self.conn.in_transaction:
            with super().atomic():
                yield self
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                self.rollback()
                raise


class Store:
    """The organizer's database. Open with :meth:`open` (writer) or :meth:`open_readonly`."""

    def __init__(self, db: sqlite_utils.Database, path: Path, lock_fh=None, readonly: bool = False):
        self.db = db
        self.path = path
        self._lock_fh = lock_fh
        self.readonly = readonly
        # the writers below mark what they change for the tree; a new handle knows nothing yet
        self._changes = ChangedFolders(everything=True)
        self._seen_version: int | None = None

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, create: bool = True) -> "Store":
        """Open (creating if needed, unless not ``create``) for writing; refuses a second writer
        on the same store (:class:`StoreLocked`)."""
        path = Path(path)
        if not create:
            require_existing(path)
        check_file(path)
        lock_fh = take_lock(path)
        conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        db = _Database(conn)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=30000")
        migrations.apply(db)
        return cls(db, path, lock_fh)

    @classmethod
    def open_for_edit(cls, path: Path) -> "Store":
        """Open an existing store for a small edit while the service may be running.

        Takes the instance lock when it is free (the caller may then also update the tree);
        otherwise relies on SQLite's own locking for the single write (``locked`` is False).
        """
        path = Path(path)
        require_existing(path)
        try:
            return cls.open(path)
        except StoreLocked:
            pass
        conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        db = _Database(conn)
        db.execute("PRAGMA busy_timeout=30000")
        return cls(db, path)

    @property
    def locked(self) -> bool:
        """True when this handle holds the single-writer lock."""
        return self._lock_fh is not None

    @classmethod
    def open_readonly(cls, path: Path) -> "Store":
        """Open for reading while a service may be writing (WAL allows it)."""
        path = Path(path)
        require_existing(path)
        check_file(path)
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        db = sqlite_utils.Database(conn)
        if migrations.pending(db):
            raise StoreError(f"the store {path} needs an upgrade; run any writing command first")
        return cls(db, path, readonly=True)

    def close(self) -> None:
        self.db.conn.close()
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def data_version(self) -> int:
        """Changes whenever another connection commits (e.g. `organizer name` while running)."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    # ---- what changed for the output tree ----------------------------------------------------
    def take_tree_changes(self) -> ChangedFolders:
        """What the writers of this handle changed for the output tree since the last call (then
        forgotten). ``everything`` the first time, and after another connection wrote (`organizer
        name` while the service runs): those writes are not tracked."""
        version = self.data_version()
        out, self._changes = self._changes, ChangedFolders()
        out.everything = out.everything or version != self._seen_version
        self._seen_version = version
        return out

    def _touch_people(self, ids: Iterable[int | None]) -> None:
        """Mark the folders of these people (under their current names)."""
        ids = sorted({i for i in ids if i is not None})
        for chunk in chunks(ids):
            self._changes.people.update(
                (cid, name) for cid, name in
                self.db.execute(f"select id, name from clusters where id in ({','.join('?' * len(chunk))})", chunk))

    def _touch_contents(self, shas: Iterable[str | None]) -> None:
        """Mark the folders that link a photo of these contents (or crop one of its faces): a path
        of it came or went."""
        shas = sorted({s for s in shas if s is not None})
        for chunk in chunks(shas):
            marks = ",".join("?" * len(chunk))
            places = self.db.execute(
                f"select distinct cluster_id, doubtful from faces where sha256 in ({marks})", chunk).fetchall()
            if not places:  # (new content: its faces are not placed yet)
                continue
            self._touch_people([cid for cid, _ in places])
            self._changes.doubtful |= any(doubtful for _, doubtful in places)
            self._changes.people.update(self.db.execute(  # a representative crop is made from the first path
                f"select id, name from clusters where representative_face in"
                f" (select id from faces where sha256 in ({marks}))", chunk).fetchall())

    def _touch_assignments(self, assignments: dict[int, FaceClustering]) -> None:
        """Mark the old and new folder of every face whose place changes."""
        people: set[int | None] = set()
        for chunk in chunks(sorted(assignments)):
            for fid, cid, doubtful, near in self.db.execute(
                    f"select id, cluster_id, doubtful, nearest_cluster from faces"
                    f" where id in ({','.join('?' * len(chunk))})", chunk).fetchall():
                new = assignments[fid]
                if (cid, bool(doubtful), near) != (new[0], bool(new[1]), new[3]):
                    people |= {cid, new[0]}
                    self._changes.doubtful |= bool(doubtful) or bool(new[1])
        self._touch_people(people)

    # ---- photos --------------------------------------------------------------------------
    def has_photos(self) -> bool:
        return self.db.execute("select exists(select 1 from photos)").fetchone()[0] == 1

    def photo_states(self, paths: Iterable[str] | None = None) -> dict[str, PhotoState]:
        """path -> state for every known photo, or for those of ``paths`` (by the primary key: a
        batch of the service does not read the whole table)."""
        sql = "select path, size, mtime, status from photos"
        if paths is None:
            return {py_text(r[0]): PhotoState(*r[1:]) for r in self.db.execute(sql)}
        keys = [db_text(str(p)) for p in paths]
        out = {}
        for chunk in chunks(keys):
            rows = self.db.execute(f"{sql} where path in ({','.join('?' * len(chunk))})", chunk)
            out.update({py_text(r[0]): PhotoState(*r[1:]) for r in rows})
        return out

    def known_sha(self, sha256: str) -> bool:
        return self.db.execute("select 1 from images where sha256=?", [sha256]).fetchone() is not None

    def record_encoded(self, photo: PhotoFile, sha256: str, result) -> None:
        """A photo whose content (``sha256``) was just encoded (``result``: an encode.PhotoResult)."""
        now = time.time()
        with self.db.atomic():
            if not self.known_sha(sha256):
                self._add_content(sha256, result, now)
            self._put_photo(photo, sha256, "ok", None, now)

    def record_duplicate(self, photo: PhotoFile, sha256: str) -> None:
        """A photo whose content is already stored under another path: it shares those faces."""
        with self.db.atomic():
            self._put_photo(photo, sha256, "ok", None, time.time())

    def record_failure(self, photo: PhotoFile, reason: str) -> None:
        """A photo that cannot be used; ``reason`` is shown by `status` (it is retried once per start)."""
        with self.db.atomic():
            self._put_photo(photo, None, "failed", reason, time.time())

    def _add_content(self, sha: str, result, now: float) -> None:
        self.db["images"].insert(
            {"sha256": sha, "width": result.width, "height": result.height,
             "face_count": len(result.faces), "encoded_at": now}
        )
        first = int(self.get_meta("next_face_id"))
        self.set_meta("next_face_id", str(first + len(result.faces)))
        self.db["faces"].insert_all(
            {"id": first + i, "sha256": sha, "idx": i, "top": f.top, "right": f.right, "bottom": f.bottom,
             "left": f.left, "size": f.size, "sharpness": f.sharpness, "doubtful": 0,
             "encoding": np.asarray(f.encoding, dtype=np.float64).tobytes()}
            for i, f in enumerate(result.faces)
        )

    def _put_photo(self, photo: PhotoFile, sha, status, error, now) -> None:
        """Write a photo's row. Content the path held before goes (with its faces) when no other
        path refers to it; the saved clustering no longer covers every face."""
        row = self.db.execute("select sha256 from photos where path=?", [db_text(photo.path)]).fetchone()
        self._touch_contents([row[0] if row else None, sha])
        self.db["photos"].upsert(
            {"path": db_text(photo.path), "sha256": sha, "size": photo.size, "mtime": photo.mtime,
             "status": status, "updated_at": now,
             "error": None if error is None else printable(error)},  # may quote an odd name
            pk="path",
        )
        if row and row[0] and row[0] != sha and not self.db.execute(
                "select 1 from photos where sha256=?", [row[0]]).fetchone():
            self.db.execute("delete from faces where sha256=?", [row[0]])
            self.db.execute("delete from images where sha256=?", [row[0]])
        self._mark_dirty()

    def remove_photos(self, paths: Iterable[str]) -> None:
        """Forget photos, and the content (with its faces) that no other path refers to."""
        with self.db.atomic():
            for path in paths:
                row = self.db.execute("select sha256 from photos where path=?", [db_text(path)]).fetchone()
                self._touch_contents([row[0] if row else None])
                self.db.execute("delete from photos where path=?", [db_text(path)])
            self._prune_orphans()
            self._mark_dirty()

    def _mark_dirty(self) -> None:
        """Faces changed: the saved clustering no longer covers every face."""
        self.db.execute("insert or replace into meta (key, value) values ('cluster_state', 'dirty')")

    def clustering_clean(self, fingerprint: str) -> bool:
        """True when the saved clustering covers every face and was made with these settings."""
        return self.get_meta("cluster_state") == fingerprint

    def _prune_orphans(self) -> None:
        orphan = "select sha256 from images where sha256 not in (select sha256 from photos where sha256 is not null)"
        self.db.execute(f"delete from faces where sha256 in ({orphan})")
        self.db.execute(f"delete from images where sha256 in ({orphan})")

    # ---- faces & clusters ----------------------------------------------------------------
    def usable_encodings(self, min_size: int, min_sharpness: float) -> FaceVectors:
        """The faces fit for clustering: at least ``min_size`` pixels and ``min_sharpness``."""
        return self.face_vectors("size>=? and sharpness>=? order by id", [min_size, min_sharpness])

    def unusable_encodings(self, min_size: int, min_sharpness: float, pending: bool = False) -> FaceVectors:
        """The faces too small or blurred to cluster; ``pending``: only those not given a doubt
        reason yet (an indexed query: an update need not read every face)."""
        cond = "not (size>=? and sharpness>=?)"
        if pending:
            cond = f"cluster_id is null and doubt_reason is null and {cond}"
        return self.face_vectors(f"{cond} order by id", [min_size, min_sharpness])

    def usable_ids(self, min_size: int, min_sharpness: float, after: int = 0) -> set[int]:
        """Ids of the faces fit for clustering (with an id above ``after``: a primary-key range,
        cheap however many faces there are)."""
        return {r[0] for r in self.db.execute(
            "select id from faces where id>? and size>=? and sharpness>=?", [after, min_size, min_sharpness])}

    def max_face_id(self) -> int:
        return self.db.execute("select coalesce(max(id), 0) from faces").fetchone()[0]

    def take_removed_faces(self) -> set[int]:
        """Ids of the faces deleted since the last call; the log is emptied."""
        with self.db.atomic():
            ids = {r[0] for r in self.db.execute("select id from removed_faces")}
            self.db.execute("delete from removed_faces")
        return ids

    def faces_by_id(self, ids: Iterable[int]) -> FaceVectors:
        """The given faces (those that exist), in id order."""
        ids = list(ids)
        rows = []
        for chunk in chunks(ids):
            rows += self.db.execute(
                f"{_FACE_VECTORS} where id in ({','.join('?' * len(chunk))}) order by id",
                chunk,
            ).fetchall()
        rows.sort()
        return FaceVectors.from_rows(rows)

    def faces(self) -> list[Face]:
        return self.faces_where("1=1 order by id", [])

    def unassigned_faces(self) -> set[int]:
        """Faces stored but never clustered (no cluster and no doubt reason yet)."""
        return {r[0] for r in self.db.execute(
            "select id from faces where cluster_id is null and doubt_reason is null")}

    def saved_assignments(self) -> dict[int, FaceClustering]:
        return {
            r[0]: FaceClustering(r[1], bool(r[2]), r[3], r[4])
            for r in self.db.execute("select id, cluster_id, doubtful, doubt_reason, nearest_cluster from faces")
        }

    def cluster_assignments(self) -> dict[int, int | None]:
        return {r[0]: r[1] for r in self.db.execute("select id, cluster_id from faces")}

    def next_cluster_id(self) -> int:
        return int(self.db.execute("select value from meta where key='next_cluster_id'").fetchone()[0])

    def save_clustering(self, assignments: dict[int, FaceClustering], clusters: dict[int, tuple[int, int]],
                        removed: Iterable[int], next_cluster_id: int, full: bool = False,
                        fingerprint: str = "dirty") -> None:
        """Write each face's clustering and cluster -> (size, representative face).

        ``removed`` clusters are deleted (``full``: every cluster not in ``clusters``); ids are
        never reused (the counter only grows) and names of surviving clusters are kept.
        """
        with self.db.atomic():
            if full:
                self._changes.everything = True
            else:
                self._touch_assignments(assignments)
            self.db.conn.executemany(
                "update faces set cluster_id=?, doubtful=?, doubt_reason=?, nearest_cluster=? where id=?",
                [(cid, int(d), reason, near, fid) for fid, (cid, d, reason, near) in assignments.items()],
            )
            existing = {r[0]: r[1] for r in self.db.execute("select id, representative_face from clusters")}
            gone = (set(existing) - set(clusters)) if full else (set(removed) - set(clusters))
            changed = {c for c, (_, rep) in clusters.items() if c not in existing or existing[c] != rep}
            self._touch_people(gone | changed)
            self._changes.people.update((c, None) for c in changed if c not in existing)  # new: no name yet
            # a doubtful face's crop and caption name its nearest person, who may be new or gone
            self._changes.doubtful |= bool(gone) or any(c not in existing for c in clusters)
            for cid in gone:
                self.db.execute("delete from clusters where id=?", [cid])
            for cid, (size, rep) in clusters.items():
                if cid in existing:
                    self.db.execute("update clusters set size=?, representative_face=? where id=?", [size, rep, cid])
                else:
                    self.db["clusters"].insert({"id": cid, "name": None, "size": size, "representative_face": rep})
            self.db.execute("update meta set value=? where key='next_cluster_id'", [str(next_cluster_id)])
            self.db.execute("insert or replace into meta (key, value) values ('cluster_state', ?)", [fingerprint])

    def clusters(self) -> list[dict]:
        return list(self.db.query("select id, name, size, representative_face from clusters order by id"))

    def set_cluster_name(self, cluster_id: int, name: str | None) -> None:
        with self.db.atomic():
            if not self.db.execute("select 1 from clusters where id=?", [cluster_id]).fetchone():
                raise StoreError(f"there is no cluster {cluster_id}")
            clash = self.db.execute(
                "select id from clusters where name=? and id!=?", [name, cluster_id]
            ).fetchone()
            if name is not None and clash:
                raise StoreError(f"the name {name!r} is already used by cluster {clash[0]}")
            self._touch_people([cluster_id])  # under the old name, and the new one:
            self._changes.people.add((cluster_id, name))
            self._changes.doubtful = True  # doubtful crops and captions name the nearest person
            self.db.execute("update clusters set name=? where id=?", [name, cluster_id])

    def faces_by_image(self) -> list[tuple[str, list[str], list[int], list[tuple[int, int, int, int]]]]:
        """(sha256, its paths, face ids, boxes (top, right, bottom, left)) for every image with faces."""
        paths: dict[str, list[str]] = {}
        for sha, path in self.db.execute("select sha256, path from photos where sha256 is not null order by path"):
            paths.setdefault(sha, []).append(py_text(path))
        out: dict[str, tuple] = {}
        for sha, fid, t, r, b, l in self.db.execute(
            "select sha256, id, top, right, bottom, left from faces order by sha256, idx"
        ):
            entry = out.setdefault(sha, (sha, paths.get(sha, []), [], []))
            entry[2].append(fid)
            entry[3].append((t, r, b, l))
        return list(out.values())

    def set_encodings(self, encodings: dict[int, np.ndarray], progress: str | None = None) -> None:
        """Replace the encodings of existing faces (ids, boxes and clusters are kept); ``progress``
        is stored under REENCODING in the same transaction."""
        with self.db.atomic():
            self._changes.everything = True  # every montage's choice of faces may change
            self.db.conn.executemany(
                "update faces set encoding=? where id=?",
                [(np.asarray(e, dtype=np.float64).tobytes(), int(f)) for f, e in encodings.items()],
            )
            if progress is not None:
                self.db.execute("insert or replace into meta (key, value) values (?, ?)", [REENCODING, progress])
            self._mark_dirty()

    _PHOTOS_OF_FACES = ("select p.path, f.id, f.sha256 from photos p join faces f on f.sha256 = p.sha256"
                        " where p.status='ok'")

    def photos_of_faces(self, shas: Iterable[str] | None = None) -> Iterator[tuple[str, int, str]]:
        """(photo path, face id, sha256) for every ok photo with faces (or those of the contents
        ``shas``, by the sha256 index), in path order (SQLite's: text by its UTF-8 bytes, then BLOBs)."""
        if shas is None:
            rows = self.db.execute(f"{self._PHOTOS_OF_FACES} order by p.path, f.idx")
        else:
            found = []
            for chunk in chunks(sorted(set(shas))):
                found += self.db.execute(
                    f"select p.path, f.idx, f.id, f.sha256 from photos p join faces f on f.sha256 = p.sha256"
                    f" where +p.status='ok' and p.sha256 in ({','.join('?' * len(chunk))})", chunk).fetchall()
            found.sort(key=lambda r: (isinstance(r[0], bytes), r[0], r[1]))
            rows = ((path, fid, sha) for path, _, fid, sha in found)
        for path, face_id, sha in rows:
            yield py_text(path), face_id, sha

    def faces_of_people(self, ids: Iterable[int], doubtful: bool) -> list[Face]:
        """The confident faces of these people (by the cluster_id index), and every doubtful face
        if ``doubtful``, in id order."""
        ids = sorted(set(ids))
        out = []
        for chunk in chunks(ids):
            out += self.faces_where(f"cluster_id in ({','.join('?' * len(chunk))}) and doubtful=0", chunk)
        if doubtful:
            out += self.faces_where("doubtful=1", [])  # by the partial index of doubtful faces
        return sorted(out, key=lambda f: f.id)

    def face(self, face_id: int) -> Face | None:
        for f in self.faces_where("id=?", [face_id]):
            return f
        return None

    def face_vectors(self, where: str, params: list) -> FaceVectors:
        """The faces matching the SQL condition ``where`` (with ``params``), as arrays."""
        return FaceVectors.from_rows(self.db.execute(f"{_FACE_VECTORS} where {where}", params).fetchall())

    def faces_where(self, where: str, params: list) -> list[Face]:
        rows = self.db.execute(
            "select id, sha256, top, right, bottom, left, size, sharpness, cluster_id,"
            f" doubtful, doubt_reason, nearest_cluster from faces where {where}",
            params,
        ).fetchall()
        return [Face(*r[:9], bool(r[9]), r[10], r[11]) for r in rows]

    def path_for_sha(self, sha256: str) -> str | None:
        row = self.db.execute(
            # "+status": not by the status index (nearly every photo is ok), by the sha256 one
            "select min(path) from photos where sha256=? and +status='ok'", [sha256]
        ).fetchone()
        return py_text(row[0]) if row else None

    # ---- output manifest -----------------------------------------------------------------
    def manifest(self, folders: Iterable[str] | None = None
                 ) -> tuple[dict[str, tuple[str, str]], dict[str, str | None]]:
        """Every output entry the organizer created (or intends to), or those in the top-level
        ``folders``, in one read: relpath -> (kind, source), and relpath -> identity of the file
        made (device:inode, or the symlink target; None until it is made)."""
        entries, idents = {}, {}
        for relpath, kind, source, ident in self._manifest_rows(folders):
            relpath = py_text(relpath)
            entries[relpath] = (kind, py_text(source))
            idents[relpath] = ident
        return entries, idents

    def _manifest_rows(self, folders: Iterable[str] | None) -> list[tuple]:
        sql = "select relpath, kind, source, ident from output_entries"
        if folders is None:
            return self.db.execute(sql).fetchall()
        rows = []
        for folder in sorted(set(folders)):
            # "<folder>/" up to "<folder>0" ("0" follows "/"): a range of the primary key, as text and
            # as BLOB (relpaths holding a name that is not UTF-8, see db_text)
            for low, high in ((folder + "/", folder + "0"), (os.fsencode(folder + "/"), os.fsencode(folder + "0"))):
                rows += self.db.execute(f"{sql} where relpath >= ? and relpath < ?", [low, high]).fetchall()
        return rows

    def manifest_add(self, relpath: str, kind: str, source: str) -> None:
        self.db["output_entries"].upsert(
            {"relpath": db_text(relpath), "kind": kind, "source": db_text(source), "ident": None,
             "created_at": time.time()},
            pk="relpath",
        )

    def manifest_set_ident(self, relpath: str, ident: str) -> None:
        self.db.execute("update output_entries set ident=? where relpath=?", [ident, db_text(relpath)])

    def manifest_remove(self, relpath: str) -> None:
        self.db.execute("delete from output_entries where relpath=?", [db_text(relpath)])

    # ---- a photo's error, meta ------------------------------------------------------------
    def error_of(self, path: str) -> str | None:
        row = self.db.execute("select error from photos where path=?", [db_text(path)]).fetchone()
        return row[0] if row else None

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("select value from meta where key=?", [key]).fetchone()
        return row[0] if row else None

    def delete_meta(self, key: str) -> None:
        with self.db.atomic():
            self.db.execute("delete from meta where key=?", [key])

    def set_meta(self, key: str, value) -> None:
        self.db["meta"].upsert({"key": key, "value": json.dumps(value) if not isinstance(value, str) else value}, pk="key")

    # ---- people (the clusters table) ---------------------------------------------------------
    def new_person(self, name: str | None) -> int:
        """A person the user made (a new folder): a fresh id from the counter, never reused."""
        with self.db.atomic():
            pid = self.next_cluster_id()
            self.db.execute("update meta set value=? where key='next_cluster_id'", [str(pid + 1)])
            self.db["clusters"].insert({"id": pid, "name": name, "size": 0, "representative_face": None, "hidden": 0})
        return pid

    def person(self, person_id: int) -> dict | None:
        rows = list(self.db.query("select id, name, size, representative_face, hidden from clusters where id=?",
                                  [person_id]))
        return rows[0] if rows else None

    def people(self) -> list[dict]:
        """Every person row, hidden ones too (``hidden`` 0/1)."""
        return list(self.db.query("select id, name, size, representative_face, hidden from clusters order by id"))

    def set_hidden(self, person_id: int, hidden: bool) -> None:
        self._touch_people([person_id])
        self._changes.doubtful = True  # the hidden person's doubtful faces go nowhere
        self.db.execute("update clusters set hidden=? where id=?", [int(hidden), person_id])

    def people_with_faces(self) -> set[int]:
        """The people holding a confident face (one probe of the cluster_id index each, not a pass
        over every face)."""
        return {r[0] for r in self.db.execute(
            "select c.id from clusters c where exists"
            " (select 1 from faces f where f.cluster_id = c.id and f.doubtful = 0)")}

    def hidden_people(self) -> set[int]:
        return {r[0] for r in self.db.execute("select id from clusters where hidden=1")}

    def faces_of_photo(self, path: str) -> list[Face]:
        """The faces of the photo at ``path`` (in their order in the photo)."""
        row = self.db.execute("select sha256 from photos where path=?", [db_text(path)]).fetchone()
        if not row or row[0] is None:
            return []
        return self.faces_where("sha256=? order by idx", [row[0]])
