"""The dask executor: the encode stage on a dask.distributed cluster (a LocalCluster of two worker
processes on loopback here) sorts a 2-person subset of dev/ into the same folders as the local
process pool; a photo a worker cannot see at its path is sent to it as bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from organizer import executors  # noqa: E402
from organizer.config import load_config  # noqa: E402
from organizer.executors import DaskEncoder  # noqa: E402
from organizer.pipeline import Organizer  # noqa: E402
from organizer.store import Store  # noqa: E402

from .conftest import DEV, run_organizer  # noqa: E402

PEOPLE = ["Barack_Obama", "Tony_Blair"]


def _folders(output: Path) -> set[frozenset[str]]:
    """The person folders as sets of photo names (folder names depend on the order results arrive)."""
    groups: dict[str, set[str]] = {}
    for folder in output.iterdir():
        if folder.is_dir() and not folder.name.startswith(".") and folder.name != "doubtful":
            groups[folder.name] = {e.name for e in folder.iterdir() if e.name != "representative.jpg"}
    return {frozenset(g) for g in groups.values()}


def _doubtful(output: Path) -> set[str]:
    d = output / "doubtful"
    return {e.name for e in d.iterdir() if e.is_file()} if d.is_dir() else set()


def _scan(watch: Path, out: Path, **service) -> tuple[Organizer, Store]:
    settings = load_config(None, {"paths.watch": str(watch), "paths.output": str(out), "service.workers": 2,
                                  **{f"service.{k}": v for k, v in service.items()}})
    store = Store.open(settings.db_path)
    org = Organizer(settings, store)
    report = org.scan()
    assert report.encoded == sum(len(list((DEV / p).iterdir())) for p in PEOPLE)
    return org, store


def test_dask_cluster_gives_the_same_folders_as_the_local_pool(tmp_path, monkeypatch):
    watch = tmp_path / "photos"
    for p in PEOPLE:
        shutil.copytree(DEV / p, watch / p)
    org, store = _scan(watch, tmp_path / "local")
    org.close()
    store.close()
    org, store = _scan(watch, tmp_path / "dask", executor="dask")
    try:
        assert isinstance(org.encoder, DaskEncoder)
        local, dask = _folders(tmp_path / "local"), _folders(tmp_path / "dask")
        assert len(local) == 2 and all(len(g) >= 3 for g in local)
        assert dask == local
        assert _doubtful(tmp_path / "dask") == _doubtful(tmp_path / "local")

        # a worker that does not see the photo where the coordinator does (another machine without
        # the share): it answers "not here" and gets the bytes instead
        photo = watch / "Barack_Obama" / "obama.jpg"
        local_faces = [f.encoding for f in next(iter(org.encoder.map([photo]))).faces]
        monkeypatch.setattr(executors, "_size_here", lambda p: photo.stat().st_size + 1)
        client = org.encoder._connect()
        sent: list[bool] = []  # per submitted task: were the photo's bytes attached?
        real_submit = client.submit
        monkeypatch.setattr(client, "submit", lambda *a, **kw: sent.append(a[-1] is not None) or real_submit(*a, **kw))
        [result] = list(org.encoder.map([photo]))
        assert sent == [False, True]
        assert result.error is None and len(result.faces) == len(local_faces) == 1
        assert (result.faces[0].encoding == local_faces[0]).all()
    finally:
        org.close()
        store.close()


def test_scheduler_needs_the_dask_executor(tmp_path):
    proc = run_organizer("scan", "--watch", str(DEV), "--output", str(tmp_path / "out"),
                         "--scheduler", "tcp://127.0.0.1:8786", check=False)
    assert proc.returncode == 2 and "--scheduler needs --executor dask" in proc.stderr
    assert not (tmp_path / "out").exists()
