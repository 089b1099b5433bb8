"""Opening a store file: refuse a foreign or damaged file, and lock the store for its one writer.

Nothing here writes SQL (store.py does); it only reads a file to decide whether it may be used.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path

APP_ID = "organizer"
SQLITE_MAGIC = b"SQLite format 3\x00"


class StoreError(Exception):
    """The store cannot be used (foreign or damaged file, missing store, bad edit, ...)."""


class StoreLocked(StoreError):
    """Another organizer holds the store's single-writer lock."""


def unusable_message(path: Path, exc: sqlite3.DatabaseError, doing: str = "use") -> str:
    """The one message for a store SQLite refuses: the disk (full, read-only, failing: the store is
    fine and nothing committed is lost) or the file itself (damaged)."""
    if isinstance(exc, sqlite3.OperationalError):
        return (f"cannot {doing} the store {path}: {exc}. Is the disk full, read-only or failing? "
                "Nothing committed is lost and the store is left as it is: run the organizer again once "
                "the disk is fixed.")
    return damaged_store_message(path, exc)


def damaged_store_message(path: Path, detail) -> str:
    return (f"the store {path} is damaged ({detail}); it is left exactly as it is. Move it away to have the "
            "organizer rebuild it from the photos (names given to people are lost), or restore a backup.")


def require_existing(path: Path) -> None:
    if not path.exists():
        raise StoreError(f"no store at {path} yet (run `organizer scan` or `organizer run` first)")


def check_file(path: Path) -> None:
    """Refuse a file at the store's path that is not an intact organizer store (a missing or
    empty file is a fresh store). The file is only read, and no -wal/-shm files are created."""
    if not path.exists():
        return
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a database file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise StoreError(f"cannot read the store {path}: {exc.strerror}") from None
    if not head and path.stat().st_size == 0:
        return  # an empty file (e.g. created by touch) is a fresh database
    if head != SQLITE_MAGIC:
        raise StoreError(
            f"{path} exists but is not a SQLite database; refusing to overwrite it. "
            "Point --db elsewhere or move the file away."
        )
    try:
        app = _app_of_intact(path)
    except sqlite3.OperationalError as exc:
        raise StoreError(unusable_message(path, exc, "open")) from None
    except sqlite3.DatabaseError as exc:
        if app_hint(path) == APP_ID:
            raise StoreError(damaged_store_message(path, exc)) from None
        raise StoreError(
            f"{path} is a damaged or unreadable SQLite file ({exc}); refusing to overwrite it. "
            "Move it away (the organizer rebuilds its store from the photos) or point --db elsewhere."
        ) from None
    if app not in (APP_ID, None):
        raise StoreError(
            f"{path} is a SQLite database that belongs to another program; refusing to touch it. "
            "Point --db elsewhere."
        )


def _app_of_intact(path: Path) -> str | None:
    """The app a SQLite file says it belongs to ("" if it does not say; None for a file without
    tables, which is a fresh store), after checking every page of an organizer store."""
    # Without a -wal file nobody has the store open: read it as immutable, which creates no
    # -wal/-shm files next to a file that may not be ours. With one, read it normally (WAL).
    immutable = "" if os.path.exists(f"{path}-wal") else "&immutable=1"
    conn = sqlite3.connect(f"file:{path}?mode=ro{immutable}", uri=True)
    try:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
        if not tables:
            return None
        app = ""
        if "meta" in tables:
            row = conn.execute("select value from meta where key='app'").fetchone()
            app = row[0] if row else ""
        if app == APP_ID:
            # the header, schema and meta can read fine while pages further in are garbage;
            # quick_check reads every page (about a second per GB) and catches that
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise StoreError(damaged_store_message(path, "; ".join(problems)))
        return app
    finally:
        conn.close()


def app_hint(path: Path) -> str | None:
    """The store's app name if it can still be read (a damaged store may still say whose it is)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            row = conn.execute("select value from meta where key='app'").fetchone()
            return row[0] if row else None
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def take_lock(path: Path):
    """The store's lock file, locked for this process (its pid written in it), creating the
    store's folder if needed. Raises :class:`StoreLocked` when another organizer holds it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fh = open(str(path) + ".lock", "a+")
    except OSError as exc:
        raise StoreError(f"cannot create the store folder {path.parent}: {exc.strerror}") from None
    try:
        fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_fh.seek(0)
        holder = lock_fh.read().strip() or "unknown"
        lock_fh.close()
        raise StoreLocked(
            f"another organizer (pid {holder}) is already using the store {path}; "
            "stop it first (only one instance may write a store)"
        ) from None
    lock_fh.seek(0)
    lock_fh.truncate()
    lock_fh.write(str(os.getpid()))
    lock_fh.flush()
    return lock_fh
