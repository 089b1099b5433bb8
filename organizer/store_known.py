"""Reference faces: the store's table of the known people's reference photos, encoded
(:mod:`organizer.known`). Part of the store (the only code that writes SQL, see store.py), over
the :class:`~organizer.store.Store`'s own connection and writer.
"""

from __future__ import annotations

import numpy as np

from .store import Store


class ReferenceFaces:
    """One reference face per reference photo, by the photo's sha256 and the encoder that made it
    (``reference_faces``): a rescan of the reference folder encodes only photos it has not seen."""

    def __init__(self, store: Store):
        self.db = store.db

    def get(self, sha256: str, encoder: str) -> tuple[int, np.ndarray | None] | None:
        """(faces found in the photo, the reference face's encoding or None), or None if unknown."""
        row = self.db.execute("select faces, encoding from reference_faces where sha256=? and encoder=?",
                              [sha256, encoder]).fetchone()
        if row is None:
            return None
        return row[0], None if row[1] is None else np.frombuffer(row[1], dtype=np.float64).copy()

    def put(self, sha256: str, encoder: str, faces: int, encoding: np.ndarray | None) -> None:
        blob = None if encoding is None else np.asarray(encoding, dtype=np.float64).tobytes()
        self.db.execute("insert or replace into reference_faces (sha256, encoder, faces, encoding) values (?, ?, ?, ?)",
                        [sha256, encoder, faces, blob])
