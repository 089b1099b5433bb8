"""The `organizer` command: a thin click layer over the Python API (pipeline, service, store)."""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__
from .logs import printable, setup_logging
from .methods import ALGORITHMS
from .perturb import KINDS as PERTURB_KINDS
from .storefile import unusable_message

if TYPE_CHECKING:
    from .config import Settings

# The rest of the organizer is imported by the commands that use it: the encoders' fork server
# imports this module too (encode._pool_context), and every worker's start waits for it.

log = logging.getLogger("organizer")


def common_options(fn):
    """--watch/--output/--db/--config on every command; flags override the TOML file."""

    @click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="TOML config file.")
    @click.option("--watch", type=click.Path(file_okay=False, path_type=Path), help="Folder of photos to watch.")
    @click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Folder for the person folders.")
    @click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help="SQLite store (default <output>/.organizer/organizer.db).")
    @click.option("--known", type=click.Path(file_okay=False, path_type=Path),
                  help="Reference photos of known people, one sub-folder per person (paths.known).")
    @click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False), help="Log verbosity.")
    @functools.wraps(fn)
    def wrapper(config_path, watch, output, db, known, log_level, **kwargs):
        from .config import ConfigError, load_config
        from .store import StoreError

        try:
            settings = load_config(
                config_path,
                {
                    "paths.watch": str(watch) if watch else None,
                    "paths.output": str(output) if output else None,
                    "paths.db": str(db) if db else None,
                    "paths.known": str(known) if known else None,
                    "service.log_level": log_level.upper() if log_level else None,
                },
            )
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        setup_logging(settings.service.log_level)
        try:
            return fn(settings=settings, **kwargs)
        except (StoreError, ConfigError, FileNotFoundError, NotADirectoryError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except sqlite3.DatabaseError as exc:
            click.echo(f"error: {unusable_message(settings.db_path, exc)}", err=True)
            sys.exit(1)

    return wrapper


# `organizer scan` exit codes (README, "Exit codes"); 2 is click's usage error.
EXIT_ERROR = 1  # nothing or not everything was done: bad configuration or layout, store problems
EXIT_TREE_INCOMPLETE = 3  # the photos were processed, but output entries could not be written
EXIT_KEPT = 4  # photos not found were kept (watched folder unavailable, or too many at once)


def _require(settings: Settings, *keys: str) -> None:
    missing = [k for k in keys if getattr(settings.paths, k) is None]
    if missing:
        flags = ", ".join(f"--{k} (paths.{k})" for k in missing)
        raise click.UsageError(f"missing {flags}")


def _check_layout(settings: Settings) -> None:
    """Refuse, before anything is written, a layout that cannot work (organizer.layout)."""
    from .layout import Layout

    problems = Layout.of(settings).problems()
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(EXIT_ERROR)


def executor_options(fn):
    """--executor/--scheduler: where photos are encoded (service.executor / service.scheduler)."""

    @click.option("--executor", type=click.Choice(["local", "dask"]), default=None,
                  help="Encode photos in local processes (default) or on a dask cluster (needs `uv sync --extra dask`).")
    @click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
                  help="The dask scheduler; without it --executor dask starts a local cluster.")
    @functools.wraps(fn)
    def wrapper(settings: Settings, executor, scheduler, **kwargs):
        if scheduler and (executor or settings.service.executor) != "dask":
            raise click.UsageError("--scheduler needs --executor dask")
        if executor:
            settings.service.executor = executor
        if scheduler:
            settings.service.scheduler = scheduler
        return fn(settings=settings, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="organizer")
def cli():
    """Sort a photo library into one folder per person."""


def web_options(fn):
    fn = click.option("--port", type=click.IntRange(0, 65535),
                      help="Port of the review page (default 8765, web.port; 0 = any free port).")(fn)
    return click.option("--host", help="Address of the review page (default 127.0.0.1, web.host: this "
                        "machine only; another one prints a warning).")(fn)


def _web_server(settings: Settings, host: str | None, port: int | None, foreground: bool = False):
    """The review page's server, bound; prints its address (with the token) as Jupyter does."""
    from .web.server import WebError, WebServer

    try:
        server = WebServer(settings, host, port)
    except WebError as exc:
        raise click.ClickException(str(exc)) from None
    if foreground:
        server.catch_signals()
    if server.warning:
        click.echo(server.warning, err=True)
    click.echo(f"review page: {server.url}")
    sys.stdout.flush()
    return server


@cli.command()
@common_options
@executor_options
@click.option("--polling", is_flag=True, default=None, help="Poll the folder instead of kernel events (network shares).")
@click.option("--web", "with_web", is_flag=True, help="Also serve the review page (see `organizer web`).")
@web_options
def run(settings: Settings, polling, with_web: bool, host: str | None, port: int | None):
    """Run the service: watch the folder and keep the person folders up to date."""
    from .service import Service

    _require(settings, "watch", "output")
    _check_layout(settings)
    if polling:
        settings.service.polling = True
    server = _web_server(settings, host, port) if with_web else None
    # the page is served from a thread of this process once the service holds the store (so the
    # page never takes the writer's lock); its changes reach the service through the store
    try:
        code = Service(settings, on_ready=server.start if server else None).run()
    finally:
        if server is not None:
            server.stop()
    sys.exit(code)


@cli.command()
@common_options
@web_options
def web(settings: Settings, host: str | None, port: int | None):
    """Serve the review page: people, their faces and the doubtful ones, in the browser."""
    from .store import Store

    _require(settings, "output")
    Store.open_for_edit(settings.db_path).close()  # there must be a store (upgraded when no service runs)
    _web_server(settings, host, port, foreground=True).serve()


@cli.command()
@common_options
@executor_options
@click.option("--forget-anyway", is_flag=True,
              help="Forget photos no longer found even when they are more than service.max_forget_share of all.")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="dbscan", show_default=True,
              help="Batch clustering method for this scan's people (for comparison; the service always "
                   "uses dbscan and goes back to it at its next start).")
def scan(settings: Settings, forget_anyway: bool, algorithm: str):
    """Process every photo in the watched folder once, then exit.

    Exit codes: 0 done; 1 error (nothing more was done); 3 the output tree could not be fully
    written; 4 photos not found were kept, not forgotten (see the log).
    """
    from .encode import EncoderUnavailable
    from .executors import encoder_for
    from .progress import progress_reporter
    from .store import Store
    from .store_review import ReviewQueries

    _require(settings, "watch", "output")
    _check_layout(settings)
    watch = settings.paths.watch
    if not watch.is_dir():  # refused before the store is created
        raise FileNotFoundError(f"the watched folder {watch} does not exist: create it or check --watch "
                                "(paths.watch); `organizer run` creates it on a first start")
    # the workers load their models while this process imports the rest and opens the store
    encoder = encoder_for(settings)
    encoder.start()
    from .pipeline import Organizer

    try:
        store = Store.open(settings.db_path)
    except BaseException:
        encoder.close()
        raise
    with store:
        org = Organizer(settings, store, encoder=encoder)
        try:
            org.encoder.start(wait=True)  # the models load in the workers only (or they say why they cannot)
        except EncoderUnavailable as exc:
            org.close()
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        try:
            with progress_reporter("Scanning") as progress:
                report = org.scan(progress=progress, forget_anyway=forget_anyway)
            if algorithm != "dbscan":
                org.recluster(algorithm)
                org.reconcile()
        finally:
            org.close()
        st = ReviewQueries(store).status()
    from .service import reasons_text

    click.echo(
        f"{report.seen} photos seen, {report.encoded} encoded, {report.duplicates} duplicates, "
        f"{report.failed} failed, {report.removed} removed; "
        f"{st['clusters']} people, {st['doubtful_faces']} doubtful faces"
    )
    code = 0
    if report.tree_failed:
        wanted = getattr(org.tree.last, "wanted", 0)
        click.echo(f"output tree incomplete: {report.tree_failed} of {wanted} entries could not be written "
                   f"({reasons_text(report.tree_reasons)}); fix {settings.paths.output} and run scan again")
        code = EXIT_TREE_INCOMPLETE
    if report.kept:
        click.echo(f"{report.kept} photos not found were kept, not forgotten (see the log above)")
        code = EXIT_KEPT
    sys.exit(code)


@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--errors", default=10, show_default=True, help="How many recent errors to list.")
def status(settings: Settings, as_json: bool, errors: int):
    """What the store knows: photos, duplicates, people (id, folder, photos), doubtful faces, failures."""
    from .output import folder_name
    from .store import Store
    from .store_review import ReviewQueries

    with Store.open_readonly(settings.db_path) as store:
        review = ReviewQueries(store)
        st = review.status(errors)
        # a name that is not UTF-8 is shown with its odd bytes as \xNN (stdout must be text)
        st["last_errors"] = [{k: printable(v) for k, v in e.items()} for e in st["last_errors"]]
        st["output_errors"] = [printable(e) for e in st["output_errors"]]
        st["duplicates"] = review.duplicate_count()
        photos = {p["id"]: p["photos"] for p in review.people_summary()}
        st["people"] = [
            {"id": c["id"], "name": c["name"], "folder": folder_name(c["id"], c["name"]), "faces": c["size"],
             "photos": photos[c["id"]]}
            for c in store.clusters() if c["id"] in photos
        ]
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"store:             {settings.db_path}")
    click.echo(f"photos:            {st['photos']} ({st['photos_with_faces']} with faces, "
               f"{st['photos_without_faces']} without; {st['duplicates']} duplicates of another photo)")
    click.echo(f"failed:            {st['failed']}")
    click.echo(f"faces:             {st['faces']} ({st['doubtful_faces']} doubtful)")
    click.echo(f"people (clusters): {st['clusters']} ({st['named_clusters']} named, {st['hidden_people']} hidden)")
    click.echo(f"corrections:       {st['corrections']}")
    if st["people"]:
        width = max(len(p["folder"]) for p in st["people"])
        click.echo(f"  {'id':>5}  {'folder':<{width}}  photos")
        for p in st["people"]:
            click.echo(f"  {p['id']:>5}  {p['folder']:<{width}}  {p['photos']}")
    if st["last_errors"]:
        click.echo("recent errors:")
        for e in st["last_errors"]:
            click.echo(f"  {e['path']}: {e['error']}")
    if st["output_errors"]:
        click.echo("output tree errors (retried on the next update):")
        for e in st["output_errors"]:
            click.echo(f"  {e}")
    if st["tree_unclear"]:
        click.echo("changes in the person folders that were not understood (nothing was done about them):")
        for e in st["tree_unclear"]:
            click.echo(f"  {printable(e)}")


@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doubtful(settings: Settings, as_json: bool):
    """Photos with a face that was not placed (why, and the nearest person), and photos without faces."""
    from .output import folder_name
    from .store import Store
    from .store_review import ReviewQueries

    with Store.open_readonly(settings.db_path) as store:
        review = ReviewQueries(store)
        faces = review.doubtful_photos()
        for f in faces:
            f["path"] = printable(f["path"])
            f["nearest_folder"] = (folder_name(f["nearest"], f["nearest_name"])
                                   if f["nearest"] is not None else None)
            del f["nearest_name"]
        without = [printable(p) for p in review.photos_without_faces()]
    if as_json:
        click.echo(json.dumps({"doubtful": faces, "without_faces": without}, indent=2))
        return
    click.echo(f"doubtful faces: {len(faces)}")
    for f in faces:
        click.echo(f"  {f['path']}  face {f['face']}: {f['reason'] or 'doubtful'}; "
                   f"nearest: {f['nearest_folder'] or 'nobody'}")
    click.echo(f"photos without faces: {len(without)}")
    for p in without:
        click.echo(f"  {p}")


@cli.command()
@common_options
def recluster(settings: Settings):
    """Re-run batch DBSCAN over all faces (ids stay stable) and repair the output tree."""
    from .pipeline import Organizer
    from .store import Store

    _require(settings, "output")
    with Store.open(settings.db_path, create=False) as store:  # a mistyped --output: no new store
        org = Organizer(settings, store, workers=1)
        try:
            org.tree.read_edits(apply=False)  # the user's changes in the folders count
            org.recluster()
            org.reconcile()
        finally:
            org.close()
        click.echo(f"{len(store.clusters())} people")


@cli.command()
@common_options
@click.argument("cluster_id", type=int)
@click.argument("name", required=False)
@click.option("--clear", is_flag=True, help="Remove the name (back to cluster_<id>).")
def name(settings: Settings, cluster_id: int, name: str | None, clear: bool):
    """Name a person: cluster_<ID>/ becomes <NAME>/ (the service picks it up)."""
    from .output import validate_person_name

    _require(settings, "output")
    if not clear and not name:
        raise click.UsageError("give a NAME or --clear")
    try:
        value = None if clear else validate_person_name(name)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    # Naming is a single small write; it goes through SQLite's own locking so it also works
    # while the service runs (the service notices the change and renames the folder).
    _correct(settings, lambda c: c.name(cluster_id, value))
    click.echo(f"cluster {cluster_id} is now {value or f'cluster_{cluster_id}'}")


def _correct(settings: Settings, change):
    """Record a correction (``change(Corrections)``) through :func:`organizer.corrections.record`
    (applied now when no service holds the store; a running service notices the row itself)."""
    from .corrections import CorrectionError, record

    try:
        return record(settings, change)
    except CorrectionError as exc:
        raise click.UsageError(str(exc)) from None


@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--hidden", is_flag=True, help="List the hidden people instead.")
def people(settings: Settings, as_json: bool, hidden: bool):
    """The people: id, name, folder, faces, hidden."""
    from dataclasses import asdict

    from .corrections import Corrections
    from .store import Store

    with Store.open_readonly(settings.db_path) as store:
        rows = Corrections(store).people(hidden=hidden)
    if as_json:
        click.echo(json.dumps([asdict(p) for p in rows], indent=2))
        return
    for p in rows:
        click.echo(f"{p.id:>6}  {p.faces:>5} faces  {printable(p.folder)}{'  (hidden)' if p.hidden else ''}")


@cli.command()
@common_options
@click.argument("photo", type=click.Path(path_type=Path))
@click.argument("person")
def assign(settings: Settings, photo: Path, person: str):
    """PHOTO's face is PERSON's (an id, a name or a folder name; a new name makes a new person).
    PHOTO is an original or its link in a person folder (then the face in that folder is meant)."""
    _require(settings, "output")
    out = settings.paths.output

    def change(c):
        target = c.person_id(person, create=False) if _known(c, person) else None
        if target is None:
            face = c.face_for(photo, -1, reject=False, output=out)
            pid = c.split(person, [face])
            return f"{photo} is now in {c.label(pid)} (a new person, id {pid})"
        face = c.face_for(photo, target, reject=False, output=out)
        c.assign([face], target, from_person=c.store.face(face).cluster_id)
        return f"{photo} is now in {c.label(target)}"

    click.echo(_correct(settings, change))


def _known(c, ref: str) -> bool:
    from .corrections import CorrectionError

    try:
        c.person_id(ref)
        return True
    except CorrectionError:
        return False


@cli.command()
@common_options
@click.argument("photo", type=click.Path(path_type=Path))
@click.argument("person")
def reject(settings: Settings, photo: Path, person: str):
    """PHOTO's face is never PERSON's again (it goes to doubtful/)."""
    _require(settings, "output")

    def change(c):
        pid = c.person_id(person)
        c.reject([c.face_for(photo, pid, reject=True, output=settings.paths.output)], pid)
        return f"{photo} is no longer in {c.label(pid)}"

    click.echo(_correct(settings, change))


@cli.command()
@common_options
@click.argument("a")
@click.argument("b")
def merge(settings: Settings, a: str, b: str):
    """Person A is person B from now on (one folder, B's name, or A's if B has none)."""
    _require(settings, "output")

    def change(c):
        pa, pb = c.person_id(a), c.person_id(b)
        c.merge(pa, pb)
        return f"{a} merged into {c.label(pb)}"

    click.echo(_correct(settings, change))


@cli.command()
@common_options
@click.argument("person")
def hide(settings: Settings, person: str):
    """PERSON gets no folder, and its future faces go nowhere (`unhide` brings it back)."""
    _require(settings, "output")

    def change(c):
        pid = c.person_id(person)
        c.hide(pid)
        return f"person {pid} is hidden"

    click.echo(_correct(settings, change))


@cli.command()
@common_options
@click.argument("person")
def unhide(settings: Settings, person: str):
    """Show a hidden PERSON again."""
    _require(settings, "output")

    def change(c):
        pid = c.person_id(person)
        c.unhide(pid)
        return f"person {pid} is shown again"

    click.echo(_correct(settings, change))


@cli.command()
@common_options
def undo(settings: Settings):
    """Undo the latest correction (repeat to go further back)."""
    from .corrections import describe

    _require(settings, "output")

    def change(c):
        done = c.undo()
        return "nothing to undo" if done is None else f"undone: {describe(done, c.label)}"

    click.echo(_correct(settings, change))


@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def corrections(settings: Settings, as_json: bool):
    """The history of corrections: what, when, and from where (folders, cli, known)."""
    import time as _time

    from .corrections import Corrections, as_dict, describe
    from .store import Store

    with Store.open_readonly(settings.db_path) as store:
        c = Corrections(store)
        rows = c.history()
        lines = [(r, describe(r, c.label)) for r in rows]
    if as_json:
        click.echo(json.dumps([dict(as_dict(r), text=t) for r, t in lines], indent=2))
        return
    for r, text in lines:
        when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(r.created_at))
        click.echo(f"{r.id:>5}  {when}  {r.source:<8} {printable(text)}{'  (undone)' if r.undone else ''}")


@cli.command()
@click.option("--labels", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Labelled photos: one folder per person (DIR/<person>/<photo>).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config file (its detection and clustering settings; its folders are not used).")
@click.option("--algorithm", "algorithms", multiple=True, type=click.Choice(ALGORITHMS),
              help="Clustering method to score (repeat to compare; default dbscan, the service's).")
@click.option("--sweep", "sweeps", multiple=True, metavar="NAME=START:STOP:STEP",
              help="Score a range of a clustering setting (eps, min_samples, doubt_margin, linkage_threshold); "
                   "repeat for a grid.")
@click.option("--perturb", "perturbs", multiple=True, type=click.Choice(PERTURB_KINDS),
              help="Also run on degraded copies (repeatable): how faces found and F1 fall.")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the store and output tree here (a new or empty folder) instead of a temporary one.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def evaluate(labels, config_path, algorithms, sweeps, perturbs, keep, as_json):
    """Score the sorting against labelled photos: pairwise and BCubed precision/recall/F1."""
    from .insight import run_evaluate

    run_evaluate(labels, config_path, algorithms, sweeps, perturbs, keep, as_json)


@cli.command()
@common_options
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="HTML file to write.")
def report(settings: Settings, out: Path):
    """Write a self-contained HTML report on the clustering (plots, scores, the eps curve)."""
    from .report import write_report
    from .store import Store

    _require(settings, "output")
    with Store.open_readonly(settings.db_path) as store:
        data = write_report(store, settings, out)
    click.echo(f"{out}: {data.people} people, {data.faces} faces ({data.doubtful} doubtful), {len(data.plots)} plots")


@cli.group()
def config():
    """Configuration helpers."""


@config.command("check")
@common_options
def config_check(settings: Settings):
    """Validate the configuration, print the effective settings and check the paths.

    Paths are shown resolved (``~``, ``$VAR`` and relative paths; README "Configuration").
    """
    from .layout import Layout

    click.echo(json.dumps(settings.model_dump(mode="json"), indent=2))
    problems = []
    if settings.paths.output is not None or settings.paths.db is not None:
        if settings.paths.output is None:
            settings.paths.output = settings.db_path.parent  # only to place the layout check
        layout = Layout.of(settings)
        for what, p in (("watch", layout.watch), ("output", layout.output), ("db", layout.db), ("known", layout.known)):
            if p is not None:
                state = "exists" if p.exists() else "does not exist yet"
                if what == "watch" and not p.exists():
                    state += " (`organizer run` creates it on a first start; `scan` needs it)"
                click.echo(f"{what + ':':<8} {p}  [{state}]", err=True)
        problems = layout.problems()
    for p in problems:
        click.echo(f"error: {p}", err=True)
    if problems:
        sys.exit(EXIT_ERROR)
    click.echo("configuration OK", err=True)


def main() -> None:
    cli(prog_name="organizer")
