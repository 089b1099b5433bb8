"""The `evaluate` command's body (cli.py stays a list of thin commands): runs
:class:`organizer.evaluate.Evaluation` and prints its tables, or JSON."""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import click
from pydantic import ValidationError

from .config import ConfigError, load_config
from .evaluate import Evaluation, PerturbedRun, perturbed_runs, sweep_grid


def _fmt_params(params: dict) -> str:
    return " ".join(f"{k}={v:g}" for k, v in params.items()) or "configured"


def _table(runs) -> list[str]:
    lines = [f"{'algorithm':17} {'settings':24} {'pw P':>6} {'pw R':>6} {'pw F1':>6} {'B3 P':>6} {'B3 R':>6} "
             f"{'B3 F1':>6} {'cover':>6} {'once':>5} {'people':>6} {'time':>7}"]
    for r in runs:
        s = r.scores
        lines.append(f"{r.algorithm:17} {_fmt_params(r.params):24} {s.precision:6.3f} {s.recall:6.3f} {s.f1:6.3f} "
                     f"{s.bcubed_precision:6.3f} {s.bcubed_recall:6.3f} {s.bcubed_f1:6.3f} {s.coverage:6.2f} "
                     f"{'-' if s.once_placed is None else f'{s.once_placed:.2f}':>5} {s.clusters:6d} {r.seconds:6.2f}s")
    return lines


def _perturb_table(clean, rows) -> list[str]:
    lines = [f"{'degradation':14} {'faces':>6} {'photos w/ face':>14} {'F1':>6} {'ΔF1':>7} {'B3 F1':>6}"]
    base = clean.run.scores.f1
    for r in [clean, *rows]:
        label = "clean" if r.level is None else f"{r.kind} {r.level:g}"
        lines.append(f"{label:14} {r.encoded.faces:6d} {r.encoded.photos_with_faces:14d} {r.run.scores.f1:6.3f} "
                     f"{r.run.scores.f1 - base:+7.3f} {r.run.scores.bcubed_f1:6.3f}")
    return lines


def run_evaluate(labels: Path, config_path, algorithms, sweeps, perturbs, keep, as_json: bool) -> None:
    try:
        settings = load_config(config_path)
        grid = sweep_grid(list(sweeps))
    except (ConfigError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    algorithms = list(dict.fromkeys(algorithms)) or ["dbscan"]
    with ExitStack() as stack:
        if keep:
            keep = Path(keep)
            if keep.exists() and any(keep.iterdir()):
                raise click.UsageError(f"--keep {keep}: the folder is not empty")
            keep.mkdir(parents=True, exist_ok=True)
            workdir = keep
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="organizer-evaluate-")))
        try:
            ev = Evaluation(labels, settings, workdir)
            encoded = ev.encode()
            runs = []
            for algorithm in algorithms:
                for params in grid:
                    runs.append(ev.run(algorithm, params))
            ev.run(runs[0].algorithm, runs[0].params, tree=True)  # the store and tree kept show the first row
            perturbed = []
            if perturbs:
                clean_run = next((r for r in runs if r.algorithm == "dbscan" and not r.params), None) or ev.run()
                clean = PerturbedRun("clean", None, encoded, clean_run)
                perturbed = perturbed_runs(ev, list(dict.fromkeys(perturbs)), workdir / "perturbed")
        except (ValidationError, ValueError) as exc:
            raise click.UsageError(str(exc)) from None
        except FileNotFoundError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
    if as_json:
        out = {"labels": str(labels), "photos": encoded.photos, "people": encoded.people, "faces": encoded.faces,
               "photos_with_faces": encoded.photos_with_faces, "encode_seconds": round(encoded.seconds, 2),
               "runs": [r.as_dict() for r in runs]}
        if perturbs:
            out["perturbed"] = [clean.as_dict()] + [r.as_dict() for r in perturbed]
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{labels}: {encoded.photos} photos of {encoded.people} people; {encoded.faces} faces found in "
               f"{encoded.photos_with_faces} photos (encoded in {encoded.seconds:.1f} s)")
    click.echo("\n".join(_table(runs)))
    if perturbs:
        click.echo("\nrobustness (configured clustering, dbscan):")
        click.echo("\n".join(_perturb_table(clean, perturbed)))
    if keep:
        click.echo(f"\nstore and tree kept in {keep} (the tree shows the first row)")
