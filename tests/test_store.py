"""Store invariants that the clustering relies on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from organizer.encode import FaceRecord, PhotoResult
from organizer.store import PhotoFile, Store
from organizer.store_review import ReviewQueries


def _photo(path: str, n: int, seed: int) -> PhotoResult:
    rng = np.random.default_rng(seed)
    faces = [FaceRecord(10, 60, 60, 10, rng.normal(0, 0.1, 128), 100.0) for _ in range(n)]
    return PhotoResult(path=Path(path), width=100, height=100, faces=faces)


def test_face_ids_are_never_reused(tmp_path):
    """SQLite reuses the largest rowid after a delete; the engine would then take a new face for
    an old, unchanged one (seen: a folder emptied and refilled was never sorted)."""
    with Store.open(tmp_path / "o.db") as store:
        store.record_encoded(PhotoFile("/p/a.jpg", 1, 1.0), "a" * 64, _photo("/p/a.jpg", 2, 1))
        first = {f.id for f in store.faces()}
        store.remove_photos(["/p/a.jpg"])
        assert not store.faces()
        store.record_encoded(PhotoFile("/p/b.jpg", 1, 1.0), "b" * 64, _photo("/p/b.jpg", 3, 2))
        second = {f.id for f in store.faces()}
    assert len(first) == 2 and len(second) == 3 and not first & second
    with Store.open(tmp_path / "o.db") as store:  # the counter survives a restart
        store.record_encoded(PhotoFile("/p/c.jpg", 1, 1.0), "c" * 64, _photo("/p/c.jpg", 1, 3))
        third = {f.id for f in store.faces()} - second
    assert len(third) == 1 and min(third) > max(second)


def test_deleted_faces_are_logged_for_the_clustering(tmp_path):
    """The clustering learns of deleted faces from a log a trigger fills (no comparison of every
    face id per update): deletions by the store and by hand (sqlite3) alike; each is told once."""
    with Store.open(tmp_path / "o.db") as store:
        store.record_encoded(PhotoFile("/p/a.jpg", 1, 1.0), "a" * 64, _photo("/p/a.jpg", 2, 1))
        store.record_encoded(PhotoFile("/p/b.jpg", 1, 1.0), "b" * 64, _photo("/p/b.jpg", 2, 2))
        ids = {f.sha256[0]: set() for f in store.faces()}
        for f in store.faces():
            ids[f.sha256[0]].add(f.id)
        assert store.take_removed_faces() == set()
        assert store.usable_ids(0, 0.0, after=min(ids["a"])) == (ids["a"] | ids["b"]) - {min(ids["a"])}
        store.remove_photos(["/p/a.jpg"])
        assert store.take_removed_faces() == ids["a"]
        assert store.take_removed_faces() == set()
        victim = min(ids["b"])
        with store.db.conn:
            store.db.conn.execute("delete from faces where id=?", [victim])  # a hand edit
        assert store.take_removed_faces() == {victim}


def test_paths_round_trip_and_are_looked_up_by_key(tmp_path):
    """Any path the file system can hold comes back as it went in (a name that is not UTF-8 is
    kept as bytes), in the full listing and when a batch asks for its own paths only."""
    import os

    odd = os.fsdecode(b"/p/caf\xe9.jpg")
    paths = ["/p/a.jpg", odd, "/p/x|y.jpg", "/p/é.jpg"]
    with Store.open(tmp_path / "o.db") as store:
        for i, p in enumerate(paths):
            store.record_failure(PhotoFile(p, i + 1, float(i)), f"reason {i}")
        every = store.photo_states()
        assert set(every) == set(paths)
        assert store.photo_states([odd, "/p/a.jpg", "/p/missing.jpg"]) == {p: every[p] for p in (odd, "/p/a.jpg")}
        assert store.error_of(odd) == "reason 1"
        assert [e["path"] for e in ReviewQueries(store).failures()] == sorted(paths, key=lambda p: (p == odd, p))
        store.remove_photos([odd])
        assert set(store.photo_states()) == set(paths) - {odd}


def test_a_transaction_that_reads_then_writes_waits_for_another_writer(tmp_path):
    """The service's transactions read, then write; the review page or a CLI correction writes
    through its own connection meanwhile. In WAL mode a transaction begun without the write lock
    fails at once ("database is locked", no busy wait helps) when another connection committed
    after its read; the store's transactions take the lock when they begin, so the other writer
    waits its turn and both writes land."""
    import threading
    import time

    db = tmp_path / "organizer.db"
    with Store.open(db) as service:
        service.set_meta("counter", "0")
        done = threading.Event()
        errors = []

        def edit():
            other = Store.open_for_edit(db)  # the instance lock is taken: SQLite's locking only
            try:
                assert not other.locked
                with other.db.atomic():
                    other.set_meta("page", "renamed")
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                other.db.conn.close()
            done.set()

        with service.db.atomic():
            n = int(service.get_meta("counter"))  # the read
            thread = threading.Thread(target=edit)
            thread.start()
            time.sleep(0.5)  # the other writer tries meanwhile
            service.set_meta("counter", str(n + 1))  # the write
        thread.join(30)
        assert done.is_set() and errors == []
        assert service.get_meta("counter") == "1" and service.get_meta("page") == "renamed"
