"""Clustering: keeps the store's people up to date with its faces.

:class:`Clustering` owns the exact incremental DBSCAN engine (incremental_dbscan.py) and the
people layer over it (cluster.People), their saved states beside the store, and the clustering
the store holds (ids, doubt, clusters). Both the incremental path (the service) and the batch
path (`organizer recluster`) end in one derivation, :meth:`Clustering._derive`, so they agree.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from .cluster import REASON_UNUSABLE, ClusterResult, FaceChanges, Neighbours, People, average_linkage_split
from .config import Settings
from .constraints import Constraints
from .incremental_dbscan import IncrementalDBSCAN, load_arrays, load_state, save_arrays, save_state
from .methods import cluster_labels, refined
from .store import FaceClustering, FaceVectors, Store
from .store_corrections import CorrectionLog

log = logging.getLogger(__name__)


def _quality(sharpness: float, size: float) -> float:
    """How good a face is as a folder's representative: sharp and large."""
    return float(np.log1p(sharpness) + np.log1p(size))


class Clustering:
    """The store's people, kept up to date: :meth:`update` after faces were added or removed,
    :meth:`recluster` to redo everything in one batch, :meth:`save` at shutdown."""

    def __init__(self, store: Store, settings: Settings, encoder: str):
        self.store = store
        self.correction_log = CorrectionLog(store)  # the people layer's decisions the user overrode
        self.cfg = settings.clustering
        self.min_size = settings.detection.min_face_size
        self.min_sharpness = settings.detection.min_sharpness
        self.encoder = encoder  # encode.encoder_id of the faces' encoder: part of the fingerprint
        self._engine: IncrementalDBSCAN | None = None  # built from the store on first use
        self._people: People | None = None
        self._meta: dict[int, tuple[str, float]] = {}  # usable face -> (photo sha256, quality)
        self._seen_face_id = 0  # faces above this id are new to the engine
        self._constraints: Constraints | None = None  # the user's corrections: the last step

    # ---- state files ---------------------------------------------------------------------------
    @property
    def engine_state_path(self) -> Path:
        return Path(str(self.store.path) + ".engine.npz")

    @property
    def people_state_path(self) -> Path:
        return Path(str(self.store.path) + ".people.npz")

    def fingerprint(self) -> str:
        """Settings that shape the clustering: a saved clustering made with others is redone."""
        return "clean:" + json.dumps([self.cfg.shape(), self.min_size, self.min_sharpness, self.encoder],
                                     sort_keys=True)

    def save(self) -> None:
        """Persist the engine and the people layer's nearest faces, so the next start need not
        recompute them (called at shutdown; both are verified against the store when loaded)."""
        if self._engine is not None:
            try:
                save_state(self._engine, self.engine_state_path)
                near = self._people.near_state()
                save_arrays(self.people_state_path, lambda fh: np.savez(fh, **near))
            except OSError as exc:
                log.warning("could not save the clustering state: %s", exc)

    def discard_state(self) -> None:
        """Forget the engine and its saved states (they hold encodings that were replaced): the
        next update rebuilds them from the store."""
        self._engine = None
        self._people = None
        for state in (self.engine_state_path, self.people_state_path):
            state.unlink(missing_ok=True)

    # ---- the two paths -------------------------------------------------------------------------
    def recluster(self, algorithm: str = "dbscan") -> None:
        """Batch: scikit-learn DBSCAN over every usable face, people derived from scratch.

        The reference for the incremental engine and a repair tool; ids stay stable.
        ``algorithm``: another batch method to compare with (:mod:`organizer.methods`); its result
        is stored as stale, so the next update (the service's start) derives DBSCAN's people again.
        """
        faces = self.store.usable_encodings(self.min_size, self.min_sharpness)
        t0 = time.monotonic()
        labels = cluster_labels(algorithm, faces.encodings, self.cfg)
        log.info("batch %s over %d faces: %d clusters in %.1f s",
                 "DBSCAN (scikit-learn)" if algorithm == "dbscan" else algorithm, len(faces),
                 len(set(labels.tolist()) - {-1}), time.monotonic() - t0)
        clusters = {int(lab): faces.ids[labels == lab].tolist() for lab in np.unique(labels) if lab >= 0}
        self._meta = self._meta_of(faces)
        self._constraints = Constraints(self.store)
        self._derive(self._new_people(refined(algorithm)), Neighbours(faces.ids, faces.encodings), clusters,
                     previous=self._raw_previous(),
                     fingerprint=None if algorithm == "dbscan" else f"method:{algorithm}")
        self._engine = None  # the incremental state is rebuilt from the store on next use
        self._people = None

    def update(self) -> None:
        """Incremental: feed new and removed faces to the DBSCAN engine, re-derive what changed."""
        if self._engine is None:
            self._start()
            return
        engine = self._engine
        # what changed since the last update, without an O(faces) query: new faces have higher
        # ids (ids only grow), deleted ones are logged by a trigger in the store
        top = self.store.max_face_id()
        added = sorted(self.store.usable_ids(self.min_size, self.min_sharpness, after=self._seen_face_id))
        self._seen_face_id = max(self._seen_face_id, top)
        deleted = sorted(f for f in self.store.take_removed_faces() if f in self._meta)
        if not added and not deleted and not self.store.unassigned_faces():
            return
        touched_faces: set[int] = set()
        touched_labels: set[int] = set()
        if deleted:
            upd = engine.delete(deleted)
            touched_faces |= upd.changed_keys
            touched_labels |= upd.touched_labels
            for f in deleted:
                self._meta.pop(f, None)
        if added:
            faces = self.store.faces_by_id(added)
            self._meta.update(self._meta_of(faces))
            upd = engine.insert(faces.ids.tolist(), faces.encodings)
            touched_faces |= upd.changed_keys
            touched_labels |= upd.touched_labels
        self._derive(self._people, engine,
                     {lab: m for lab in sorted(touched_labels) if (m := engine.members(lab))},
                     changes=FaceChanges({f for f in touched_faces if f in engine}, deleted))

    def _start(self) -> None:
        """Build the engine from the store (start-up); re-derive people only if the saved
        clustering is stale (a crash between two commits, or changed settings)."""
        self.store.take_removed_faces()  # the engine is reconciled with every face below
        self._seen_face_id = self.store.max_face_id()
        faces = self.store.usable_encodings(self.min_size, self.min_sharpness)
        self._engine = self._load_engine(faces)
        self._meta = self._meta_of(faces)
        self._people = self._new_people()
        if self.store.clustering_clean(self.fingerprint()):
            t0 = time.monotonic()
            # the people layer resumes from its own decisions, not the corrected ones
            reused = self._people.load(self.correction_log.raw_assignments(), self._meta, self._engine,
                                       near=load_arrays(self.people_state_path))
            log.info("people loaded from the store in %.1f s (nearest faces %s)", time.monotonic() - t0,
                     "from the saved state" if reused else "recomputed")
            self._constraints = Constraints(self.store)
            self._constraints.load(self.store.cluster_assignments(), self.correction_log.auto_assignments())
            # corrections made while nothing held the engine (the CLI, the folders at start-up)
            self._apply_groups(self._constraints.affected_groups(self._people.cid))
            return
        self._constraints = Constraints(self.store)
        self._derive(self._people, self._engine, self._engine.clusters(), previous=self._raw_previous())

    def _raw_previous(self) -> dict[int, int | None]:
        """Each face's person as the people layer last decided it (ids are matched to these)."""
        return {f: a.cluster_id for f, a in self.correction_log.raw_assignments().items()}

    def apply_corrections(self) -> bool:
        """Re-read the user's corrections and redo the people they touch (after one was recorded,
        by this process or another). True if anything had to be redone."""
        if self._engine is None:
            self._start()  # applies the corrections as they are now
            return True
        groups = self._constraints.reload_rules(self._people.cid)
        if groups is None:
            return False
        self._apply_groups(groups)
        return True

    def _apply_groups(self, groups) -> None:
        self._store(ClusterResult(next_id=self.store.next_cluster_id()), self._people, self._engine, full=False,
                    groups=groups)

    def _load_engine(self, faces: FaceVectors) -> IncrementalDBSCAN:
        """The engine for the store's faces: the saved state brought up to date (faces added or
        removed since it was saved are inserted/deleted), or a full build when there is none."""
        c = self.cfg
        eng = load_state(self.engine_state_path, c.eps, c.min_samples)
        if eng is not None:
            row = {int(f): i for i, f in enumerate(faces.ids)}
            stale = []
            for key in list(eng.keys()):
                i = row.get(key)
                # a face id SQLite reused for another face counts as removed + added
                if i is None or not np.array_equal(eng.vector(key), faces.encodings[i]):
                    stale.append(key)
            eng.delete(stale)
            new = [i for i, f in enumerate(faces.ids.tolist()) if f not in eng]
            if new:
                eng.insert(faces.ids[new].tolist(), faces.encodings[new])
            log.info("clustering state loaded (%d faces; %d removed, %d added since it was saved)",
                     len(eng), len(stale), len(new))
            return eng
        t0 = time.monotonic()
        eng = IncrementalDBSCAN.build(c.eps, c.min_samples, faces.ids.tolist(), faces.encodings)
        log.info("clustering state built from the store in %.1f s (%d faces)", time.monotonic() - t0, len(faces))
        return eng

    # ---- deriving and storing people -----------------------------------------------------------
    def _new_people(self, refine: bool = True) -> People:
        return People(self.cfg, average_linkage_split if refine and self.cfg.linkage_threshold > 0 else None)

    @staticmethod
    def _meta_of(faces: FaceVectors) -> dict[int, tuple[str, float]]:
        return {int(f): (faces.photos[i], _quality(faces.sharpness[i], faces.size[i]))
                for i, f in enumerate(faces.ids.tolist())}

    def _derive(self, people: People, index: IncrementalDBSCAN | Neighbours, clusters: dict[int, list[int]],
                previous: dict[int, int | None] | None = None, changes: FaceChanges | None = None,
                fingerprint: str | None = None) -> None:
        """Derive people for ``clusters`` (all of them without ``changes``) and store the result
        (``fingerprint``: of what made it, by default the current settings')."""
        meta = self._meta
        result = people.derive(clusters, index, photo=lambda f: meta[f][0], quality=lambda f: meta[f][1],
                               next_id=self.store.next_cluster_id(), previous=previous, changes=changes)
        self._store(result, people, index, full=changes is None, fingerprint=fingerprint,
                    removed=changes.removed if changes else ())

    def _store(self, result: ClusterResult, people: People, index, full: bool, groups=(),
               fingerprint: str | None = None, removed=()) -> None:
        """Store a clustering result, plus doubt for faces too small or blurred to cluster (their
        hint: the person of their nearest face within eps). The user's corrections are applied to
        the result first (:class:`~organizer.constraints.Constraints`; ``groups``: raw groups to
        redo besides those the result touched; ``removed``: faces deleted since the last update)."""
        meta = self._meta
        result, auto = self._constraints.apply(result, people, index.vectors, lambda f: meta[f][1], full, groups,
                                               removed)
        assignments = {
            f: FaceClustering(a.cluster_id, a.doubtful, a.reason, a.nearest_cluster)
            for f, a in result.assignments.items()
        }
        # incremental: only faces not yet given a reason (no O(faces) query per update)
        unusable = self.store.unusable_encodings(self.min_size, self.min_sharpness, pending=not full)
        cid = people.cid
        for f, enc in zip(unusable.ids.tolist(), unusable.encodings):
            near, dist = index.within(enc, self.cfg.eps)
            best = sorted((dd, cid[g]) for g, dd in zip(near.tolist(), dist.tolist()) if cid.get(g) is not None)
            assignments[f] = FaceClustering(None, True, REASON_UNUSABLE, best[0][1] if best else None)
        rules = self._constraints.rules
        for f in [f for f in rules.faces() if f not in cid]:  # too small to cluster, placed by the user
            p = rules.resolve(rules.anchor.get(f))
            assignments[f] = (FaceClustering(p, False, None, p) if p is not None
                              else FaceClustering(None, True, REASON_UNUSABLE, None))
        with self.store.db.atomic():
            self.store.save_clustering(
                assignments, result.clusters, result.removed, result.next_id, full=full,
                fingerprint=fingerprint or self.fingerprint()
            )
            self.correction_log.save_corrected(auto)
