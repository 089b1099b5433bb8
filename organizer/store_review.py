"""Review queries: the store's read-only queries behind what the user sees.

`organizer status`, `people` and `doubtful`, the review page (the people grid, a person's page,
the doubtful faces) and the folder-event log read through :class:`ReviewQueries`; none of them
writes. It is part of the store (the only code that writes SQL, see store.py): it reads the
tables store.py defines, over the :class:`~organizer.store.Store`'s own connection.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from .store import OUTPUT_ERRORS, TREE_UNCLEAR, Face, Store, chunks, py_text


class ReviewQueries:
    """Counts, the people with a folder, a person's faces and the doubtful faces, read from one store."""

    def __init__(self, store: Store):
        self.store = store
        self.db = store.db

    # ---- status --------------------------------------------------------------------------
    def status(self, errors: int = 10) -> dict:
        q = lambda sql: self.db.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "photos": q("select count(*) from photos"),
            "photos_ok": q("select count(*) from photos where status='ok'"),
            "photos_with_faces": q("select count(*) from photos p join images i on i.sha256=p.sha256"
                                   " where i.face_count>0"),
            "photos_without_faces": q("select count(*) from photos p join images i on i.sha256=p.sha256"
                                      " where i.face_count=0"),
            "failed": q("select count(*) from photos where status='failed'"),
            "faces": q("select count(*) from faces"),
            # people with a folder: at least one confident face (a group that is all doubtful
            # so far has an id but no folder)
            "clusters": q("select count(*) from clusters c where c.hidden = 0 and exists "
                          "(select 1 from faces f where f.cluster_id = c.id and f.doubtful = 0)"),
            "named_clusters": q("select count(*) from clusters where name is not null"),
            "doubtful_faces": q("select count(*) from faces where doubtful=1"),
            "last_errors": [
                {"path": py_text(r[0]), "error": r[1]}
                for r in self.db.execute(
                    "select path, error from photos where status='failed' order by updated_at desc, path limit ?",
                    [errors],
                )
            ],
            "output_errors": json.loads(self.store.get_meta(OUTPUT_ERRORS) or "[]")[:errors],
            "corrections": q("select count(*) from corrections where undone=0"),
            "hidden_people": q("select count(*) from clusters where hidden=1"),
            "tree_unclear": json.loads(self.store.get_meta(TREE_UNCLEAR) or "[]")[:errors],
        }

    def failures(self) -> list[dict]:
        """Every failed photo (path, error), by path."""
        return [
            {"path": py_text(r[0]), "error": r[1]}
            for r in self.db.execute("select path, error from photos where status='failed' order by path")
        ]

    # ---- what the CLI shows (people, doubtful) --------------------------------------------
    def duplicate_count(self) -> int:
        """Photos whose content is also stored under another (earlier) name: identical files."""
        return self.db.execute(
            "select count(*) - count(distinct sha256) from photos where status='ok' and sha256 is not null"
        ).fetchone()[0]

    def people_summary(self) -> list[dict]:
        """Every person with a folder: id, name (None: cluster_<id>) and how many distinct photos
        (identical files count once) hold a confident face of them."""
        return list(self.db.query(
            "select c.id, c.name, count(distinct f.sha256) as photos from clusters c"
            " join faces f on f.cluster_id = c.id and f.doubtful = 0"
            " group by c.id order by c.id"
        ))

    def doubtful_photos(self) -> list[dict]:
        """One row per doubtful face: the photo (its first name), face id, reason, nearest person."""
        return [
            {"path": py_text(r[0]), "face": r[1], "reason": r[2], "nearest": r[3], "nearest_name": r[4]}
            for r in self.db.execute(
                "select min(p.path), f.id, f.doubt_reason, f.nearest_cluster, c.name from faces f"
                " join photos p on p.sha256 = f.sha256 and p.status = 'ok'"
                " left join clusters c on c.id = f.nearest_cluster"
                " where f.doubtful = 1 group by f.id order by min(p.path), f.idx"
            )
        ]

    def photos_without_faces(self) -> list[str]:
        return [
            py_text(r[0])
            for r in self.db.execute(
                "select p.path from photos p join images i on i.sha256 = p.sha256"
                " where p.status = 'ok' and i.face_count = 0 order by p.path"
            )
        ]

    # ---- review page (read-only queries) -------------------------------------------------
    # People are the clusters with at least one confident face and not hidden (the ones with a
    # folder); doubtful faces of hidden people are in no folder either (output.desired_tree).
    # (one pass over the faces table, not by the cluster_id index: that reads the same rows in
    # random order, 0.8 s instead of 0.5 s at 100k faces)
    _PEOPLE = ("select c.id, c.name, c.representative_face, p.photos, p.faces from clusters c join"
               " (select cluster_id, count(distinct sha256) as photos, count(*) as faces from faces not indexed"
               " where doubtful = 0 group by cluster_id) p on p.cluster_id = c.id where c.hidden = 0")
    _DOUBTFUL = ("doubtful = 1 and (cluster_id is null or cluster_id not in"
                 " (select id from clusters where hidden = 1))")

    def page_people(self, limit: int = -1, offset: int = 0) -> list[dict]:
        """People with a folder, the most photos first: id, name, representative_face, photos
        (distinct photos with a confident face of theirs), faces."""
        return list(self.db.query(f"{self._PEOPLE} order by p.photos desc, c.id limit ? offset ?", [limit, offset]))

    def page_person(self, cluster_id: int) -> dict | None:
        """One cluster as :meth:`page_people` shows it (photos and faces 0 when it has no folder)."""
        row = self.db.execute(
            "select c.id, c.name, c.representative_face,"
            " (select count(distinct sha256) from faces where cluster_id = c.id and doubtful = 0),"
            " (select count(*) from faces where cluster_id = c.id and doubtful = 0), c.hidden"
            " from clusters c where c.id = ?", [cluster_id]).fetchone()
        if row is None:
            return None
        return dict(zip(("id", "name", "representative_face", "photos", "faces", "hidden"), row))

    def person_names(self) -> list[tuple[int, str | None]]:
        """(id, name) of every cluster, by id (names to complete in the page's forms)."""
        return [(r[0], r[1]) for r in self.db.execute("select id, name from clusters order by id")]

    def person_encodings(self, cluster_id: int):
        """(face ids, encodings n x 128) of the person's confident faces, by id."""
        faces = self.store.face_vectors("cluster_id = ? and doubtful = 0 order by id", [cluster_id])
        return faces.ids, faces.encodings

    def doubtful_count(self) -> int:
        """Doubtful faces in the tree's doubtful/ (not those of hidden people)."""
        return self.db.execute(f"select count(*) from faces where {self._DOUBTFUL}").fetchone()[0]

    def doubtful_page(self, limit: int, offset: int = 0) -> list[Face]:
        """Those doubtful faces grouped by their nearest person (none last), by id within a group."""
        return self.store.faces_where(
            f"{self._DOUBTFUL} order by nearest_cluster is null, nearest_cluster, id limit ? offset ?", [limit, offset])

    def paths_for_shas(self, shas: Iterable[str]) -> dict[str, str]:
        """sha256 -> the first path (in path order) of an ok photo with that content."""
        out: dict[str, str] = {}
        shas = list(dict.fromkeys(shas))
        for chunk in chunks(shas):
            rows = self.db.execute(
                f"select sha256, min(path) from photos where sha256 in ({','.join('?' * len(chunk))})"
                " and +status = 'ok' group by sha256", chunk)
            out.update({sha: py_text(path) for sha, path in rows})
        return out
