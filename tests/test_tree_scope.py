"""The service's tree update after a batch reconciles only the folders the store's writers marked
(Store.take_tree_changes, output.tree_scope). Whatever the change, it must leave exactly the tree
and manifest a full verified pass would: after each step of a seeded random sequence of changes
over the scanned dev store, a full ``reconcile(verify=True)`` finds nothing to do."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from organizer.encode import FaceRecord, PhotoResult
from organizer.output import DOUBTFUL, folder_name, reconcile, tree_scope
from organizer.store import FaceClustering, PhotoFile, Store
from organizer.tree import OutputTree

from .test_output import _copy_store


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if ".organizer" not in p.parts}


class Changes:
    """Random changes of the kinds the service's writers make, through the store's own writers."""

    def __init__(self, store: Store, rng: random.Random, new_dir: Path):
        self.store, self.rng, self.new_dir = store, rng, new_dir
        self.made = 0

    def _people(self) -> list[dict]:
        return [p for p in self.store.people() if p["size"]]

    def _faces(self, where: str = "1=1"):
        return self.store.faces_where(f"{where} order by id", [])

    def _paths(self) -> list[str]:
        return sorted(p for p, s in self.store.photo_states().items() if s.status == "ok")

    def _save(self, assignments: dict, people: set[int] = frozenset(), removed=()) -> None:
        """Save new places of faces, with the clusters' sizes and representatives brought up to date."""
        now = {f.id: FaceClustering(f.cluster_id, f.doubtful, f.doubt_reason, f.nearest_cluster) for f in self._faces()}
        now.update(assignments)
        touched = {a.cluster_id for a in assignments.values()} | set(people)
        touched |= {f.cluster_id for f in self._faces() if f.id in assignments}
        clusters = {}
        for cid in touched - {None} - set(removed):
            members = sorted(f for f, a in now.items() if a.cluster_id == cid and not a.doubtful)
            if members:
                clusters[cid] = (len(members), members[len(members) // 2])
            else:
                removed = (*removed, cid)
        self.store.save_clustering(assignments, clusters, removed, max(self.store.next_cluster_id(),
                                                                        max(clusters, default=0) + 1))

    def rename(self) -> None:
        p = self.rng.choice(self._people())
        name = self.rng.choice([None, f"Person {self.rng.randrange(1000)}", "Zoë ü"])
        if not any(q["name"] == name and q["id"] != p["id"] for q in self.store.people()):
            self.store.set_cluster_name(p["id"], name)

    def hide(self) -> None:
        p = self.rng.choice(self.store.people())
        self.store.set_hidden(p["id"], not p["hidden"])

    def merge(self) -> None:
        people = self._people()
        if len(people) > 3:
            a, b = self.rng.sample(people, 2)
            moved = {f.id: FaceClustering(b["id"], False, None, b["id"]) for f in self._faces(f"cluster_id={a['id']}")}
            self._save(moved, {b["id"]}, removed=(a["id"],))

    def reject(self) -> None:
        faces = self._faces("doubtful=0 and cluster_id is not null")
        f = self.rng.choice(faces)
        self._save({f.id: FaceClustering(None, True, "rejected", f.cluster_id)}, {f.cluster_id})

    def move(self) -> None:
        f = self.rng.choice(self._faces())
        to = self.rng.choice(self._people())["id"]
        self._save({f.id: FaceClustering(to, False, None, to)}, {to})

    def split(self) -> None:
        """Some faces of a person into a new one (a new cluster id, as the clustering makes)."""
        p = self.rng.choice(self._people())
        faces = self._faces(f"cluster_id={p['id']} and doubtful=0")
        new = self.store.next_cluster_id()
        part = faces[: max(1, len(faces) // 2)]
        self._save({f.id: FaceClustering(new, False, None, new) for f in part}, {p["id"], new})

    def doubt_nearest(self) -> None:
        faces = self._faces("doubtful=1")
        if faces:
            f = self.rng.choice(faces)
            near = self.rng.choice(self.store.people())["id"]
            self._save({f.id: FaceClustering(f.cluster_id, True, f.doubt_reason, near)})

    def _copy(self, path: str, name: str) -> PhotoFile:
        self.made += 1
        dst = self.new_dir / f"{self.made:03d}" / name
        dst.parent.mkdir(parents=True)
        shutil.copy(path, dst)
        return PhotoFile(str(dst), dst.stat().st_size, dst.stat().st_mtime)

    def new_photo(self) -> None:
        """A photo with new content and one face, clustered into a person (or doubtful)."""
        src = self.rng.choice(self._paths())
        photo = self._copy(src, os.path.basename(src))
        old = self.store.faces_of_photo(src)[0]
        face = FaceRecord(old.top, old.right, old.bottom, old.left, np.zeros(128), 100.0)
        sha = f"{self.made:064x}"
        self.store.record_encoded(photo, sha, PhotoResult(Path(photo.path), 0, 0, [face]))
        (fid,) = [f.id for f in self.store.faces_where("sha256=?", [sha])]
        if self.rng.random() < 0.3:
            self._save({fid: FaceClustering(None, True, "doubt", old.cluster_id)})
        else:
            to = self.rng.choice(self._people())["id"]
            self._save({fid: FaceClustering(to, False, None, to)}, {to})

    def duplicate(self) -> None:
        """The same content under another name (sorting before or after the first: the link's name)."""
        src = self.rng.choice(self._paths())
        sha = self.store.db.execute("select sha256 from photos where path=?", [src]).fetchone()[0]
        self.store.record_duplicate(self._copy(src, self.rng.choice(["a.jpg", "zz.jpg"])), sha)

    def remove(self) -> None:
        path = self.rng.choice(self._paths())
        people = {f.cluster_id for f in self.store.faces_of_photo(path)}
        self.store.remove_photos([path])
        self._save({}, people - {None})

    def fail(self) -> None:
        """A copy the service made earlier now fails to read (its faces go with its content)."""
        mine = [p for p in self._paths() if p.startswith(str(self.new_dir))]
        if mine:
            path = self.rng.choice(mine)
            people = {f.cluster_id for f in self.store.faces_of_photo(path)}
            self.store.record_failure(PhotoFile(path, 1, 1.0), "cannot be read")
            self._save({}, people - {None})


STEPS = ["rename", "hide", "merge", "reject", "move", "split", "doubt_nearest", "new_photo", "duplicate",
         "remove", "fail"]


@pytest.mark.parametrize("seed", [1, 2])
def test_partial_update_leaves_what_a_full_pass_would(dev_library, tmp_path, seed):
    out = tmp_path / "sorted"
    rng = random.Random(seed)
    with Store.open(_copy_store(dev_library, tmp_path)) as store:
        reconcile(store, out)
        store.take_tree_changes()
        changes = Changes(store, rng, tmp_path / "new")
        partial = 0
        for step in range(40):
            kind = rng.choice(STEPS)
            for _ in range(rng.choice([1, 1, 2])):
                getattr(changes, kind)()
            scope = tree_scope(store, store.take_tree_changes())
            partial += scope is not None
            reconcile(store, out, verify=False, scope=scope)
            manifest, listing = store.manifest()[0], _listing(out)
            full = reconcile(store, out, verify=True)
            assert (full.created, full.removed, full.errors) == (0, 0, []), (step, kind)
            assert store.manifest()[0] == manifest, (step, kind)
            assert _listing(out) == listing, (step, kind)
            assert not store.take_tree_changes().people  # a reconcile marks nothing
        assert partial >= 35  # nearly every step took the proportional path
        assert DOUBTFUL in {rp.split("/")[0] for rp in manifest}


def test_partial_update_reads_only_the_touched_folders(dev_library, tmp_path):
    """A rename marks that person's folder (old and new name) and doubtful/, nothing else."""
    out = tmp_path / "sorted"
    with Store.open(_copy_store(dev_library, tmp_path)) as store:
        reconcile(store, out)
        assert store.take_tree_changes().everything  # a fresh handle: nothing tracked yet
        p = next(p for p in store.people() if p["size"] and not p["hidden"])
        before = folder_name(p["id"], p["name"])
        assert (out / before).is_dir()
        store.set_cluster_name(p["id"], "Somebody")
        scope = tree_scope(store, store.take_tree_changes())
        assert scope == {before, "Somebody", DOUBTFUL}
        reconcile(store, out, verify=False, scope=scope)
        assert (out / "Somebody").is_dir() and not (out / before).exists()
        assert store.take_tree_changes().people == set()


def test_writes_of_another_connection_mean_everything(dev_library, tmp_path):
    """`organizer name` while the service runs writes through its own connection: not tracked."""
    db = _copy_store(dev_library, tmp_path)
    with Store.open(db) as store:
        store.take_tree_changes()
        assert tree_scope(store, store.take_tree_changes()) == set()
        other = Store.open_for_edit(db)  # the lock is taken: a plain connection
        try:
            p = next(p for p in other.people() if p["size"])
            other.set_cluster_name(p["id"], "Elsewhere")
        finally:
            other.close()
        assert store.take_tree_changes().everything


def test_an_entry_that_failed_is_tried_again_though_nothing_marks_its_folder(dev_library, tmp_path):
    """Through OutputTree, as the service updates: a new photo whose file went before its link was
    made fails; once the file is back, the next update makes the link (its folder is kept in scope)."""
    out = tmp_path / "sorted"
    with Store.open(_copy_store(dev_library, tmp_path)) as store:
        tree = OutputTree(store, out, "hardlink", 100_000_000, lambda: None)
        tree.update(verify=True)
        old = store.faces_where("doubtful=0 and cluster_id is not null order by id", [])[0]
        person = store.person(old.cluster_id)
        folder = folder_name(person["id"], person["name"])
        src = store.db.execute("select min(path) from photos where sha256=?", [old.sha256]).fetchone()[0]
        copy = tmp_path / "new" / "aaa_new.jpg"
        copy.parent.mkdir()
        shutil.copy(src, copy)
        face = FaceRecord(old.top, old.right, old.bottom, old.left, np.zeros(128), 100.0)
        store.record_encoded(PhotoFile(str(copy), 1, 1.0), "f" * 64, PhotoResult(copy, 0, 0, [face]))
        (fid,) = [f.id for f in store.faces_where("sha256=?", ["f" * 64])]
        store.save_clustering({fid: FaceClustering(person["id"], False, None, person["id"])},
                              {person["id"]: (person["size"] + 1, person["representative_face"])}, (),
                              store.next_cluster_id())
        copy.unlink()
        failed = tree.update(verify=False)
        assert failed.errors and folder in failed.failed_folders
        assert not (out / folder / "aaa_new.jpg").exists()
        shutil.copy(src, copy)
        again = tree.update(verify=False)
        assert again.errors == [] and (out / folder / "aaa_new.jpg").is_file()


def test_manifest_of_some_folders_holds_names_that_are_not_utf8(tmp_path):
    """A folder's manifest rows are a key range, as text and as BLOB (a photo name that is not UTF-8)."""
    with Store.open(tmp_path / "organizer.db") as store:
        for rp in ["Ann/a.jpg", "Ann/caf\udce9.jpg", "Ann/faces/x.jpg", "Anna/b.jpg", "Ann0/c.jpg", "An/d.jpg",
                   "Bob/caf\udce9.jpg", "Ann"]:
            store.manifest_add(rp, "link", "/photos/" + rp)
        got, _ = store.manifest({"Ann", "Bob"})
        assert sorted(got) == sorted(["Ann/a.jpg", "Ann/caf\udce9.jpg", "Ann/faces/x.jpg", "Bob/caf\udce9.jpg"])
        assert got["Ann/caf\udce9.jpg"] == ("link", "/photos/Ann/caf\udce9.jpg")
        assert len(store.manifest()[0]) == 8
