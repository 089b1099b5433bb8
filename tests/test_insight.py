"""Insight: `organizer evaluate`, `organizer report`, montages, the other clustering methods and
the degraded copies, on the dev set.

One `evaluate` run over the whole dev set (every method, an eps sweep, its tree kept) is shared by
the evaluate tests; the report and montage tests read the session's dev scan (``dev_library``).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from organizer import montage, perturb, report
from organizer.config import load_config
from organizer.evaluate import (bcubed_scores, labels_by_path, pairwise_scores, parse_sweep, store_assignment,
                                tree_assignment)
from organizer.methods import ALGORITHMS, cluster_labels, kmeans_curve
from organizer.pipeline import Organizer
from organizer.store import Store
from organizer.store_review import ReviewQueries

from .conftest import DEV, run_organizer

SWEEP = [0.30, 0.32, 0.34, 0.36, 0.38, 0.40]
BROWSER = Path("/usr/bin/chromium") if Path("/usr/bin/chromium").exists() else Path(shutil.which("chromium") or "/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """`organizer evaluate` on the dev set: every method, eps swept, store and tree kept."""
    keep = tmp_path_factory.mktemp("evaluate") / "kept"
    args = ["evaluate", "--labels", str(DEV), "--json", "--keep", str(keep), "--sweep", "eps=0.30:0.40:0.02"]
    for a in ALGORITHMS:
        args += ["--algorithm", a]
    proc = run_organizer(*args)
    return json.loads(proc.stdout), keep


def _runs(result, algorithm):
    return [r for r in result["runs"] if r["algorithm"] == algorithm]


# ---- evaluate ---------------------------------------------------------------------------------


def test_evaluate_scores_equal_those_of_its_tree(evaluated):
    """The first row (dbscan, first sweep point) is the tree it kept: the scores computed here from
    the folders' links are the ones it printed."""
    result, keep = evaluated
    first = result["runs"][0]
    assert first["algorithm"] == "dbscan" and first["params"] == {"eps": 0.3}
    truth = labels_by_path(DEV)
    assert result["photos"] == len(truth) == 104 and result["people"] == 12
    tree = tree_assignment(keep / "out")
    assert set(tree) <= set(truth), "the tree links only labelled photos"
    pw, bc = pairwise_scores(truth, tree), bcubed_scores(truth, tree)
    assert first["f1"] == pytest.approx(pw["f1"]) and first["precision"] == pytest.approx(pw["precision"])
    assert first["recall"] == pytest.approx(pw["recall"]) and first["coverage"] == pytest.approx(pw["coverage"])
    assert first["bcubed_f1"] == pytest.approx(bc["f1"])
    assert first["clusters"] == len({f for fs in tree.values() for f in fs})
    # and its store holds the same assignment
    with Store.open_readonly(keep / "organizer.db") as store:
        assert {p: {f"cluster_{c}" for c in cs} for p, cs in store_assignment(store).items()} == tree


def test_evaluate_defaults_sort_dev_well(evaluated):
    result, _ = evaluated
    (default,) = [r for r in _runs(result, "dbscan") if r["params"] == {"eps": 0.36}]  # the default eps
    assert default["precision"] >= 0.95, default  # a stranger in someone's folder is the worst error
    assert default["f1"] >= 0.75 and 10 <= default["clusters"] <= 14, default
    assert result["faces"] >= 100 and result["photos_with_faces"] >= 100


def test_sweep_recluster_from_stored_encodings(evaluated):
    """One row per eps; each re-derives people from the stored encodings in well under a second
    (nothing is encoded again); the smallest eps places fewer photos than the largest."""
    result, _ = evaluated
    rows = _runs(result, "dbscan")
    assert [r["params"]["eps"] for r in rows] == SWEEP
    assert all(r["seconds"] < 5 for r in rows[1:]), [r["seconds"] for r in rows]
    assert rows[0]["coverage"] < rows[-1]["coverage"]
    assert len({(r["f1"], r["coverage"]) for r in rows}) >= 3, "the sweep changes the outcome"


def test_every_method_is_scored(evaluated):
    result, _ = evaluated
    for algorithm in ALGORITHMS:
        rows = _runs(result, algorithm)
        assert len(rows) == len(SWEEP), algorithm
        for r in rows:
            for key in ("precision", "recall", "f1", "bcubed_precision", "bcubed_recall", "bcubed_f1", "coverage"):
                assert 0.0 <= r[key] <= 1.0, (algorithm, key, r)
        best = max(r["bcubed_f1"] for r in rows)
        assert best >= 0.6, (algorithm, best)  # 12 well-separated people: every method finds most
    # KMeans' k is chosen by silhouette: about the 12 people
    assert all(8 <= r["clusters"] <= 16 for r in _runs(result, "kmeans")), _runs(result, "kmeans")


def test_evaluate_text_output_and_bad_sweep(tmp_path):
    proc = run_organizer("evaluate", "--labels", str(DEV), "--sweep", "eps=0.5:0.4:0.1", check=False)
    assert proc.returncode == 2 and "STEP" in proc.stderr
    proc = run_organizer("evaluate", "--labels", str(DEV), "--sweep", "colour=1,2", check=False)
    assert proc.returncode == 2 and "eps" in proc.stderr
    assert parse_sweep("eps=0.4:0.6:0.02") == ("eps", [round(0.4 + 0.02 * i, 6) for i in range(11)])
    assert parse_sweep("min_samples=2,3") == ("min_samples", [2, 3])


# ---- methods on synthetic encodings -----------------------------------------------------------


def _blobs(n_people=4, per=8, seed=1):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_people, 128))
    centres *= 0.5 / np.linalg.norm(centres, axis=1)[:, None]  # people ~0.7 apart
    enc = np.vstack([c + rng.normal(0, 0.2 / np.sqrt(128), (per, 128)) for c in centres])  # faces ~0.28 apart
    return enc, np.repeat(np.arange(n_people), per)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_methods_separate_clear_people(algorithm):
    enc, truth = _blobs()
    labels = cluster_labels(algorithm, enc, load_config().clustering)
    for person in range(4):
        assert len(set(labels[truth == person].tolist())) == 1, (algorithm, labels)
    assert len(set(labels.tolist()) - {-1}) == 4, (algorithm, labels)


def test_kmeans_picks_k_by_silhouette():
    enc, _ = _blobs(n_people=5, per=6)
    curve = kmeans_curve(enc)
    assert curve.best_k == 5 and len(curve.ks) == len(curve.inertia) >= 5
    assert curve.inertia == sorted(curve.inertia, reverse=True)  # the elbow curve falls


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_methods_depend_on_the_set_of_faces_not_their_order(algorithm):
    enc, _ = _blobs(n_people=5, per=5, seed=4)
    order = np.random.default_rng(2).permutation(len(enc))
    cfg = load_config().clustering
    a, b = cluster_labels(algorithm, enc, cfg)[order], cluster_labels(algorithm, enc[order], cfg)
    same_a = a[:, None] == a[None, :]
    same_b = b[:, None] == b[None, :]
    assert (same_a == same_b).all() and ((a < 0) == (b < 0)).all(), algorithm


# ---- scan --algorithm ----------------------------------------------------------------------------


def _photo_groups(output: Path) -> set[frozenset]:
    groups: dict[str, set[str]] = {}
    for photo, folders in tree_assignment(output).items():
        for f in folders:
            groups.setdefault(f, set()).add(photo)
    return {frozenset(g) for g in groups.values()}


def _copy_store(dev_library, tmp: Path) -> Path:
    """The session scan's store, for a new output tree: its manifest (of the session's tree) is
    emptied, or the entries missing from the new tree would read as the user's deletions."""
    db = tmp / "organizer.db"
    shutil.copy(dev_library.db, db)
    with Store.open(db) as store:
        manifest, _ = store.manifest()
        for relpath in manifest:
            store.manifest_remove(relpath)
    return db


def test_scan_with_another_algorithm_then_back_to_dbscan(dev_library, tmp_path):
    """scan --algorithm hdbscan sorts by HDBSCAN's partition; the next plain scan (as the service
    at its start) is back to DBSCAN's folders, nothing encoded again."""
    db = _copy_store(dev_library, tmp_path)
    out = tmp_path / "out"
    common = ["--watch", str(dev_library.watch), "--output", str(out), "--db", str(db)]
    proc = run_organizer("scan", *common, "--algorithm", "hdbscan")
    assert "0 encoded" in proc.stdout
    settings = load_config(None, {"paths.watch": str(dev_library.watch), "paths.output": str(out), "paths.db": str(db)})
    d = settings.detection
    with Store.open_readonly(db) as store:
        usable = store.usable_encodings(d.min_face_size, d.min_sharpness)
        labels = cluster_labels("hdbscan", usable.encodings, settings.clustering)
        label_of = dict(zip(usable.ids.tolist(), labels.tolist()))
        faces = store.faces()
    for f in faces:
        if f.cluster_id is not None and not f.doubtful:
            assert label_of[f.id] >= 0, "a face HDBSCAN calls noise is in a folder"
    by_cluster: dict[int, set[int]] = {}
    for f in faces:
        if f.cluster_id is not None and not f.doubtful:
            by_cluster.setdefault(f.cluster_id, set()).add(label_of[f.id])
    assert by_cluster and all(len(v) == 1 for v in by_cluster.values()), "a folder mixes HDBSCAN clusters"
    assert _photo_groups(out) != _photo_groups(dev_library.output), "HDBSCAN's folders differ from DBSCAN's"
    run_organizer("scan", *common)
    assert _photo_groups(out) == _photo_groups(dev_library.output)


# ---- robustness ----------------------------------------------------------------------------------


def test_degradations_do_what_they_say():
    rng = np.random.default_rng(0)
    base = Image.fromarray((rng.random((120, 160, 3)) * 60 + 100).astype(np.uint8), "RGB")
    a = np.asarray(base, dtype=float)
    noisy, q = perturb.degrade(base, perturb.Perturbation("noise", 25))
    assert q == perturb.CLEAN_QUALITY and 20 < (np.asarray(noisy, dtype=float) - a).std() < 30
    dark, _ = perturb.degrade(base, perturb.Perturbation("dark", 0.3))
    assert np.asarray(dark, dtype=float).mean() == pytest.approx(a.mean() * 0.3, abs=1)
    blurred, _ = perturb.degrade(base, perturb.Perturbation("blur", 0.01))
    assert np.abs(np.diff(np.asarray(blurred, dtype=float), axis=1)).mean() < 0.5 * np.abs(np.diff(a, axis=1)).mean()
    same, q = perturb.degrade(base, perturb.Perturbation("jpeg", 5))
    assert same is base and q == 5
    with pytest.raises(ValueError, match="choose from"):
        perturb.perturbations(["fog"])


def test_evaluate_perturb_on_degraded_copies(tmp_path):
    """Two people of the dev set, darkened: every level is encoded afresh from copies (the
    originals untouched), and the darkest finds fewer faces than the clean photos."""
    labels = tmp_path / "labels"
    for person in ("Tony_Blair", "Hugo_Chavez"):
        shutil.copytree(DEV / person, labels / person)
    keep = tmp_path / "kept"
    proc = run_organizer("evaluate", "--labels", str(labels), "--perturb", "dark", "--json", "--keep", str(keep))
    rows = json.loads(proc.stdout)["perturbed"]
    assert [(r["kind"], r["level"]) for r in rows] == [("clean", None)] + [("dark", lv) for lv in perturb.LEVELS["dark"]]
    clean = rows[0]
    assert clean["faces"] >= 17 and clean["f1"] >= 0.8, clean
    for level in perturb.LEVELS["dark"]:
        copies = sorted((keep / "perturbed" / f"dark-{level:g}" / "photos").glob("*/*.jpg"))
        assert len(copies) == 18
        original = Image.open(labels / copies[0].parent.name / copies[0].name).convert("L")
        assert np.asarray(Image.open(copies[0]).convert("L"), dtype=float).mean() < \
            np.asarray(original, dtype=float).mean() * (level + 0.1)
    assert rows[-1]["faces"] < clean["faces"], rows


# ---- report --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_html(dev_library, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    proc = run_organizer("report", "--output", str(dev_library.output), "--out", str(out))
    return out, proc.stdout


def _images(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(m))) for m in re.findall(r"src='data:image/png;base64,([^']+)'", html)]


def test_report_holds_the_plots_and_counts(report_html, dev_library):
    out, stdout = report_html
    html = out.read_text()
    images = _images(html)
    assert len(images) == 5 and all(im.format == "PNG" and im.width > 300 and im.height > 200 for im in images)
    for title in ("People by size", "t-SNE map", "PCA map", "k-distance curve", "KMeans elbow curve"):
        assert title in html, title
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    with Store.open_readonly(dev_library.db) as store:
        st = ReviewQueries(store).status()
    counts = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]+)</td></tr>", html))
    assert int(counts["people (folders)"]) == st["clusters"] and int(counts["faces"]) == st["faces"]
    assert int(counts["doubtful faces"]) == st["doubtful_faces"]
    silhouette = float(counts["silhouette (-1..1, higher is better)"])
    assert 0.1 < silhouette <= 1  # 12 separated people
    assert f"{st['clusters']} people" in stdout


def test_report_renders_in_a_browser(report_html):
    """Headless Chromium (Debian's, installed by .ci/run) shows every plot."""
    if not BROWSER.exists():
        pytest.skip(f"no browser at {BROWSER}: `apt-get install -y chromium` (.ci/run does it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (dev dependency group) missing")
    out, _ = report_html
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(BROWSER), args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(out.as_uri())
            page.wait_for_load_state("load")
            widths = page.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
            heading = page.inner_text("h1")
        finally:
            browser.close()
    assert len(widths) == 5 and all(w > 300 for w in widths), widths
    assert heading.startswith("organizer report")


def test_report_samples_large_libraries_and_says_so(dev_library, monkeypatch):
    monkeypatch.setattr(report, "TSNE_SAMPLE", 40)
    monkeypatch.setattr(report, "KDIST_SAMPLE", 30)
    monkeypatch.setattr(report, "ELBOW_SAMPLE", 50)
    settings = load_config(None, {"paths.output": str(dev_library.output)})
    with Store.open_readonly(dev_library.db) as store:
        data = report.collect(store, settings)
    notes = {p.title: p.note for p in data.plots}
    assert re.fullmatch(r"a random sample of 40 of \d+ faces", notes["t-SNE map of the encodings"])
    assert notes["k-distance curve"].startswith("a random sample of 30 of")
    assert notes["KMeans elbow curve"].startswith("a random sample of 50 of")


# ---- montages ------------------------------------------------------------------------------------


def _montages(store) -> dict[str, list]:
    manifest, _ = store.manifest()
    return {rp: json.loads(src) for rp, (kind, src) in manifest.items() if kind == montage.KIND}


def test_every_folder_has_a_montage_of_its_most_central_faces(dev_library):
    with Store.open_readonly(dev_library.db) as store:
        sheets = _montages(store)
        faces = {f.id: f for f in store.faces()}
        folders = [d for d in dev_library.output.iterdir() if d.is_dir() and not d.name.startswith(".")]
        assert {f"{d.name}/montage.jpg" for d in folders} == set(sheets)
        for relpath, cells in sheets.items():
            folder = relpath.split("/")[0]
            im = Image.open(dev_library.output / relpath)
            cols = min(montage.GRID, len(cells))
            rows = -(-len(cells) // cols)
            cell_h = montage.CELL + (montage.CAPTION if folder == "doubtful" else 0)
            assert im.size == (cols * montage.CELL, rows * cell_h), relpath
            if folder == "doubtful":
                assert all(faces[c[0]].doubtful and c[3].startswith("nearest: ") for c in cells)
                continue
            (cid,) = {faces[c[0]].cluster_id for c in cells}
            members = sorted(f.id for f in faces.values() if f.cluster_id == cid and not f.doubtful)
            assert len(cells) == min(25, len(members))
            # most central first: by distance to the mean of the person's faces
            got = store.faces_by_id(members)
            ids, enc = got.ids, got.encodings
            d = np.linalg.norm(enc - enc.mean(axis=0), axis=1)
            assert [c[0] for c in cells] == [int(ids[i]) for i in np.lexsort((ids, d))[:25]]
            linked = {(st.st_dev, st.st_ino) for p in (dev_library.output / folder).iterdir()
                      if p.name not in ("montage.jpg", "representative.jpg") for st in [p.stat()]}
            shown = {(st.st_dev, st.st_ino) for c in cells for st in [Path(c[1]).stat()]}
            assert shown <= linked, "a montage shows a photo its folder does not hold"


def test_montage_is_made_again_when_its_folder_changes(dev_library, tmp_path):
    db = _copy_store(dev_library, tmp_path)
    out = tmp_path / "out"
    settings = load_config(None, {"paths.watch": str(dev_library.watch), "paths.output": str(out), "paths.db": str(db)})
    with Store.open(db) as store:
        org = Organizer(settings, store, workers=1)
        try:
            org.reconcile()
            sheets = _montages(store)
            relpath = next(rp for rp in sorted(sheets) if not rp.startswith("doubtful/") and len(sheets[rp]) >= 4)
            before = (out / relpath).read_bytes()
            untouched = next(rp for rp in sorted(sheets) if rp != relpath and not rp.startswith("doubtful/"))
            other = (out / untouched).stat().st_ino
            gone = sheets[relpath][0][1]  # the most central face's photo leaves the library
            store.remove_photos([gone])
            org.refresh()
            after = _montages(store)
        finally:
            org.close()
    assert len(after[relpath]) == len(sheets[relpath]) - 1 and gone not in {c[1] for c in after[relpath]}
    assert (out / relpath).read_bytes() != before
    assert Image.open(out / relpath).size[1] <= Image.open(io.BytesIO(before)).size[1]
    assert (out / untouched).stat().st_ino == other, "a montage whose folder did not change is left alone"
