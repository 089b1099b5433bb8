"""Where the encode stage runs: local encoder processes, or a dask.distributed cluster.

:func:`make_encoder` picks one from the settings. Both answer the same calls (``map``,
``reencode``, ``prefetch``, ``start``, ``check``, ``close``); the store and the clustering stay in the calling
process (the coordinator), which is the only writer.

On a cluster each photo is read where it is when the worker sees the same file at the same path
(a shared folder: NFS, SMB, a bind mount), and sent as bytes by the coordinator otherwise; the
worker checks by path and size, so a mixed cluster works too. dask is an optional extra
(``uv sync --extra dask``); nothing here imports it unless the dask executor is chosen.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .ingest import VANISHED
from .encode import Box, DetectionSettings, EncoderPool, EncoderUnavailable, PhotoResult, analyze_photo, reencode_photo

log = logging.getLogger(__name__)

# dlib's networks keep per-object buffers and must not run in two threads of one process at once:
# a dask worker started with more than one thread runs one photo at a time.
_dlib_lock = threading.Lock()
_NOT_HERE = "not-here"  # a worker's answer when it cannot see the photo: the coordinator sends its bytes


def make_encoder(settings: DetectionSettings, workers: int, executor: str = "local", scheduler: str | None = None):
    """The encoder for ``executor`` ("local": a process pool; "dask": the cluster at ``scheduler``,
    or a LocalCluster of ``workers`` processes when none is given)."""
    if executor == "dask":
        return DaskEncoder(settings, scheduler, workers)
    return EncoderPool(settings, workers)


def encoder_for(settings, workers: int | None = None):
    """The encoder a :class:`~organizer.config.Settings` asks for (``service.workers`` processes,
    or ``workers``; 0 or unset: one per core)."""
    sv = settings.service
    n = sv.workers if workers is None else workers
    return make_encoder(settings.detection_settings(), n or (os.cpu_count() or 1), sv.executor, sv.scheduler)


def _visible(path: str, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False


def _size_here(path: Path) -> int:
    """The photo's size as the coordinator sees it (-1: unreadable here too; a worker then gives the reason)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _remote_analyze(path: str, size: int, settings: DetectionSettings, data: bytes | None):
    """Worker side: the photo's PhotoResult, or _NOT_HERE when it is not readable here."""
    if data is None and not _visible(path, size):
        return _NOT_HERE
    with _dlib_lock:
        return analyze_photo(Path(path), settings, data)


def _remote_reencode(path: str, size: int, boxes: list[Box], settings: DetectionSettings, data: bytes | None):
    if data is None and not _visible(path, size):
        return _NOT_HERE
    with _dlib_lock:
        return reencode_photo(Path(path), boxes, settings, data)


class DaskEncoder:
    """The encode stage on a dask.distributed cluster (the scheduler at ``scheduler``, or a local one)."""

    def __init__(self, settings: DetectionSettings, scheduler: str | None = None, workers: int = 0):
        try:
            from distributed import Client, LocalCluster  # noqa: PLC0415 - the optional extra
        except ImportError:
            raise EncoderUnavailable("the dask executor needs the dask extra: run `uv sync --extra dask`") from None
        self._dask = Client, LocalCluster
        self.settings = settings
        self.scheduler = scheduler
        self.workers = workers
        self._cluster = None
        self._client = None

    def start(self, wait: bool = False) -> None:
        """Connect to the scheduler (or start the local cluster) now rather than with the first
        photo (``wait``: and wait for the workers to be there)."""
        client = self._connect()
        if wait:
            client.wait_for_workers(1, timeout=120)

    def check(self) -> None:
        """Connect (raises EncoderUnavailable if the scheduler cannot be reached); the workers are
        not waited for, as a cluster's may join later."""
        self._connect()

    def _connect(self):
        if self._client is None:
            Client, LocalCluster = self._dask
            logging.getLogger("distributed").setLevel(logging.WARNING)
            if self.scheduler:
                try:
                    self._client = Client(self.scheduler, timeout="30s")
                except OSError as exc:
                    raise EncoderUnavailable(f"cannot reach the dask scheduler at {self.scheduler}: {exc}") from None
                log.info("encoding on the dask cluster at %s", self.scheduler)
            else:
                # one thread per worker process (see _dlib_lock); loopback only, no dashboard
                self._cluster = LocalCluster(n_workers=self.workers or os.cpu_count() or 1, threads_per_worker=1,
                                             processes=True, host="127.0.0.1", dashboard_address=None)
                self._client = Client(self._cluster)
        return self._client

    def prefetch(self, paths: Iterable[Path]) -> None:
        """Accepted for the local pool's interface; the cluster works on what map() submits."""

    def map(self, paths: Iterable[Path]) -> Iterator[PhotoResult]:
        """Encode ``paths``; yields one result per path, in completion order."""
        for _, result in self._run(_remote_analyze, [(Path(p), ()) for p in paths],
                                   lambda path, msg: PhotoResult(path=path, error=msg)):
            yield result

    def reencode(self, jobs: list[tuple[Path, list[Box]]]) -> Iterator[tuple[Path, list[np.ndarray] | None, str | None]]:
        for path, (encodings, error) in self._run(_remote_reencode, [(Path(p), (b,)) for p, b in jobs],
                                                  lambda path, msg: (None, msg)):
            yield path, encodings, error

    def _run(self, task, jobs: list[tuple[Path, tuple]], failed) -> Iterator[tuple[Path, object]]:
        """``task(path, size, *args, settings, data)`` per job on the cluster; a job whose photo a
        worker cannot see is submitted again with the photo's bytes."""
        from distributed import as_completed  # noqa: PLC0415

        def submit(path: Path, args: tuple, data: bytes | None = None):
            return client.submit(task, str(path), size_of[path], *args, self.settings, data, pure=False)

        client = self._connect()
        size_of, args_of, futures = {}, {}, {}
        for path, args in jobs:
            size_of[path] = _size_here(path)
            args_of[path] = args
        for path, args in jobs:
            futures[submit(path, args)] = path
        pending = as_completed(list(futures))
        try:
            for fut in pending:
                path = futures.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:  # noqa: BLE001 - a worker lost or a bug must not stop the service
                    yield path, failed(path, f"internal error while encoding on the cluster: {exc!r}")
                    continue
                if isinstance(result, str) and result == _NOT_HERE:
                    try:
                        data = path.read_bytes()
                    except FileNotFoundError:
                        yield path, failed(path, VANISHED)
                        continue
                    except OSError as exc:
                        yield path, failed(path, f"cannot read file: {exc.strerror or exc}")
                        continue
                    again = submit(path, args_of[path], data)
                    futures[again] = path
                    pending.add(again)
                    continue
                yield path, result
        finally:
            for fut in futures:
                fut.cancel()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
