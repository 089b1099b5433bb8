"""Safety: originals stay byte-identical, nothing is written outside the output and store
folders, and the organizer never touches the network."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

from .badfiles import ServiceProc, folders_holding, wait_for
from .conftest import DEV, run_organizer, tree_hashes

A, B = "Colin_Powell", "Tony_Blair"


def listing(root: Path) -> dict[str, tuple]:
    """Every entry under root (folders too) with what a write would change: type, size, mode,
    mtime, and the content hash of files. (ctime and the link count of originals do change:
    hard links to them are made in the output.)"""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, stat.S_IMODE(st.st_mode),
                                             st.st_mtime_ns)
    out["."] = (None, None, stat.S_IMODE(root.stat().st_mode), root.stat().st_mtime_ns)
    return out


def _library(root: Path) -> tuple[Path, Path, Path]:
    watch = root / "photos"
    for person in (A, B):
        shutil.copytree(DEV / person, watch / person)
    (watch / "broken.jpg").write_bytes(b"\xff\xd8 not really")  # a failure to record, too
    return watch, root / "sorted", root / "state" / "organizer.db"


def test_nothing_written_outside_output_and_store(tmp_path):
    """scan, run (with a photo arriving), status, name and recluster, with HOME, the working
    directory and TMPDIR pointing at empty folders: afterwards the watched tree, HOME, the working
    directory are as they were, TMPDIR is left empty, and the test folder holds only output and store."""
    watch, output, db = _library(tmp_path)
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for d in (home, cwd, tmp):
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1")
    pkg = str(Path(__file__).resolve().parent.parent)  # the checkout, since cwd is not it
    env["PYTHONPATH"] = pkg + os.pathsep + env.get("PYTHONPATH", "")
    # the photo that arrives later: taken out of the library (identical files are linked once)
    late = tmp_path / "late.jpg"
    first = sorted((watch / A).iterdir())[0]
    os.rename(first, late)
    before = {d: listing(d) for d in (watch, home, cwd, tmp)}
    hashes = tree_hashes(watch)
    common = ["--output", str(output), "--db", str(db)]

    run_organizer("scan", "--watch", str(watch), *common, cwd=cwd, env=env)
    cfg = tmp_path / "cwd-config.toml"
    cfg.write_text("[service]\nsettle_seconds = 0.3\nrescan_interval = 1\nworkers = 2\n")
    before[tmp_path] = set(os.listdir(tmp_path))
    svc = ServiceProc(["--watch", str(watch), *common, "--config", str(cfg)], tmp_path / "svc.log", env=env, cwd=cwd)
    try:
        wait_for(lambda: "rescan:" in svc.text(), 120, "the start-up scan")
        # a photo arrives while it runs (moved in, so the watched tree's new state is known)
        os.rename(late, watch / A / "late.jpg")
        before[watch] = listing(watch)
        hashes = tree_hashes(watch)
        wait_for(lambda: folders_holding(output, watch / A / "late.jpg"), 60, "the new photo to be sorted")
        wait_for(lambda: svc.text().count("rescan:") >= 3, 30, "two periodic rescans")
    finally:
        assert svc.stop() == 0
    run_organizer("status", *common, cwd=cwd, env=env)
    cid = next(iter(folders_holding(output, watch / A / "late.jpg"))).split("_")[1]
    run_organizer("name", cid, "Grandpa", *common, cwd=cwd, env=env)
    run_organizer("recluster", *common, cwd=cwd, env=env)

    assert tree_hashes(watch) == hashes, "an original changed"
    for d in (watch, home, cwd):
        assert listing(d) == before[d], f"something was written in {d}"
    # TMPDIR is for temporaries: the encoder pool's fork server keeps its socket there while it
    # runs (which changes the folder's mtime); nothing may be left behind
    assert {k: v for k, v in listing(tmp).items() if k != "."} == {}, listing(tmp)
    after = set(os.listdir(tmp_path)) - {"svc.log"}
    assert after == before[tmp_path] - {"late.jpg"}, after ^ before[tmp_path]
    assert {p.name for p in db.parent.iterdir()} <= {
        "organizer.db", "organizer.db-wal", "organizer.db-shm", "organizer.db.lock", "organizer.db.engine.npz",
        "organizer.db.people.npz"}
    assert (output / "Grandpa").is_dir()


NO_NETWORK = textwrap.dedent('''
    """sitecustomize for the no-network test: every Python process started with this folder on
    PYTHONPATH (the organizer, and the encoder workers it spawns) refuses and records any use of
    an internet socket or a DNS lookup."""
    import os, socket, sys

    _LOG = os.environ["NO_NETWORK_LOG"]
    _NET = (socket.AF_INET, socket.AF_INET6)
    _LOOKUPS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
                "socket.gethostbyname_ex"}

    def _record(what):
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()} {what}\\n")

    def _hook(event, args):
        if event == "socket.__new__" and args[1] in _NET:
            _record(f"{event} family={args[1]}")
            raise PermissionError("the organizer must not use the network")
        if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg") and \\
                getattr(args[0], "family", None) in _NET:
            _record(f"{event} {args[1]!r}")
            raise PermissionError("the organizer must not use the network")
        if event in _LOOKUPS:
            _record(f"{event} {args!r}")
            raise PermissionError("the organizer must not look up host names")

    sys.addaudithook(_hook)
    with open(os.environ["NO_NETWORK_PIDS"], "a") as fh:
        fh.write(f"{os.getpid()} {' '.join(sys.orig_argv)[:300]}\\n")
''')


def test_no_network_access(tmp_path):
    """An audit hook in every organizer process (sitecustomize; the encoder workers, spawned or
    forked by the fork server, have it too) refuses and records internet sockets and DNS lookups. scan and run (with
    sd_notify's unix socket) must not trigger it; a deliberate connect does (the guard works)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    log, pids = tmp_path / "network.log", tmp_path / "pids.log"
    env = {**os.environ, "NO_NETWORK_LOG": str(log), "NO_NETWORK_PIDS": str(pids),
           "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).resolve().parent.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    # the guard itself: a connect is refused and recorded
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9), 1)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert "must not" in probe.stderr and log.read_text().strip()
    log.unlink()
    pids.unlink()

    watch = tmp_path / "photos"
    shutil.copytree(DEV / A, watch / A)
    output = tmp_path / "sorted"
    run_organizer("scan", "--watch", str(watch), "--output", str(output), env=env)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[service]\nsettle_seconds = 0.3\nrescan_interval = 0\nworkers = 2\n")
    shutil.copytree(DEV / B, tmp_path / "later")
    from .test_systemd import NotifySocket

    sock = NotifySocket()
    env_run = {**env, "NOTIFY_SOCKET": sock.address}
    svc = ServiceProc(["--watch", str(watch), "--output", str(output), "--config", str(cfg)], tmp_path / "svc.log",
                      env=env_run)
    try:
        wait_for(lambda: sock.has("READY=1"), 120, "READY=1")
        os.rename(tmp_path / "later", watch / B)
        wait_for(lambda: folders_holding(output, sorted((watch / B).iterdir())[-1]), 120, "the new photos")
    finally:
        code = svc.stop(signal.SIGTERM)
        sock.close()
    assert code == 0, svc.text()[-3000:]
    assert not log.exists(), log.read_text()
    started = pids.read_text().splitlines()
    if "forkserver" in multiprocessing.get_all_start_methods():
        # scan and run: the organizer, its fork server and resource tracker; the encoder workers are
        # forks of the fork server, so they carry its audit hook without starting Python again
        assert sum("multiprocessing.forkserver" in l for l in started) == 2, started
        assert len(started) >= 6, started
    else:
        # scan: the CLI and 2 encoder workers; run: the service and 2 workers (and spawn's helpers)
        assert len(started) >= 6, started
        assert sum("multiprocessing" in l or "spawn" in l for l in started) >= 4, started
