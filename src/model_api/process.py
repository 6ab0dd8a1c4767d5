"""Which process runs a call: ``host:pid:nonce`` in ``calls.worker``.

The runtime owns one :class:`ProcessIdentity`; the reconciler reads the
string back to tell a dead process's orphans from another live process's work.
"""

from __future__ import annotations

import os
import socket
import uuid


class ProcessIdentity:
    """This process's id, made anew after a fork (gunicorn, Celery prefork) so
    children differ from their parent and from each other."""

    def __init__(self) -> None:
        self._pid = -1
        self._id = ""

    def __call__(self) -> str:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._id = f"{socket.gethostname()}:{self._pid}:{uuid.uuid4().hex[:8]}"
        return self._id


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a killed worker's pool children may linger as zombies when nobody reaps
    # them (PID 1 in a container): they answer signal 0 but run nothing
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def dead_here(worker: str) -> bool | None:
    """True if ``worker`` names a process of this host that is gone (never this
    one), False if it is alive, None if it belongs to another host (unknowable)."""
    host, pid, _nonce = (worker.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return int(pid) != os.getpid() and not pid_alive(int(pid))
