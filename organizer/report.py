"""The report (`organizer report --out report.html`): one self-contained HTML page about the
store's clustering, its plots embedded as PNG (matplotlib, Agg backend, no display needed).

Plots: people by size, a t-SNE and a PCA map of the encodings coloured by person, the k-distance
curve (distance of each face to its ``min_samples``-th neighbour, sorted: the knee is where eps
belongs) and the KMeans elbow curve. Scores: silhouette, Davies-Bouldin and Calinski-Harabasz over
the faces placed in a person, and how many faces are doubtful or noise.

Everything that grows with the library is sampled (t-SNE is O(n^2)-ish; 100k faces would take
many minutes), and each plot says when it shows a sample.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TSNE_SAMPLE = 1000  # faces shown in the t-SNE map (seconds; t-SNE on all of 100k would take many minutes)
TSNE_ITER = 500  # enough for a map of this size to settle
PCA_SAMPLE = 20_000  # faces drawn in the PCA map (PCA itself is fitted on all)
KDIST_SAMPLE = 2000  # faces whose k-th neighbour distance is measured (against all faces)
SCORE_SAMPLE = 5000  # faces the silhouette is computed on (O(n^2))
ELBOW_SAMPLE = 1000  # faces the KMeans curve is computed on (one KMeans run per k)
NOISE_COLOUR = "#b0b0b0"


@dataclass
class Plot:
    title: str
    png: bytes
    note: str = ""  # e.g. that it shows a sample


@dataclass
class ReportData:
    """What the report shows, computed from the store (also what the tests check)."""

    faces: int = 0
    usable: int = 0
    people: int = 0
    doubtful: int = 0
    noise: int = 0
    photos: int = 0
    scores: dict[str, float | None] = field(default_factory=dict)
    plots: list[Plot] = field(default_factory=list)


def _sample(n: int, k: int, rng) -> np.ndarray:
    return np.arange(n) if n <= k else np.sort(rng.choice(n, k, replace=False))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _figure(w: float = 7, h: float = 4.5):
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas by default

    fig = Figure(figsize=(w, h))
    return fig, fig.subplots()


def _sampled_note(shown: int, total: int, what: str = "faces") -> str:
    return f"a random sample of {shown} of {total} {what}" if shown < total else f"all {total} {what}"


def _colours(labels: np.ndarray) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    order = {c: i for i, c in enumerate(sorted(set(labels.tolist()) - {-1}))}
    return [NOISE_COLOUR if c < 0 else cmap(order[c] % 20) for c in labels.tolist()]


def sizes_plot(sizes: dict[str, int]) -> Plot:
    fig, ax = _figure(max(7, min(20, len(sizes) * 0.35)), 4.5)
    items = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    ax.bar(range(len(items)), [v for _, v in items], color="#4c72b0")
    if len(items) <= 60:
        ax.set_xticks(range(len(items)), [k for k, _ in items], rotation=70, ha="right", fontsize=8)
    ax.set_ylabel("faces")
    ax.set_title(f"People by size ({len(items)} people)")
    return Plot("People by size", _png(fig))


def scatter_plot(xy: np.ndarray, labels: np.ndarray, title: str, note: str) -> Plot:
    fig, ax = _figure(7, 6)
    noise = labels < 0
    colours = np.array(_colours(labels), dtype=object)
    ax.scatter(xy[noise, 0], xy[noise, 1], s=8, c=NOISE_COLOUR, label="doubtful / noise")
    if (~noise).any():
        ax.scatter(xy[~noise, 0], xy[~noise, 1], s=14, c=list(colours[~noise]))
    ax.set_title(f"{title}\n({note})", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if noise.any():
        ax.legend(loc="best", fontsize=8)
    return Plot(title, _png(fig), note)


def kdistance_plot(enc: np.ndarray, k: int, eps: float, rng) -> Plot:
    from sklearn.neighbors import NearestNeighbors

    q = _sample(len(enc), KDIST_SAMPLE, rng)
    k = min(k, len(enc) - 1)
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(enc)  # trees are slow in 128-d
    dist = np.sort(nn.kneighbors(enc[q])[0][:, k])[::-1]  # column 0 is the face itself
    note = _sampled_note(len(q), len(enc))
    fig, ax = _figure()
    ax.plot(np.arange(len(dist)), dist, color="#4c72b0")
    ax.axhline(eps, color="#c44e52", linestyle="--", label=f"eps = {eps:g}")
    ax.set_xlabel("faces, by distance")
    ax.set_ylabel(f"distance to the nearest face number {k}")
    ax.set_title(f"k-distance curve (k = min_samples = {k}; {note})", fontsize=10)
    ax.legend()
    return Plot("k-distance curve", _png(fig), note)


def elbow_plot(enc: np.ndarray) -> Plot:
    from .methods import kmeans_curve

    curve = kmeans_curve(enc, sample=ELBOW_SAMPLE, n_init=1)
    note = _sampled_note(curve.sampled, len(enc))
    fig, ax = _figure()
    ax.plot(curve.ks, curve.inertia, "o-", color="#4c72b0", label="inertia")
    ax.set_xscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter() if len(curve.ks) < 8 else "")
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("inertia (sum of squared distances)")
    ax2 = ax.twinx()
    ax2.plot(curve.ks, curve.silhouette, "s--", color="#55a868", label="silhouette")
    ax2.set_ylabel("silhouette")
    ax2.axvline(curve.best_k, color="#c44e52", linestyle=":", label=f"best k = {curve.best_k}")
    ax.set_title(f"KMeans elbow curve ({note})", fontsize=10)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    return Plot("KMeans elbow curve", _png(fig), note)


def cluster_scores(enc: np.ndarray, labels: np.ndarray, rng) -> dict[str, float | None]:
    """Silhouette (higher is better, -1..1), Davies-Bouldin (lower is better), Calinski-Harabasz
    (higher is better) over the faces placed in a person; None with fewer than two people."""
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

    placed = labels >= 0
    x, y = enc[placed], labels[placed]
    if len(set(y.tolist())) < 2 or len(y) <= len(set(y.tolist())):
        return {"silhouette": None, "davies_bouldin": None, "calinski_harabasz": None}
    s = _sample(len(x), SCORE_SAMPLE, rng)
    return {
        "silhouette": float(silhouette_score(x[s], y[s])) if len(set(y[s].tolist())) > 1 else None,
        "davies_bouldin": float(davies_bouldin_score(x, y)),
        "calinski_harabasz": float(calinski_harabasz_score(x, y)),
    }


def collect(store, settings, seed: int = 0) -> ReportData:
    """Compute the report's figures and plots from the store."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from .output import folder_name
    from .store_review import ReviewQueries

    rng = np.random.default_rng(seed)
    d, c = settings.detection, settings.clustering
    usable = store.usable_encodings(d.min_face_size, d.min_sharpness)
    ids, enc = usable.ids, usable.encodings
    faces = {f.id: f for f in store.faces()}
    clusters = store.clusters()
    names = {cl["id"]: folder_name(cl["id"], cl["name"]) for cl in clusters}
    status = ReviewQueries(store).status()
    data = ReportData(faces=len(faces), usable=len(ids), people=status["clusters"],
                      doubtful=sum(f.doubtful for f in faces.values()),
                      noise=sum(f.cluster_id is None for f in faces.values()),
                      photos=status["photos_ok"])
    labels = np.array([faces[int(f)].cluster_id if faces[int(f)].cluster_id is not None else -1 for f in ids], dtype=int)
    sizes: dict[str, int] = {}
    for f in faces.values():
        if f.cluster_id is not None and not f.doubtful and f.cluster_id in names:
            sizes[names[f.cluster_id]] = sizes.get(names[f.cluster_id], 0) + 1
    data.plots.append(sizes_plot(sizes))
    if len(ids) < 3:
        return data
    data.scores = cluster_scores(enc, labels, rng)
    t = _sample(len(ids), TSNE_SAMPLE, rng)
    tsne = TSNE(n_components=2, perplexity=float(min(30, (len(t) - 1) / 3)), init="pca", random_state=seed,
                max_iter=TSNE_ITER)
    # on the 50 main directions (the usual first step: faster neighbour search, same map)
    reduced = PCA(n_components=min(50, len(t), enc.shape[1]), random_state=seed).fit_transform(enc[t])
    data.plots.append(scatter_plot(tsne.fit_transform(reduced), labels[t], "t-SNE map of the encodings",
                                   _sampled_note(len(t), len(ids))))
    pca = PCA(n_components=2, random_state=seed).fit(enc)
    p = _sample(len(ids), PCA_SAMPLE, rng)
    data.plots.append(scatter_plot(pca.transform(enc[p]), labels[p], "PCA map of the encodings",
                                   _sampled_note(len(p), len(ids)) + " drawn; PCA fitted on all"))
    data.plots.append(kdistance_plot(enc, c.min_samples, c.eps, rng))
    data.plots.append(elbow_plot(enc))
    return data


def _fmt(v) -> str:
    return "n/a (fewer than two people)" if v is None else f"{v:.3f}"


def render(data: ReportData, title: str) -> str:
    rows = [("photos", data.photos), ("faces", data.faces), ("faces fit for clustering", data.usable),
            ("people (folders)", data.people), ("doubtful faces", data.doubtful),
            ("noise (faces in no person)", data.noise)]
    score_rows = [("silhouette (-1..1, higher is better)", data.scores.get("silhouette")),
                  ("Davies-Bouldin (lower is better)", data.scores.get("davies_bouldin")),
                  ("Calinski-Harabasz (higher is better)", data.scores.get("calinski_harabasz"))]
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .8em;text-align:left}figure{margin:2em 0}"
        "figcaption{color:#555}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Made {html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>",
        "<h2>Counts</h2><table id='counts'>",
        *[f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows],
        "</table>",
        "<h2>Cluster scores</h2><p>Over the faces placed in a person (doubtful faces of a person "
        "included, noise left out).</p><table id='scores'>",
        *[f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in score_rows],
        "</table>",
        "<h2>Plots</h2>",
    ]
    for plot in data.plots:
        b64 = base64.b64encode(plot.png).decode("ascii")
        caption = html.escape(plot.title + (f" ({plot.note})" if plot.note else ""))
        parts.append(f"<figure><img alt='{html.escape(plot.title)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{caption}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(store, settings, out: Path) -> ReportData:
    data = collect(store, settings)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(data, f"organizer report: {settings.paths.output or store.path}"), encoding="utf-8")
    tmp.replace(out)
    return data
