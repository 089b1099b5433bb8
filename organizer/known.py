"""Known people: a folder of reference photos (``paths.known``, one sub-folder per person) seeds
named people from the first scan.

A face goes to a known person when its nearest reference faces agree (:func:`vote`: more than
half of its ``clustering.known_k`` nearest reference faces are within ``clustering.known_tolerance``
and of that person); the other faces are clustered as usual.

The vote is recorded as corrections (``assign``, source ``known``), the same rows a user's
corrections are, so the people layer (constraints.py) treats a known person like a person the
user named: its faces are its own, faces near them follow, two differently named people are
never merged, and `organizer recluster` reproduces it from the store. A face the user corrected
(from the folders, the CLI or the page) is never voted on: the user's word wins.

New faces are voted on as they arrive. When the reference photos change (added, removed, moved to
another person's sub-folder) or ``known_k`` / ``known_tolerance`` do, every face is voted on again
at the next scan and the known rows are replaced if the outcome differs (the old ones are marked
undone). Reference photos are encoded with the library's encoder, once per file content
(:class:`~organizer.store_known.ReferenceFaces`); they are outside the watched input (layout.py
refuses a known folder that is input) and so never appear in the output tree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ingest import IngestError, is_candidate, sha256_file
from .output import validate_person_name
from .store import Store
from .store_corrections import CorrectionLog
from .store_known import ReferenceFaces

log = logging.getLogger(__name__)

SOURCE = "known"
STATE = "known_people"  # meta key: {"fingerprint": ..., "upto": last face id voted on, "people": {name: id}}


@dataclass(frozen=True)
class References:
    """The reference faces: one encoding per reference photo with a face, and its person's name."""

    names: list[str]
    encodings: np.ndarray  # (len(names), 128)
    fingerprint: str  # of the photos' contents and names (and the vote's settings)


def vote(refs: np.ndarray, names: list[str], faces: np.ndarray, k: int, tolerance: float) -> list[str | None]:
    """The known person of each face (a row of ``faces``), or None: more than half of its ``k``
    nearest reference faces must be within ``tolerance`` and of that person (a reference face
    farther away is a vote against; with k = 3 a person needs two reference photos). Brute force:
    a few hundred reference faces against one batch (or, when they changed, the library in chunks)."""
    out: list[str | None] = [None] * len(faces)
    if len(refs) == 0 or len(faces) == 0:
        return out
    rr = (refs * refs).sum(1)
    for s in range(0, len(faces), 2048):
        x = faces[s : s + 2048]
        d = np.sqrt(np.maximum((x * x).sum(1)[:, None] + rr[None, :] - 2 * x @ refs.T, 0))
        nearest = np.argsort(d, axis=1)[:, :k]
        for i, row in enumerate(nearest):
            votes = Counter(names[j] for j in row if d[i, j] <= tolerance)
            if votes:
                name, n = votes.most_common(1)[0]
                if 2 * n > k:
                    out[s + i] = name
    return out


class KnownPeople:
    """Keeps the known-people corrections in line with the reference photos and the faces."""

    def __init__(self, store: Store, settings, encoder, encoder_id: str):
        known = settings.paths.known
        self.folder = Path(os.path.abspath(known)) if known is not None else None
        self.store = store
        self.cache = ReferenceFaces(store)
        self.history = CorrectionLog(store)
        self.encoder = encoder
        self.encoder_id = encoder_id
        self.k, self.tolerance = settings.clustering.known_k, settings.clustering.known_tolerance
        self.min_size, self.min_sharpness = settings.detection.min_face_size, settings.detection.min_sharpness
        self._refs: References | None = None
        self._sha: dict[tuple[str, int, float], str] = {}  # (path, size, mtime) -> sha256
        self._logged: set[str] = set()  # problems with reference photos, each logged once

    # ---- the reference photos ------------------------------------------------------------
    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, *args)

    def _photos(self) -> list[tuple[str, Path]]:
        """(person name, photo) for every reference photo: <known>/<name>/**/<photo>."""
        try:
            tops = sorted(self.folder.iterdir())
        except OSError as exc:
            self._warn_once("folder", "known people: cannot read %s (%s); no reference photos", self.folder,
                            exc.strerror or exc)
            return []
        out = []
        for top in tops:
            if top.name.startswith("."):
                continue
            if not top.is_dir():
                self._warn_once(str(top), "known people: %s is not in a person's sub-folder; left out", top)
                continue
            try:
                name = validate_person_name(top.name)
            except ValueError as exc:
                self._warn_once(str(top), "known people: the folder %s is left out: %s", top, exc)
                continue
            out += [(name, p) for p in sorted(top.rglob("*"))
                    if p.is_file() and is_candidate(p) and not any(s.startswith(".") for s in p.relative_to(top).parts)]
        return out

    def _hash(self, path: Path) -> str | None:
        try:
            st = os.stat(path)
            key = (str(path), st.st_size, st.st_mtime)
            if key not in self._sha:
                self._sha[key] = sha256_file(path)
            return self._sha[key]
        except (OSError, IngestError) as exc:
            self._warn_once(str(path), "known people: cannot read %s (%s)", path, exc)
            return None

    def references(self) -> References:
        """Read the reference folder; photos not seen before are encoded (and cached)."""
        photos = [(name, path, sha) for name, path in self._photos() if (sha := self._hash(path))]
        missing = {sha: path for _, path, sha in photos if self.cache.get(sha, self.encoder_id) is None}
        if missing:
            log.info("known people: encoding %d reference photo(s)", len(missing))
            by_path = {path: sha for sha, path in missing.items()}
            for result in self.encoder.map(list(by_path)):
                faces = [] if result.error else result.faces
                best = max(faces, key=lambda f: f.size, default=None)
                self.cache.put(by_path[result.path], self.encoder_id, len(faces),
                               None if best is None else best.encoding)
        names, encodings, seen = [], [], []
        for name, path, sha in photos:
            n, enc = self.cache.get(sha, self.encoder_id) or (0, None)
            if enc is None:
                self._warn_once(str(path), "known people: no face found in the reference photo %s", path)
                continue
            if n > 1:
                self._warn_once(str(path), "known people: %s holds %d faces; the largest is taken for %s", path, n, name)
            names.append(name)
            encodings.append(enc)
            seen.append((name, sha))
        key = json.dumps([sorted(seen), self.k, self.tolerance, self.encoder_id])
        return References(names, np.array(encodings).reshape(len(names), -1),
                          hashlib.sha256(key.encode()).hexdigest())

    # ---- the vote, as corrections ---------------------------------------------------------
    def update(self, rescan: bool = False) -> bool:
        """Vote on the faces that arrived since the last call (on every face when the reference
        photos or the vote's settings changed) and record the outcome; ``rescan``: read the
        reference folder again (a scan). True if a correction was recorded or withdrawn."""
        if self.folder is None:
            return False
        if self._refs is None or rescan:
            self._refs = self.references()
        refs = self._refs
        state = json.loads(self.store.get_meta(STATE) or "{}")
        full = state.get("fingerprint") != refs.fingerprint
        top = self.store.max_face_id()
        if not full and state.get("upto", 0) >= top:
            return False
        if full:
            faces = self.store.usable_encodings(self.min_size, self.min_sharpness)
        else:
            faces = self.store.faces_by_id(sorted(self.store.usable_ids(self.min_size, self.min_sharpness,
                                                                        after=state.get("upto", 0))))
        names = vote(refs.encodings, refs.names, faces.encodings, self.k, self.tolerance)
        corrections = self.history.rows(include_undone=False)
        mine = [c for c in corrections if c.source == SOURCE and c.kind == "assign"]
        users = {f for c in corrections if c.source != SOURCE for f in c.faces}
        wanted: dict[str, list[int]] = {}
        for f, name in zip(faces.ids.tolist(), names):
            if name is not None and f not in users:
                wanted.setdefault(name, []).append(f)
        people = dict(state.get("people", {}))
        changed = False
        with self.store.db.atomic():
            if full:
                now = {(c.person, f) for c in mine for f in c.faces}
                if now != {(self._person(people, n), f) for n, fs in wanted.items() for f in fs}:
                    for c in mine:
                        self.history.mark_undone(c.id)
                    changed = bool(mine)
                else:
                    wanted = {}
            for name, fs in sorted(wanted.items()):
                self.history.add("assign", SOURCE, person=self._person(people, name), faces=fs)
                changed = True
            self.store.set_meta(STATE, json.dumps({"fingerprint": refs.fingerprint, "upto": top, "people": people}))
        if wanted:
            log.info("known people: %s", ", ".join(f"{n} {len(fs)} face(s)" for n, fs in sorted(wanted.items())))
        return changed

    def _person(self, people: dict[str, int], name: str) -> int:
        """The person a reference sub-folder stands for: the one made for it before (even if the
        user renamed it since), else the person of that name, else a new one."""
        pid = people.get(name)
        if pid is None or self.store.person(pid) is None:
            pid = next((p["id"] for p in self.store.people() if p["name"] == name), None)
            if pid is None:
                pid = self.store.new_person(name)
            people[name] = pid
        return pid
