"""The errors the local stack raises."""

from __future__ import annotations

INSTALL_HINT = "run deploy/local/install-packages (as root or with passwordless sudo)"


class LocalStackError(Exception):
    """A private RabbitMQ node or Redis server could not be started, checked or stopped.

    The message is meant for a person: it says what failed and what to do or where to look
    (a log file path and its last lines), never the content of data files.
    """


class NotInstalledError(LocalStackError):
    """A server's program is not installed; tests skip (or fail under CI) on this one."""
