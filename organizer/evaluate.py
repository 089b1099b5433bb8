"""Scoring a clustering against labelled photos (used by the tests and the benchmarks).

Labels come from the folder layout of a labelled set: ``<set>/<person>/<photo>``. Predictions
come from the output tree: which person folders link each photo.
"""

from __future__ import annotations

import os
from collections import defaultdict
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
            if entry.name == "representative.jpg":
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
