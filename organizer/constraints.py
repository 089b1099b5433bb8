"""Constraints: the user's corrections applied to the people layer's result.

DBSCAN and the people layer (:class:`organizer.cluster.People`) stay as they are: exact,
incremental, and unaware of corrections. This is a step after them, local to the people a
correction touches, that turns their decision for each face (the *raw* one) into the final one:

* an *anchored* face (assigned by the user, or in a person's folder when it was named) is that
  person's confident face, whatever the algorithm says;
* a group of the people layer holding anchors of another person than its own (two people the
  algorithm merged, that the user told apart) is split: each face that is not anchored goes to
  the person of the nearest anchored face, or stays with the group's own person when one of that
  person's faces (anchored, or left as the algorithm put it) is nearer. So new photos near the
  user's assignments join them, and two differently named people are never merged again. Faces
  that were already there when the user made the correction (ids up to its *horizon*) stay where
  the user left them: a correction moves only the faces it names, and the photos that come later;
* a face rejected from a person is never placed in it (doubtful, "removed by you from <name>");
* a merge maps one person onto another; a hidden person keeps its faces but gets no folder
  (``output.desired_tree`` skips it), so its future faces go nowhere.

The raw decisions of the faces this step overrode are kept in the store (``auto_assign``), so
the people layer resumes from its own state after a restart; the final ones are in ``faces``.
Everything here is a function of the raw groups and the corrections, so `organizer recluster`
gives the same folders as the incremental service from the same photos and corrections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .cluster import ClusterResult, FaceAssignment, REFINE_SAMPLE, refinement_sample, representative
from .store import Store
from .store_corrections import CorrectionLog

log = logging.getLogger(__name__)

REASON_REMOVED = "removed by you from {}"


@dataclass
class Rules:
    """The active corrections, compiled: what each face and person is bound to."""

    anchor: dict[int, int] = field(default_factory=dict)  # face -> person it is anchored to
    horizon: dict[int, int] = field(default_factory=dict)  # anchored face -> its correction's horizon
    rejected: dict[int, set[int]] = field(default_factory=dict)  # face -> persons it may not be in
    merged: dict[int, int] = field(default_factory=dict)  # person -> person it was merged into
    pinned: set[int] = field(default_factory=set)  # persons a correction refers to: never deleted
    names: dict[int, str] = field(default_factory=dict)
    seeds: set[int] = field(default_factory=set)  # anchored faces whose anchor is the known-people vote

    @classmethod
    def from_store(cls, store: Store) -> "Rules":
        """Replay the active corrections in the order they were made (a later one wins)."""
        r = cls()
        for c in CorrectionLog(store).rows(include_undone=False):
            for p in (c.person, c.other):
                if p is not None:
                    r.pinned.add(p)
            if c.kind in ("name", "assign", "split"):
                for f in c.faces:
                    r.anchor[f] = c.person
                    r.horizon[f] = c.horizon
                    r.rejected.get(f, set()).discard(c.person)
                    (r.seeds.add if c.source == "known" else r.seeds.discard)(f)
            elif c.kind == "reject":
                for f in c.faces:
                    r.rejected.setdefault(f, set()).add(c.person)
                    r.seeds.discard(f)
                    if r.anchor.get(f) == c.person:
                        del r.anchor[f]
            elif c.kind == "merge":
                r.merged[c.other] = c.person
        for p in store.people():
            if p["name"]:
                r.names[p["id"]] = p["name"]
            if p["hidden"]:
                r.pinned.add(p["id"])
        return r

    def resolve(self, person: int | None) -> int | None:
        """The person ``person`` stands for now (following merges; a merge cycle stops)."""
        seen = set()
        while person in self.merged and person not in seen:
            seen.add(person)
            person = self.merged[person]
        return person

    def faces(self) -> set[int]:
        """Every face a correction is about."""
        return set(self.anchor) | set(self.rejected)

    def label(self, person: int) -> str:
        return self.names.get(person) or f"cluster_{person}"

    def key(self) -> tuple:
        return (sorted(self.anchor.items()), sorted((f, sorted(p)) for f, p in self.rejected.items()),
                sorted(self.merged.items()), sorted(self.horizon.items()), sorted(self.seeds))


Vecs = Callable[[list[int]], np.ndarray]


def _nearest_rows(a: np.ndarray, b: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """For each row of ``a``, the smallest euclidean distance to a row of ``b`` (in chunks;
    ``exclude[i, j]`` True skips a pair, e.g. a face and itself)."""
    out = np.full(len(a), np.inf)
    if len(b) == 0:
        return out
    bb = (b * b).sum(1)
    for s in range(0, len(a), 512):
        x = a[s : s + 512]
        d2 = np.maximum((x * x).sum(1)[:, None] + bb[None, :] - 2 * x @ b.T, 0)
        if exclude is not None:
            d2[exclude[s : s + 512]] = np.inf
        out[s : s + 512] = np.sqrt(d2.min(1))
    return out


@dataclass
class _Group:
    """One raw group's context for its faces' decisions (see :meth:`Constraints._group`)."""

    own: int | None  # the person the group stands for (after merges)
    anchored: dict[int, int]  # its anchored faces -> their person
    free: np.ndarray  # its other faces, sorted
    seeded: int | None  # the known person the whole group is (Constraints._seeded_as)
    candidates: dict[int | None, list[int]] = field(default_factory=dict)  # person -> anchored faces
    own_pinned: bool = False
    horizon: dict[int | None, int] = field(default_factory=dict)
    stand: np.ndarray | None = None  # free faces standing for its own person; None: no choice to make

    def key(self) -> tuple:
        return (self.own, tuple(self.anchored.items()), self.seeded,
                None if self.stand is None else self.stand.tobytes())


class Constraints:
    """Turns the people layer's decisions into the final ones (see the module docstring).

    Keeps the final person of every face (``final``) and the members of every final person, so an
    update recomputes only the groups and people a change touched.
    """

    def __init__(self, store: Store | None, rules: Rules | None = None):
        self.store = store
        self.rules = Rules.from_store(store) if rules is None else rules
        self.final: dict[int, int | None] = {}
        self.members: dict[int, set[int]] = {}
        self.overridden: set[int] = set()  # faces whose final decision differs from the raw one
        self._contexts: dict[int, tuple] = {}  # raw group -> the key of the context it was decided in
        self._doubt: dict[int, bool] = {}  # overridden face -> whether its final decision is doubtful
        self._loaded = False

    def load(self, final: dict[int, int | None], overridden: Iterable[int]) -> None:
        """Resume from the store (the final person of every face, the faces overridden)."""
        self.final, self.members = {}, {}
        for f, p in final.items():
            self._set(f, p)
        self.overridden = set(overridden)
        self._loaded = True

    def _set(self, f: int, p: int | None) -> None:
        old = self.final.get(f)
        if old is not None and old in self.members:
            self.members[old].discard(f)
            if not self.members[old]:
                del self.members[old]
        if p is None:
            self.final.pop(f, None)
        else:
            self.final[f] = p
            self.members.setdefault(p, set()).add(f)

    # ---- the rules, for one group of the people layer ------------------------------------
    def _group(self, c: int | None, faces: list[int]) -> "_Group":
        """What the decisions in raw group ``c`` (its sorted ``faces``) depend on besides each face."""
        r = self.rules
        own = r.resolve(c) if c is not None else None
        anchored = {f: r.resolve(r.anchor[f]) for f in sorted(r.anchor.keys() & set(faces))}
        free = np.asarray([f for f in faces if f not in anchored], dtype=np.int64)
        g = _Group(own, anchored, free, self._seeded_as(c, own, anchored, len(faces)))
        others = {p for p in anchored.values() if p != own}
        if g.seeded is None and c is not None and others and len(free):
            # a merged group the user told apart: each free face goes to its nearest person
            for f, p in anchored.items():
                g.candidates.setdefault(p, []).append(f)
            g.own_pinned = own in r.pinned or own in g.candidates
            if g.own_pinned:  # the group's own person keeps its faces as the algorithm placed them
                g.candidates.setdefault(own, [])
                # faces that were there when the user corrected another person here stay where the
                # user left them; only faces that arrived later may follow the corrected ones
                g.horizon = {p: min(r.horizon.get(f, 0) for f in reps) for p, reps in g.candidates.items() if p != own}
            # the other free faces stand for the group's own person too: a sample of them in a big
            # group (the refinement's: a function of the member set, so an update and a recluster
            # agree), so a group costs O(size), not O(size^2)
            g.stand = free[refinement_sample(free, REFINE_SAMPLE)]
        return g

    def _decide_group(self, c: int | None, faces: list[int], raw: dict[int, FaceAssignment],
                      vecs: Vecs, g: "_Group | None" = None,
                      only: list[int] | None = None) -> dict[int, FaceAssignment]:
        """Final decisions for the faces of one raw group ``c`` (None: faces no group holds), or
        only for the faces ``only`` of it (the others' decisions stand: their context ``g`` did not
        change)."""
        r = self.rules
        g = g or self._group(c, faces)
        own, anchored = g.own, g.anchored
        todo = faces if only is None else only
        person: dict[int, int | None] = {f: own if g.seeded is None else g.seeded for f in todo if f not in anchored}
        if g.stand is not None:
            movers = g.free if only is None else np.asarray([f for f in only if f not in anchored], dtype=np.int64)
            if g.own_pinned:
                movers = movers[movers > min(g.horizon.values())]
            if len(movers):
                mv = vecs(movers.tolist())
                best = np.full(len(movers), np.inf)
                choice = np.full(len(movers), -1, dtype=np.int64)
                for p in sorted(g.candidates, key=lambda x: (x is None, x)):
                    reps = g.candidates[p]
                    d = _nearest_rows(mv, vecs(reps)) if reps else np.full(len(movers), np.inf)
                    if g.own_pinned and p != own:
                        d[movers <= g.horizon[p]] = np.inf
                    if p == own:
                        d = np.minimum(d, _nearest_rows(mv, vecs(g.stand.tolist()),
                                                        exclude=movers[:, None] == g.stand[None, :]))
                    better = d < best
                    best[better], choice[better] = d[better], p
                for i, f in enumerate(movers.tolist()):
                    person[f] = int(choice[i]) if choice[i] >= 0 else own
        out = {}
        for f in todo:
            a = raw[f]
            if f in anchored:
                out[f] = FaceAssignment(anchored[f], False, None, anchored[f])
                continue
            p = person[f]
            near = r.resolve(a.nearest_cluster)
            if p is not None and f in r.rejected and p in {r.resolve(x) for x in r.rejected[f]}:
                out[f] = FaceAssignment(None, True, REASON_REMOVED.format(r.label(p)), p)
            elif p is None:
                out[f] = FaceAssignment(None, a.doubtful, a.reason, near)
            elif p == own:
                out[f] = FaceAssignment(p, a.doubtful, a.reason, p if not a.doubtful else near)
            else:
                out[f] = FaceAssignment(p, a.doubtful, a.reason, p)
        return out

    def _seeded_as(self, c: int | None, own: int | None, anchored: dict[int, int], size: int) -> int | None:
        """The known person a raw group is, if it is one: more than half of its faces were named
        so by the known-people vote (and nothing else), and its own person is nobody the user
        named or corrected. Then its other faces follow (the vote is strict: a few faces of a
        known person miss it, and the clustering found them with the others); else None."""
        r = self.rules
        if c is None or own in r.pinned or own in r.names or 2 * len(anchored) <= size:
            return None
        people = set(anchored.values())
        if len(people) != 1 or not set(anchored) <= r.seeds:
            return None
        return people.pop()

    def _constrained_groups(self, cid: dict[int, int | None]) -> set[int | None]:
        """Raw groups a correction is about (None: faces no group holds)."""
        return {cid.get(f) for f in self.rules.faces() if f in cid} | set(self.rules.merged)

    # ---- applying ------------------------------------------------------------------------
    def apply(self, result: ClusterResult, people, vecs: Vecs, quality: Callable[[int], float],
              full: bool, groups: Iterable[int | None] = (),
              removed: Iterable[int] = ()) -> tuple[ClusterResult, dict[int, tuple | None]]:
        """The final result for a result of the people layer (``people``: its state after it),
        and the raw decisions to keep for the overridden faces (None: no longer overridden).

        ``groups``: raw groups to recompute besides those the result touched (a correction
        changed); ``removed``: faces deleted since the last update. A full result recomputes
        everything. An update costs the size of the groups it touches, not of all faces."""
        raw_of = people.assign
        cid = people.cid
        fresh = full or not self._loaded
        forced = set(groups)
        if fresh:
            self._contexts, self._doubt = {}, {}
            self.final, self.members, old_over = {}, {}, set(self.overridden)
            self.overridden = set()
            touched_groups = set(people.members) | {None}
            changed_faces = set(raw_of)
            self._loaded = True
        else:
            old_over = set()
            changed_faces = set(result.assignments)
            touched_groups = {cid.get(f) for f in changed_faces} | set(result.clusters) | set(groups)
        constrained = self._constrained_groups(cid)
        out = ClusterResult(next_id=result.next_id)
        auto: dict[int, tuple | None] = {f: None for f in old_over}
        persons_touched: set[int] = set()
        for g in sorted(touched_groups, key=lambda x: (x is None, x)):
            if g is None:
                faces = [f for f in changed_faces if cid.get(f) is None and f in raw_of]
                faces += [f for f in self.rules.faces() if cid.get(f, 0) is None and f in raw_of]
                faces = sorted(set(faces) | {f for f in self.overridden if cid.get(f, 0) is None and f in raw_of})
            elif g in constrained or not self.overridden.isdisjoint(people.members.get(g, ())):
                faces = sorted(people.members.get(g, ()))
                ctx = self._group(g, faces)
                # the faces whose decision may have changed: all of them when the group's context
                # did (its person, anchors, sample) or a correction was made; else the changed ones
                same = not fresh and g not in forced and self._contexts.get(g) == ctx.key()
                self._contexts[g] = ctx.key()
                only = sorted(f for f in changed_faces if cid.get(f) == g) if same else None
                decided = self._decide_group(g, faces, raw_of, vecs, ctx, only)
            else:  # untouched by corrections: the raw decisions stand
                faces = sorted(f for f in people.members.get(g, ()) if f in changed_faces)
                for f in faces:
                    out.assignments[f] = raw_of[f]
                    persons_touched |= {self.final.get(f), g}
                    self._set(f, g)
                continue
            if g is None:
                decided = self._decide_group(g, faces, raw_of, vecs)
            for f, a in decided.items():
                rw = raw_of[f]
                if a != rw:
                    self.overridden.add(f)
                    self._doubt[f] = a.doubtful
                    auto[f] = (rw.cluster_id, rw.doubtful, rw.reason, rw.nearest_cluster)
                elif f in self.overridden or f in old_over:
                    self.overridden.discard(f)
                    self._doubt.pop(f, None)
                    auto[f] = None
                if full or f in changed_faces or a != rw or f in auto:
                    out.assignments[f] = a
                persons_touched |= {self.final.get(f), a.cluster_id, rw.cluster_id}
                self._set(f, a.cluster_id)
        # faces gone from the people layer
        for f in [f for f in (self.final if full else removed) if f in self.final and f not in raw_of]:
            persons_touched.add(self.final[f])
            self._set(f, None)
            if f in self.overridden:
                self.overridden.discard(f)
                self._doubt.pop(f, None)
                auto[f] = None
        persons_touched |= set(result.clusters) | set(result.removed)
        persons_touched.discard(None)
        for p in sorted(persons_touched):
            members = self.members.get(p)
            if not members:
                if p in self.rules.pinned or p in self.rules.names:
                    out.clusters[p] = (0, None)
                else:
                    out.removed.add(p)
                continue
            raw_row = result.clusters.get(p)
            if raw_row is not None and members == people.members.get(p) and not (members & self.overridden):
                out.clusters[p] = raw_row
                continue
            ids = np.sort(np.fromiter(members, np.int64, len(members)))
            sample = ids[refinement_sample(ids, REFINE_SAMPLE)].tolist()
            confident = [f for f in sample if not self._final_doubtful(f, out, raw_of)] or sample
            out.clusters[p] = (len(members), representative(confident, vecs, quality))
        if full:
            for p in self.rules.pinned | set(self.rules.names):
                out.clusters.setdefault(p, (0, None))
        return out, auto

    def _final_doubtful(self, f: int, out: ClusterResult, raw_of: dict[int, FaceAssignment]) -> bool:
        a = out.assignments.get(f)
        return a.doubtful if a is not None else self._doubt.get(f, raw_of[f].doubtful)

    def reload_rules(self, cid: dict[int, int | None]) -> set[int | None] | None:
        """Re-read the corrections; the raw groups whose decisions may change (None: no change)."""
        after = Rules.from_store(self.store)
        before, self.rules = self.rules, after
        if after.key() == before.key() and after.pinned == before.pinned and after.names == before.names:
            return None
        return self._groups_of(before, cid) | self.affected_groups(cid)

    def affected_groups(self, cid: dict[int, int | None]) -> set[int | None]:
        """Every raw group the current corrections or an earlier override are about."""
        return self._groups_of(self.rules, cid) | {cid.get(f) for f in self.overridden if f in cid}

    @staticmethod
    def _groups_of(rules: Rules, cid: dict[int, int | None]) -> set[int | None]:
        return {None} | {cid.get(f) for f in rules.faces() if f in cid} | set(rules.merged) | set(rules.pinned)
