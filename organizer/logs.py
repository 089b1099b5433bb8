"""Logging to stderr: syslog priority prefixes under systemd (journald reads them), timestamps otherwise."""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def printable(text: str | os.PathLike) -> str:
    """Text (a path, or a message quoting one) as it can be logged, shown or stored: the bytes of a
    file name that is not UTF-8, which Python decodes to lone surrogates, appear as \\xNN."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


class Formatter(logging.Formatter):
    """Log lines through :func:`printable` (as `organizer status` shows names)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class JournalFormatter(Formatter):
    """``<6>organizer.pipeline: message``: journald turns the prefix into the entry's priority."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("organizer")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
