"""Temp files of atomic writes: one naming scheme, the set this process has open, and removal of stale ones.

Every file sdjax writes (PNGs, safetensors, JSON) is written to a hidden temp file beside its final path and
renamed over it when complete, so a final path is never partial. What can be left behind is a temp file:
- an interrupted process (Ctrl-C, SIGTERM) removes its own: `remove_live()` runs before it exits;
- a killed one (SIGKILL, power loss) can't, so every write first removes the stale temp files in its folder
  (`remove_stale`): those whose writer process is gone.

A temp name records its writer: ``.<name>.sdjax-<pid>-<host>-<random>.tmp`` (host: 8 hex digits of a hash of
the host name, so a folder shared between machines never loses a live file of another host to a pid check
made here; such files are removed only when older than `FOREIGN_MAX_AGE_S`).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import secrets
import socket
import threading
import time

FOREIGN_MAX_AGE_S = 24 * 3600  # temp files of other hosts (or of older sdjax versions): removed when this old
_TEMP = re.compile(r"^\..+\.sdjax-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{12}\.tmp$")
_LEGACY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # sdjax <= 0.1.0's names: no writer recorded
_live: set[str] = set()
_lock = threading.Lock()


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def create(path: str | os.PathLike) -> tuple[int, str]:
    """A new temp file beside `path` (O_EXCL, permissions of a plain new file: 0666 & ~umask), registered as
    live until `release`: (fd open for writing, temp path)."""
    path = pathlib.Path(path)
    prefix = f".{path.name}.sdjax-{os.getpid()}-{_host()}-"
    while True:
        tmp = str(path.with_name(f"{prefix}{secrets.token_hex(6)}.tmp"))
        with _lock:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            except FileExistsError:
                continue
            _live.add(tmp)
        return fd, tmp


def release(tmp: str) -> None:
    """Forgets a temp file and removes it if it is still there (it was renamed on success)."""
    with _lock:
        _live.discard(tmp)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def remove_live() -> None:
    """Removes every temp file this process has open (called just before an interrupted process exits)."""
    with _lock:
        for tmp in list(_live):
            try:
                os.unlink(tmp)
            except OSError:
                pass
        _live.clear()


def remove_stale(folder: str | os.PathLike, now: float | None = None) -> list[pathlib.Path]:
    """Removes the temp files in `folder` that no running writer owns; returns them.

    Stale: written on this host by a process that no longer exists, or (other hosts, older names) older than
    FOREIGN_MAX_AGE_S. A pid reused since is taken as alive: its file stays until it is that old."""
    folder = pathlib.Path(folder)
    now = time.time() if now is None else now
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    host, removed = _host(), []
    for name in names:
        if not name.endswith(".tmp"):
            continue
        m = _TEMP.match(name)
        if m is None and not _LEGACY.match(name):
            continue  # not ours
        path = folder / name
        with _lock:
            if str(path) in _live:
                continue
        try:
            if m is not None and m["host"] == host:
                stale = not _alive(int(m["pid"]))
            else:
                stale = now - path.stat().st_mtime > FOREIGN_MAX_AGE_S
            if stale:
                path.unlink()
                removed.append(path)
        except OSError:  # gone meanwhile (another process cleaned up), or not ours to remove
            continue
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
