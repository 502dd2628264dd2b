"""Exclusive locks between processes that share a workdir, released by the kernel when their holder dies.

Two runs may share a workdir: two ``prefect deployment run``\\ s, a second terminal, a benchmark with several jobs,
two nodes started with the same ``--rank``. Every write into a shared folder happens under one of these locks:

* a **shard lock** (``<stage folder>/_locks/part-NNNNN.lock``) while a shard is processed and committed — a process
  that finds a shard locked moves on to the next one and comes back to it at the end, so several processes share
  a stage's shards instead of doing them twice (grain.shards);
* a **folder lock** (``<folder>/_locks/stage.lock``) around a stage folder's header and totals;
* an **entry lock** (``<parent>/_locks/<name>.lock``) around the whole of a ``train`` or ``evaluate`` run, whose
  folders are not split into shards (``train/_locks/<fingerprint>.lock``), and around one file that several
  folders share (an embedding cache entry, a contact sheet, a report).

The lock is ``fcntl.flock`` on a lock file that stays in place (removing a lock file while others may open it
would let two processes lock two different files of the same name). The kernel drops a flock when the last file
descriptor of its holder closes, so a SIGKILL — or a machine's reboot — never leaves a stale lock behind: there is
nothing to clean up and no timeout to tune. While it holds a lock a process writes who it is into the lock file
(pid, host, command, since when), so a process that has to wait can say whom it waits for.

flock works between processes on one machine and, on Linux, on NFSv4 and most cluster file systems (Lustre with
``flock`` mounted, GPFS, CephFS); on a file system without it, ``flock`` raises and the message says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_DIR = "_locks"
FOLDER_LOCK = "stage.lock"


class LockBusyError(RuntimeError):
    """A lock another process holds, where this process may not wait (the message names the holder)."""


class FileLock:
    """An exclusive ``flock`` on ``path`` (created when missing). ``what`` names the locked thing in messages.

    Not re-entrant: a second FileLock on the same path in the same process conflicts with the first, as it would
    in another process. File descriptors are opened close-on-exec, so processes a holder starts (Ray workers, a
    vLLM server) never inherit its locks.
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = True, announce: bool = True) -> bool:
        """Take the lock; ``wait=False``: return False at once when another process holds it. When it has to wait,
        says so once (a warning naming the holder), then blocks until the holder releases it or dies."""
        if self._fd is not None:
            raise RuntimeError(f"{self.what}: lock {self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    return False
                if announce:
                    log.warning("%s is being written by %s; waiting for it to finish (or die)", self.what, self.holder())
                t0 = time.monotonic()
                fcntl.flock(fd, fcntl.LOCK_EX)
                log.info("%s: got the lock after %.1f s", self.what, time.monotonic() - t0)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(exc.errno, f"cannot lock {self.path}: this file system does not support flock "
                                         f"({exc.strerror}); put the workdir on one that does") from exc
            raise
        self._fd = fd
        self._write_holder()
        return True

    def _write_holder(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        data = json.dumps(info).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError:  # a full disk must not stop the lock from working; the holder is then unnamed
            log.debug("could not record the holder of %s", self.path, exc_info=True)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the flock

    def holder(self) -> str:
        """Who holds the lock, in words (from the lock file; "another process" when it does not say)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info.get("pid"):
            return "another process"
        return f"pid {info['pid']} on {info.get('host', '?')} (`{info.get('command', '?')}`, since {info.get('since', '?')})"

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a lock object dropped without release (an exception path): do not leak the fd
        with contextlib.suppress(Exception):
            self.release()


def folder_lock(folder: str | Path, what: str) -> FileLock:
    """The lock of a whole folder: ``<folder>/_locks/stage.lock``."""
    return FileLock(Path(folder) / LOCK_DIR / FOLDER_LOCK, what)


def entry_lock(path: str | Path, what: str) -> FileLock:
    """The lock of one file in a shared folder: ``<dir>/_locks/<name>.lock``."""
    path = Path(path)
    return FileLock(path.parent / LOCK_DIR / f"{path.name}.lock", what)


@contextlib.contextmanager
def exclusive(path: str | Path, what: str, *, wait: bool = True) -> Iterator[bool]:
    """Hold the entry lock of ``path`` (a file or a whole folder, e.g. a train run; the lock file sits beside it,
    so a run that fails before writing leaves no folder) for the block. Yields True when another process held it
    first and this one waited — ``path`` may now hold that process's finished output. ``wait=False``: raise
    LockBusyError naming the holder instead of waiting."""
    lock = entry_lock(path, what)
    waited = False
    if not lock.acquire(wait=False):
        if not wait:
            raise LockBusyError(f"{what} is being written by {lock.holder()}; wait for it to finish, or stop it")
        waited = True
        lock.acquire(wait=True)
    try:
        yield waited
    finally:
        lock.release()
