"""The run folder: one writer at a time, and left as it was found when a run fails before its first step.

``RunFolder(path).open()`` creates the folder if needed (a path that is a file, or that cannot
be created or written, is a ``WorkdirError`` naming it) and takes an exclusive ``fcntl.flock``
on ``path/.lock``. The kernel releases the lock when the holder exits in any way, ``kill -9``
included, so a stale lock never blocks a restart; a second run on the same folder is refused
with the holder's host and PID, which the holder writes into the lock file. Readers
(``moe-eval``, ``moe-generate``) take no lock. In a multi-process job only process 0 locks.

``abandon()`` removes what this run added to the folder (and the folder itself if the run
created it), for a run that stops before its first step: the folder is then as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket

from train.errors import WorkdirError

LOCK_FILE = ".lock"


class RunFolder:
    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._fd: int | None = None
        self._existed = False
        self._before: set[str] = set()

    # ---------------------------------------------------------------- taking the folder
    def open(self) -> RunFolder:
        """Create (if needed), check that it can be written, and lock; see the module docstring."""
        where = f"--workdir={self.path}"
        if self.path.exists() and not self.path.is_dir():
            raise WorkdirError(f"{where}: is a file, not a folder")
        self._existed = self.path.is_dir()
        try:
            self._before = set(os.listdir(self.path)) if self._existed else set()
            self.path.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self._undo_creation()
            raise WorkdirError(f"{where}: cannot create or write it ({_reason(e)})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"{where}: cannot lock {LOCK_FILE} there ({_reason(e)})") from None
            raise WorkdirError(
                f"{where}: in use by another run ({holder}); one run writes a workdir at a time: wait for it, "
                "stop it, or use another --workdir"
            ) from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as e:
            self.release()
            self._undo_creation()
            raise WorkdirError(f"{where}: cannot write there ({_reason(e)})") from None
        return self

    def _holder(self) -> str:
        try:
            info = json.loads(os.pread(self._fd, 4096, 0).decode() or "{}")
            return f"host {info['host']}, PID {info['pid']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        """Give the lock back (the lock file stays; it is free once no process holds it)."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    # ---------------------------------------------------------------- leaving it as found
    def abandon(self) -> None:
        """Release the lock and remove what this run added; the folder itself if the run created it."""
        self.release()
        try:
            added = set(os.listdir(self.path)) - self._before
        except OSError:
            return
        for name in added:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        self._undo_creation()

    def _undo_creation(self) -> None:
        if not self._existed:
            try:
                self.path.rmdir()  # only when empty: never removes anything it did not create
            except OSError:
                pass


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def require_new_folder(path: pathlib.Path, flag: str) -> None:
    """``WorkdirError`` unless ``path`` is absent or an empty folder (an output that must not mix with old files)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise WorkdirError(f"{flag}={path}: exists and is not empty; write into a new folder")


@contextlib.contextmanager
def staged_folder(path: pathlib.Path, flag: str):
    """A temporary sibling folder to write ``path``'s contents into: renamed to ``path`` when the block
    completes, removed when it fails, so ``path`` never exists half-written."""
    require_new_folder(path, flag)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
