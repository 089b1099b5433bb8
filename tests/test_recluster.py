"""Through the CLI: the engine's folders equal a batch recluster's, and adding a photo touches
only the folders it belongs to."""

from __future__ import annotations

import shutil
from pathlib import Path

from .conftest import DEV, run_organizer

PEOPLE = ["Madonna", "Hugo_Chavez", "George_W_Bush", "Mindy_Kaling", "Donald_Rumsfeld"]


def snapshot(output: Path) -> dict[str, frozenset[str]]:
    """folder -> names of the photos it links (representative crops and doubtful context aside)."""
    out = {}
    for d in sorted(output.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            out[d.name] = frozenset(p.name for p in d.iterdir() if p.is_file() and p.name != "representative.jpg")
    return out


def test_recluster_equals_engine_and_one_photo_changes_one_folder(tmp_path):
    watch, output = tmp_path / "photos", tmp_path / "people"
    held_out = {}
    for person in PEOPLE:
        photos = sorted((DEV / person).iterdir())
        (watch / person).mkdir(parents=True)
        for p in photos[:-1]:
            shutil.copy(p, watch / person / p.name)
        held_out[person] = photos[-1]
    run_organizer("scan", "--watch", str(watch), "--output", str(output))
    engine_tree = snapshot(output)
    assert len([f for f in engine_tree if f.startswith("cluster_")]) >= 4

    proc = run_organizer("recluster", "--watch", str(watch), "--output", str(output))
    assert "batch DBSCAN (scikit-learn) over" in proc.stderr  # the reference ran, not the engine
    assert snapshot(output) == engine_tree

    # add one more photo of a person who already has a folder
    src = held_out["Hugo_Chavez"]
    dst = watch / "Hugo_Chavez" / ("new_" + src.name)
    shutil.copy(src, dst)
    run_organizer("scan", "--watch", str(watch), "--output", str(output))
    after = snapshot(output)
    changed = {f for f in set(engine_tree) | set(after) if engine_tree.get(f) != after.get(f)}
    holders = {f for f, names in after.items() if dst.name in names}
    assert any(f.startswith("cluster_") for f in holders), holders
    assert changed == holders, (changed, holders)
    for f in holders:
        assert after[f] - engine_tree.get(f, frozenset()) == {dst.name}


def test_recluster_without_a_store_creates_nothing(tmp_path):
    """A mistyped --output must not leave a new, empty store (and folder) behind."""
    proc = run_organizer("recluster", "--output", str(tmp_path / "typo"), check=False)
    assert proc.returncode == 1 and "no store at" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "typo").exists()
