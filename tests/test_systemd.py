"""systemd: the unit files verify, their sandbox leaves the organizer working, sd_notify works.

There is no running systemd in a test container, so the sandbox is checked in pieces that can run
anywhere: `systemd-analyze verify` and `security --offline` on the unit files (skipped when
systemd-analyze is absent), W^X memory refused by the kernel (PR_SET_MDWE, what
MemoryDenyWriteExecute= does), and, when the test may create namespaces, an emulation of the
system unit's mounts and network (read-only file system except the output and store folders,
/proc reduced to processes, no network) with the service running inside and talking sd_notify.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from .badfiles import folders_holding, wait_for
from .conftest import DEV, ROOT, organizer_cmd, run_organizer, tree_hashes

UNITS = ROOT / "systemd"
SYSTEM_UNIT = UNITS / "organizer.service"
USER_UNIT = UNITS / "organizer-user.service"
INSTALLED = "/opt/organizer/.venv/bin/organizer"  # where the install steps put the entry point
PERSON = "Colin_Powell"


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd to run this check)")
    return exe


def _entry_point() -> Path:
    exe = Path(sys.executable).parent / "organizer"
    if not exe.exists():
        pytest.skip(f"no organizer entry point next to {sys.executable}")
    return exe


def _directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


# ---------------------------------------------------------------------------------------------
# the unit files
# ---------------------------------------------------------------------------------------------


def test_units_say_what_the_install_steps_do():
    system, user = _directives(SYSTEM_UNIT), _directives(USER_UNIT)
    assert system["ExecStart"] == [f"{INSTALLED} run --config /etc/organizer/config.toml"]
    assert user["ExecStart"] == ["%h/.local/share/organizer-src/.venv/bin/organizer run --config "
                                 "%h/.config/organizer/config.toml"]
    for d in (system, user):
        assert d["Type"] == ["notify"] and d["Restart"] == ["on-failure"]
        assert d["KillMode"] == ["mixed"]  # SIGTERM to the main process only; it stops the workers
        assert d["RestrictAddressFamilies"] == ["AF_UNIX"] and d["MemoryDenyWriteExecute"] == ["yes"]
        assert d["NoNewPrivileges"] == ["yes"]
        (timeout,) = d["TimeoutStopSec"]
        assert timeout.endswith("min") and int(timeout[:-3]) >= 2, "too short to finish a batch"
    assert system["User"] == ["organizer"] and system["PrivateNetwork"] == ["yes"]
    assert system["ProtectSystem"] == ["strict"] and system["ReadOnlyPaths"] == ["/srv/photos"]
    assert system["ReadWritePaths"] == ["/srv/photos-by-person"] and system["StateDirectory"] == ["organizer"]
    # the README's install steps describe the same install
    notes = (ROOT / "README.md").read_text()
    for needle in ("/etc/organizer/config.toml", "/srv/photos-by-person", "/var/lib/organizer/organizer.db",
                   "uv sync --locked --no-dev", "systemctl enable --now organizer",
                   "systemctl --user enable --now organizer", "loginctl enable-linger"):
        assert needle in notes, needle


def test_system_unit_verifies(tmp_path):
    exe = _analyze()
    text = SYSTEM_UNIT.read_text()
    assert INSTALLED in text
    unit = tmp_path / "organizer.service"
    # verify also checks that ExecStart's program exists: point it at this checkout's entry point
    unit.write_text(text.replace(INSTALLED, str(_entry_point())))
    proc = subprocess.run([exe, "verify", "--man=no", str(unit)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_user_unit_verifies(tmp_path):
    exe = _analyze()
    home, runtime = tmp_path / "home", tmp_path / "run"
    src = home / ".local" / "share" / "organizer-src" / ".venv" / "bin"
    src.mkdir(parents=True)
    (src / "organizer").symlink_to(_entry_point())
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    proc = subprocess.run([exe, "--user", "verify", "--man=no", str(USER_UNIT)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    if "Failed to initialize manager" in proc.stderr:
        pytest.skip(f"systemd-analyze --user cannot run here: {proc.stderr.strip()}")
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def _exposure(unit: Path) -> float:
    exe = _analyze()
    if "--offline" not in subprocess.run([exe, "--help"], capture_output=True, text=True).stdout:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    proc = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    return float(m.group(1))


def test_system_unit_exposure_is_low():
    """`systemd-analyze security`: 0.4 SAFE when written (the notes quote it)."""
    assert _exposure(SYSTEM_UNIT) <= 1.0


def test_user_unit_exposure_is_recorded():
    """The user unit gives up the mount-namespace options (see its header): 5.9 MEDIUM when
    written, against 9.6 UNSAFE for a unit without any hardening."""
    assert _exposure(USER_UNIT) <= 6.0


# ---------------------------------------------------------------------------------------------
# sd_notify
# ---------------------------------------------------------------------------------------------


class NotifySocket:
    """What systemd does for Type=notify: a unix datagram socket named in $NOTIFY_SOCKET."""

    def __init__(self, abstract: bool = False):
        self.dir = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # short: sun_path holds 108 bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"organizer-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, BlockingIOError):
                return self.messages
            self.messages += data.decode().split("\n")

    def has(self, prefix: str) -> bool:
        return any(m.startswith(prefix) for m in self.poll())

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _small_library(tmp_path: Path) -> tuple[Path, Path, Path]:
    watch, output = tmp_path / "photos", tmp_path / "sorted"
    shutil.copytree(DEV / PERSON, watch / PERSON)
    cfg = tmp_path / "config.toml"
    cfg.write_text("[service]\nsettle_seconds = 0.3\nrescan_interval = 0\nworkers = 2\n")
    return watch, output, cfg


def _notify_run(cmd: list[str], sock: NotifySocket, output: Path, watch: Path, env: dict | None = None,
                preexec_fn=None) -> tuple[int, str]:
    env = {**(env or os.environ), "NOTIFY_SOCKET": sock.address}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=preexec_fn)
    try:
        wait_for(lambda: sock.has("READY=1") or proc.poll() is not None, 120, "READY=1")
        assert proc.poll() is None, proc.stderr.read()
        photos = sorted((watch / PERSON).iterdir())
        wait_for(lambda: all(folders_holding(output, p) for p in photos) and sock.has("STATUS=9 photos"), 120,
                 "the photos to be sorted and reported in STATUS=")
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: sock.has("STOPPING=1"), 10, "STOPPING=1")
    return proc.returncode, err


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_status_stopping(tmp_path, abstract):
    watch, output, cfg = _small_library(tmp_path)
    sock = NotifySocket(abstract)
    try:
        code, err = _notify_run(
            organizer_cmd("run", "--watch", str(watch), "--output", str(output), "--config", str(cfg)),
            sock, output, watch)
    finally:
        sock.close()
    assert code == 0, err[-3000:]
    msgs = [m for m in sock.messages if m]
    ready, stopping = msgs.index("READY=1"), msgs.index("STOPPING=1")
    statuses = [m for m in msgs if m.startswith("STATUS=")]
    assert ready < stopping and statuses
    assert any(re.fullmatch(r"STATUS=9 photos, 1 people, \d+ doubtful, 0 failed, 0 waiting", m) for m in statuses), statuses
    # under systemd the log lines carry journald priorities
    assert not any(m.startswith(("WATCHDOG", "ERRNO")) for m in msgs)


def test_journal_priorities_when_run_by_systemd(tmp_path):
    watch, output, cfg = _small_library(tmp_path)
    (watch / "broken.jpg").write_bytes(b"not a photo")
    proc = run_organizer("scan", "--watch", str(watch), "--output", str(output),
                         env={**os.environ, "INVOCATION_ID": "0123456789abcdef"})
    lines = proc.stderr.splitlines()
    assert lines and all(re.match(r"<[0-7]>organizer\.", l) for l in lines), lines[:5]
    assert any(l.startswith("<4>") and "broken.jpg" in l for l in lines)


# ---------------------------------------------------------------------------------------------
# the sandbox: W^X memory, and an emulation of the system unit's mounts and network
# ---------------------------------------------------------------------------------------------

PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 1


def _deny_write_execute() -> None:
    """preexec_fn: what MemoryDenyWriteExecute=yes does, via the kernel's own switch (Linux 6.3+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_MDWE")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _mdwe_works() -> bool:
    probe = "import mmap\ntry:\n mmap.mmap(-1, 4096, prot=7)\nexcept PermissionError:\n print('refused')"
    try:
        proc = subprocess.run([sys.executable, "-c", probe], preexec_fn=_deny_write_execute, capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.stdout.strip() == "refused"


def test_works_without_writable_executable_memory(tmp_path):
    """MemoryDenyWriteExecute=yes is in both units: numpy, dlib, PIL and SQLite must not need
    memory that is writable and executable (some JITs and libffi closures do)."""
    if not _mdwe_works():
        pytest.skip("the kernel cannot refuse W^X memory for a process (PR_SET_MDWE needs Linux 6.3)")
    watch, output, _ = _small_library(tmp_path)
    originals = tree_hashes(watch)
    run_organizer("scan", "--watch", str(watch), "--output", str(output), preexec_fn=_deny_write_execute)
    photos = sorted((watch / PERSON).iterdir())
    assert len({frozenset(folders_holding(output, p)) for p in photos}) == 1 and folders_holding(output, photos[0])
    assert tree_hashes(watch) == originals


SANDBOX = textwrap.dedent('''
    """Runs a command the way the system unit's sandbox would (inside `unshare --mount --net`)."""
    import ctypes, os, subprocess, sys
    rw, private_tmp = sys.argv[1].split(":"), sys.argv[2]
    cmd = sys.argv[3:]
    def sh(*args):
        subprocess.run(args, check=True)
    sh("mount", "--make-rprivate", "/")
    for d in rw:                                   # ReadWritePaths=
        sh("mount", "--bind", d, d)
    sh("mount", "-t", "tmpfs", "tmpfs", private_tmp)  # PrivateTmp=yes (a fresh /tmp, here as TMPDIR)
    os.environ["TMPDIR"] = private_tmp
    sh("mount", "-o", "remount,bind,ro", "/")      # ProtectSystem=strict (the photos too)
    sh("mount", "-t", "proc", "-o", "hidepid=invisible,subset=pid", "proc", "/proc")  # ProtectProc, ProcSubset
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(65, 1, 0, 0, 0) == 0         # MemoryDenyWriteExecute=yes
    assert libc.prctl(38, 1, 0, 0, 0) == 0         # NoNewPrivileges=yes
    for cap in range(64):                          # CapabilityBoundingSet= (empty)
        libc.prctl(24, cap, 0, 0, 0)
    os.execvp(cmd[0], cmd)
''')


def test_service_works_inside_the_system_units_sandbox(tmp_path):
    """The system unit's confinement, emulated: read-only file system except the output and the
    store folder (so the photos are read-only even to root), a private temporary folder (where the
    encoders' fork server makes its socket), /proc reduced to processes, no network namespace
    peers, no W^X memory, no capabilities. The service must start, talk
    sd_notify through PrivateNetwork, sort the photos (hard links cross mounts: it falls back to
    symlinks, with one warning), and stop cleanly."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to emulate the unit's namespaces")
    probe = subprocess.run([unshare, "--mount", "--net", "mount", "-o", "remount,bind,ro", "/"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create mount and network namespaces here: {probe.stderr.decode().strip()}")
    if not _mdwe_works():
        pytest.skip("the kernel cannot refuse W^X memory (PR_SET_MDWE needs Linux 6.3)")
    watch, output, cfg = _small_library(tmp_path)
    db_dir = tmp_path / "state"
    output.mkdir()
    db_dir.mkdir()
    helper = tmp_path / "sandbox.py"
    helper.write_text(SANDBOX)
    originals = tree_hashes(watch)
    # short: a socket's path must fit in ~100 characters, and tmp_path's may not leave room
    private_tmp = Path(tempfile.mkdtemp(prefix="ptmp-"))
    cmd = [unshare, "--mount", "--net", sys.executable, str(helper), f"{output}:{db_dir}", str(private_tmp),
           *organizer_cmd("run", "--watch", str(watch), "--output", str(output), "--db",
                          str(db_dir / "organizer.db"), "--config", str(cfg))]
    sock = NotifySocket()
    try:
        code, err = _notify_run(cmd, sock, output, watch, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        sock.close()
        private_tmp.rmdir()
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    assert "cannot start a fork server" not in err  # the encoders were forked, models shared
    links = [p for p in output.rglob("*.jpg") if p.name not in ("representative.jpg", "montage.jpg")
             and p.parent.name != "faces"]
    assert links and all(p.is_symlink() for p in links)
    assert err.count("cannot hard-link") == 1, "the fallback should be reported once, not per photo"
    assert tree_hashes(watch) == originals
