"""Scoring a clustering against labelled photos (`organizer evaluate`, the tests, the benchmarks).

Labels come from the folder layout of a labelled set: ``<set>/<person>/<photo>``. Predictions
come from the output tree (which person folders link each photo) or, the same thing read from the
store, from which people each photo's confident faces belong to.

:class:`Evaluation` runs the pipeline on a labelled set into a store of its own, then scores any
number of clusterings re-derived from the stored encodings (a sweep encodes once).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path


def tree_assignment(output: Path) -> dict[str, set[str]]:
    """Original photo path (resolved via inode/symlink) -> set of person folders linking it."""
    by_inode: dict[tuple[int, int], set[str]] = defaultdict(set)
    out: dict[str, set[str]] = defaultdict(set)
    for folder in sorted(Path(output).iterdir()):
        if not folder.is_dir() or folder.name.startswith(".") or folder.name == "doubtful":
            continue
        for entry in folder.iterdir():
            if entry.name in ("representative.jpg", "montage.jpg"):
                continue
            if entry.is_symlink():
                out[os.readlink(entry)].add(folder.name)
            else:
                st = entry.stat()
                by_inode[(st.st_dev, st.st_ino)].add(folder.name)
    return out if not by_inode else {**out, **{f"inode:{k[0]}:{k[1]}": v for k, v in by_inode.items()}}


def photo_key(path: Path) -> str:
    if Path(path).is_symlink():
        return str(path)
    st = os.stat(path)
    return f"inode:{st.st_dev}:{st.st_ino}"


def pairwise_scores(truth: dict[str, str], predicted: dict[str, set[str]]) -> dict[str, float]:
    """Pairwise precision/recall/F1 over photos, plus coverage (share of photos in some folder).

    ``truth``: photo key -> person; ``predicted``: photo key -> folders. A photo in several
    folders counts once per folder (a wrong extra folder costs precision).
    """
    members: dict[str, list[str]] = defaultdict(list)
    for photo, folders in predicted.items():
        if photo in truth:
            for f in folders:
                members[f].append(photo)
    tp = fp = 0
    for photos in members.values():
        for a, b in combinations(sorted(set(photos)), 2):
            if truth[a] == truth[b]:
                tp += 1
            else:
                fp += 1
    same_person = defaultdict(int)
    for person in truth.values():
        same_person[person] += 1
    total_true = sum(n * (n - 1) // 2 for n in same_person.values())
    # recall: true pairs that share at least one folder
    found = 0
    for a, b in combinations(sorted(truth), 2):
        if truth[a] == truth[b] and predicted.get(a, set()) & predicted.get(b, set()):
            found += 1
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = found / total_true if total_true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    covered = sum(1 for p in truth if predicted.get(p))
    return {"precision": precision, "recall": recall, "f1": f1, "coverage": covered / len(truth) if truth else 0.0}


def bcubed_scores(truth: dict[str, str], predicted: dict[str, set[str]]) -> dict[str, float]:
    """BCubed precision/recall/F1 over photos; a photo in no folder is its own singleton."""
    label = {p: (min(predicted[p]) if predicted.get(p) else f"__single__{p}") for p in truth}
    by_label: dict[str, list[str]] = defaultdict(list)
    by_truth: dict[str, list[str]] = defaultdict(list)
    for p in truth:
        by_label[label[p]].append(p)
        by_truth[truth[p]].append(p)
    prec = rec = 0.0
    for p in truth:
        same_c = by_label[label[p]]
        same_t = by_truth[truth[p]]
        correct = sum(1 for q in same_c if truth[q] == truth[p])
        prec += correct / len(same_c)
        rec += correct / len(same_t)
    n = len(truth) or 1
    prec, rec = prec / n, rec / n
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1}


def labelled_photos(root: Path, copy_root: Path | None = None) -> dict[str, str]:
    """photo key -> person for a labelled set (``copy_root`` when the photos were copied there)."""
    base = Path(copy_root or root)
    return {photo_key(p): p.parent.name for p in sorted(base.glob("*/*")) if p.is_file()}


# ---- scores ----------------------------------------------------------------------------------


@dataclass
class Scores:
    precision: float
    recall: float
    f1: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f1: float
    coverage: float  # share of the labelled photos placed in some person folder
    once_placed: float | None  # share of the people seen in one photo only put in a folder (None: none seen once)
    clusters: int  # person folders holding at least one labelled photo


def score(truth: dict[str, str], predicted: dict[str, set[str]]) -> Scores:
    pw = pairwise_scores(truth, predicted)
    bc = bcubed_scores(truth, predicted)
    photos_of: dict[str, int] = defaultdict(int)
    for person in truth.values():
        photos_of[person] += 1
    once = [p for p in truth if photos_of[truth[p]] == 1]
    folders = {f for p in truth for f in predicted.get(p, ())}
    return Scores(pw["precision"], pw["recall"], pw["f1"], bc["precision"], bc["recall"], bc["f1"],
                  pw["coverage"], sum(1 for p in once if predicted.get(p)) / len(once) if once else None,
                  len(folders))


def labels_by_path(root: Path) -> dict[str, str]:
    """Absolute photo path -> person for every photo under ``root/<person>/`` (at any depth)."""
    from .ingest import is_candidate

    root = Path(os.path.abspath(root))
    return {str(p): p.relative_to(root).parts[0] for p in sorted(root.glob("*/**/*"))
            if p.is_file() and is_candidate(p)}


def store_assignment(store) -> dict[str, set[str]]:
    """Photo path -> person folders (cluster ids) its confident faces are in: what the tree links."""
    faces = {f.id: f for f in store.faces()}
    out: dict[str, set[str]] = defaultdict(set)
    for path, face_id, _sha in store.photos_of_faces():
        f = faces[face_id]
        if f.cluster_id is not None and not f.doubtful:
            out[path].add(str(f.cluster_id))
    return dict(out)


# ---- the evaluate command's runs ------------------------------------------------------------

CLUSTERING_PARAMS = ("eps", "min_samples", "doubt_margin", "linkage_threshold")


@dataclass
class Run:
    algorithm: str
    params: dict  # the clustering settings changed from the configured ones (a sweep point)
    scores: Scores
    seconds: float  # clustering and people derivation, encodings already stored

    def as_dict(self) -> dict:
        return {"algorithm": self.algorithm, "params": self.params, **asdict(self.scores),
                "seconds": round(self.seconds, 3)}


def parse_sweep(spec: str) -> tuple[str, list[float]]:
    """"eps=0.4:0.6:0.02" (start:stop:step, stop included) or "min_samples=2,3,4"."""
    name, eq, values = spec.partition("=")
    name = name.strip()
    if not eq or name not in CLUSTERING_PARAMS:
        raise ValueError(f"--sweep {spec!r}: expected NAME=START:STOP:STEP or NAME=V1,V2,... with NAME one of "
                         f"{', '.join(CLUSTERING_PARAMS)}")
    try:
        if ":" in values:
            start, stop, step = (float(v) for v in values.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(round((stop - start) / step)) + 1
            points = [round(start + i * step, 6) for i in range(n)]
        else:
            points = [float(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"--sweep {spec!r}: the values must be numbers (START:STOP:STEP with STEP > 0)") from None
    if name == "min_samples":
        points = sorted({int(round(v)) for v in points})
    return name, points


def sweep_grid(specs: list[str]) -> list[dict]:
    """Every combination of the swept values ([{}] when nothing is swept)."""
    grid: list[dict] = [{}]
    for spec in specs:
        name, points = parse_sweep(spec)
        grid = [{**g, name: v} for g in grid for v in points]
    return grid


@dataclass
class Encoded:
    photos: int  # labelled photos
    people: int
    faces: int  # faces found in them
    photos_with_faces: int
    seconds: float


class Evaluation:
    """One labelled set scanned into a store under ``workdir`` (its tree in ``workdir/out``)."""

    def __init__(self, labels: Path, settings, workdir: Path):
        from .config import Settings

        self.labels = Path(os.path.abspath(labels))
        if not self.labels.is_dir():
            raise FileNotFoundError(f"the labelled folder {self.labels} does not exist")
        self.truth = labels_by_path(self.labels)
        if not self.truth:
            raise ValueError(f"no photos in person folders under {self.labels} (expected <DIR>/<person>/<photo>)")
        self.workdir = Path(workdir)
        paths = {"watch": self.labels, "output": self.workdir / "out", "db": self.workdir / "organizer.db"}
        # the configured detection and clustering, never the configured folders; symlinks, so the
        # tree names the labelled photos by path
        self.settings: Settings = settings.model_copy(deep=True, update={
            "paths": settings.paths.model_copy(update=paths)})
        self.settings.service.link_mode = "symlink"

    def encode(self, progress=None) -> Encoded:
        from .encode import check_models
        from .pipeline import Organizer
        from .store import Store

        check_models()
        t0 = time.monotonic()
        with Store.open(self.settings.db_path) as store:
            org = Organizer(self.settings, store)
            try:
                org.scan(progress=progress)
            finally:
                org.close()
            faces_of = self._faces_per_photo(store)
        found = [p for p in self.truth if faces_of.get(p)]
        return Encoded(len(self.truth), len(set(self.truth.values())), sum(faces_of.get(p, 0) for p in self.truth),
                       len(found), time.monotonic() - t0)

    @staticmethod
    def _faces_per_photo(store) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for path, _face, _sha in store.photos_of_faces():
            out[path] += 1
        return out

    def run(self, algorithm: str = "dbscan", params: dict | None = None, tree: bool = False) -> Run:
        """Re-derive people with ``algorithm`` and ``params`` from the stored encodings and score
        them (``tree``: also bring the output tree in line, for a look or a check)."""
        from .pipeline import Organizer
        from .store import Store

        params = dict(params or {})
        settings = self.settings.model_copy(deep=True)
        for name, value in params.items():
            setattr(settings.clustering, name, value)  # validated (pydantic)
        with Store.open(settings.db_path) as store:
            org = Organizer(settings, store, workers=1)
            try:
                t0 = time.monotonic()
                org.recluster(algorithm)
                seconds = time.monotonic() - t0
                if tree:
                    org.reconcile()
            finally:
                org.close()
            predicted = store_assignment(store)
        return Run(algorithm, params, score(self.truth, predicted), seconds)


@dataclass
class PerturbedRun:
    kind: str
    level: float | None  # None: the clean photos
    encoded: Encoded
    run: Run

    def as_dict(self) -> dict:
        return {"kind": self.kind, "level": self.level, "faces": self.encoded.faces,
                "photos_with_faces": self.encoded.photos_with_faces, "f1": self.run.scores.f1,
                "bcubed_f1": self.run.scores.bcubed_f1, "coverage": self.run.scores.coverage}


def perturbed_runs(ev: Evaluation, kinds: list[str], workroot: Path) -> list[PerturbedRun]:
    """For each kind and level of :mod:`organizer.perturb`: degraded copies of ``ev``'s photos
    under ``workroot``, run through the pipeline with the same settings and scored (defaults)."""
    from .perturb import degraded_copy, perturbations

    rows = []
    for p in perturbations(kinds):
        base = Path(workroot) / f"{p.kind}-{p.level:g}"
        degraded_copy(ev.labels, base / "photos", p, ev.settings.detection.max_pixels)
        sub = Evaluation(base / "photos", ev.settings, base / "work")
        encoded = sub.encode()
        rows.append(PerturbedRun(p.kind, p.level, encoded, sub.run()))
    return rows
