"""Ending a connection from under gunicorn, quietly."""

from __future__ import annotations

import _socket
import socket
from typing import Any


def shut_down(sock: Any, how: int = socket.SHUT_RDWR) -> None:
    """shutdown(2) the connection: its reader sees EOF and gunicorn closes it quietly.

    Done on a plain socket object over the same fd, because gevent's own shutdown()
    also fails the blocked reader with EBADF, which gunicorn logs as a socket error.
    With SHUT_RD the answer can still be written; only further reading ends.
    """
    fd = sock.fileno()
    if fd < 0:
        return  # already closed
    raw = _socket.socket(fileno=fd)
    try:
        raw.shutdown(how)
    except OSError:
        pass  # the peer is already gone
    finally:
        raw.detach()
