"""One training run per output folder: ``OUTPUT/run.lock`` holds the pid (host, start time) of the run.

The main process creates the lock with ``O_EXCL`` before it reads or writes anything else in the
folder and removes it when the run ends, however it ends. A second trainer into the same folder is
refused in one line naming the holder; a lock left by a process that no longer runs (killed, the
machine rebooted, the pid reused by another program) is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

__all__ = ["LOCK_FILE", "OutputLockedError", "acquire_lock", "release_lock", "lock_text"]

LOCK_FILE = "run.lock"
logger = logging.getLogger("genmod.train")


class OutputLockedError(ValueError):
    """Another live run holds the output folder."""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22); "" when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def lock_text(pid: int) -> str:
    return f"{pid} {socket.gethostname()} {_start_time(pid) or '-'}\n"


def _holder_alive(text: str) -> bool:
    """Whether the process a lock names still runs (a lock from another host is assumed live)."""
    parts = text.split()
    if len(parts) != 3 or not parts[0].isdigit():
        return False  # empty or cut: written by a process killed while creating it
    pid, host, started = int(parts[0]), parts[1], parts[2]
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started == "-" or _start_time(pid) in ("", started)


def _try_create(path: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(lock_text(os.getpid()))
    return True


def acquire_lock(output_dir: str) -> str:
    """Create ``OUTPUT/run.lock``; take over a stale one; raise :class:`OutputLockedError` when a run holds it."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    for _ in range(2):
        if _try_create(path):
            return path
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            continue  # released meanwhile
        if _holder_alive(text):
            pid, host = (text.split() + ["?", "?"])[:2]
            raise OutputLockedError(f"{output_dir} is in use by another training run (pid {pid} on {host}, {path}); "
                                    "choose another --output_dir or stop that run")
        logger.warning("%s: taking over the lock of a run that no longer runs (%s)", path, text.strip() or "empty")
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    raise OutputLockedError(f"{output_dir} is in use by another training run ({path} was just taken)")


def release_lock(path: str | None) -> None:
    """Remove the lock if this process holds it (None: nothing was taken)."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        with open(path) as f:
            mine = f.read().split()[:1] == [str(os.getpid())]
        if mine:
            os.remove(path)

