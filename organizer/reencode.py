"""Re-encoding: brings a store's faces to the current encoder, once, before any clustering."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from .encode import EncoderPool, encoder_id
from .store import ENCODER, REENCODING, Store

log = logging.getLogger(__name__)

# Photos re-encoded per commit when a store is upgraded to another encoder (a crash loses at most these).
REENCODE_CHUNK = 256


class EncodingUpgrade:
    """Re-encodes the stored faces when another encoder made them (an older version, or other
    encoding settings), so that every distance compares like with like."""

    def __init__(self, store: Store, encoder: EncoderPool, watch: Path | None, on_done: Callable[[], None]):
        self.store = store
        self.encoder = encoder
        self.watch = watch
        self.on_done = on_done  # called once the faces changed, before the upgrade is recorded
        self._current = False  # the store's faces are known to be the current encoder's

    def run(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Upgrade the store if needed. Returns False if ``stop()`` interrupted it (it resumes
        where it stopped at the next call).

        Faces keep their ids, boxes and people (the clustering is then redone, ids matched by
        overlap as usual); only the 128-d vectors change. Work is committed every
        REENCODE_CHUNK photos, so an interruption loses at most one chunk. A photo that cannot be
        read now is forgotten, and a later scan encodes it afresh if it is still there. Runs
        once: the store records which encoder made its faces.
        """
        if self._current:
            return True
        want = encoder_id(self.encoder.settings)
        have = self.store.get_meta(ENCODER)
        if have != want:
            if not self._reencode(have, want, stop):
                return False
            self.on_done()  # before the upgrade is recorded: a crash in between redoes only this
            self.store.set_meta(ENCODER, want)
            self.store.delete_meta(REENCODING)
        self._current = True
        return True

    def _reencode(self, have: str | None, want: str, stop: Callable[[], bool]) -> bool:
        images = self.store.faces_by_image()  # in sha256 order: the order progress is kept in
        saved = json.loads(self.store.get_meta(REENCODING) or "{}")
        after = saved.get("after", "") if saved.get("encoder") == want else ""
        todo = [img for img in images if img[0] > after and img[1]]
        if not todo:
            return True
        log.warning("the store's faces were encoded by %s; re-encoding them with %s (once; %d of %d photos "
                    "to go)", have or "an earlier version", want, len(todo), len(images))
        t0, n_done = time.monotonic(), 0
        for start in range(0, len(todo), REENCODE_CHUNK):
            if stop():
                log.info("re-encoding interrupted after %d photos; it resumes at the next start", start)
                return False
            part = todo[start : start + REENCODE_CHUNK]
            ids_of = {paths[0]: ids for _, paths, ids, _ in part}
            done, lost = {}, []
            for path, encs, error in self.encoder.reencode([(Path(paths[0]), boxes) for _, paths, _, boxes in part]):
                if encs is None:
                    log.warning("cannot re-encode %s (%s): forgotten, a later scan encodes it again", path, error)
                    lost.append(str(path))
                else:
                    done.update(zip(ids_of[str(path)], encs))
            if not done:
                # nothing readable at all: an unmounted disk, not photos to forget
                raise FileNotFoundError(f"cannot read any photo to re-encode its faces (is {self.watch} "
                                        "mounted?); nothing more was changed, it is tried again at the next scan")
            self.store.set_encodings(done, progress=json.dumps({"encoder": want, "after": part[-1][0]}))
            if lost:
                self.store.remove_photos(p for _, paths, _, _ in part if paths[0] in lost for p in paths)
            n_done += len(done)
        log.info("re-encoded %d faces in %.1f s", n_done, time.monotonic() - t0)
        return True
