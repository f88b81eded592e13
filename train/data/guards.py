"""What ``moe-data prepare`` checks before it tokenizes: one writer per output, and no binary input.

One writer: ``output_lock`` takes an exclusive ``fcntl.flock`` on ``OUTPUT.partial/.lock`` (as a
run takes ``WORKDIR/.lock``, ``train.services.workdir``) and writes its host and PID there; a second
``moe-data prepare`` on the same output is refused in one line naming them. The kernel drops the
lock when its holder exits in any way, ``kill -9`` included; the file is removed before
``OUTPUT.partial`` becomes ``OUTPUT``.

Binary input: a file with a NUL byte in its first 8000 bytes (git's rule) or with more than 30% of
the first 64 KiB not decodable as UTF-8 is refused unless ``--allow_binary``; a file with some
undecodable bytes is named in a warning (they become U+FFFD, which the prepared index counts).
"""

from __future__ import annotations

import codecs
import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
from collections.abc import Sequence

from train.errors import DataError

LOCK_FILE = ".lock"
NUL_WINDOW = 8000  # git's rule: a NUL byte in the first 8000 bytes makes a file binary
SAMPLE_BYTES = 64 << 10
BINARY_SHARE = 0.30  # more than this share of the sample undecodable: binary


@contextlib.contextmanager
def output_lock(partial: pathlib.Path, where: str):
    """Hold ``partial/.lock`` (the folder is created if needed) for the block; ``DataError`` when
    another process holds it."""
    partial.mkdir(parents=True, exist_ok=True)
    fd = os.open(partial / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DataError(f"{where}: cannot lock {partial / LOCK_FILE} ({e.strerror or e})") from None
            raise DataError(f"{where}: another moe-data prepare is writing it ({_holder(fd)}); wait for it to "
                            "finish, or stop it and rerun this command to resume") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info['host']}, PID {info['pid']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _sniff(file: pathlib.Path) -> tuple[str | None, int]:
    """(why ``file`` looks binary or None, undecodable bytes in its first ``SAMPLE_BYTES``)."""
    with open(file, "rb") as f:
        head = f.read(SAMPLE_BYTES)
        whole = not f.read(1)
    if 0 in head[:NUL_WINDOW]:
        return f"a NUL byte at offset {head.index(0)}", 0
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(head, final=whole)
    bad = text.count("\ufffd") - head.count("\ufffd".encode())
    if head and bad > BINARY_SHARE * len(head):
        return f"{bad} of its first {len(head)} bytes are not UTF-8", bad
    return None, bad


def check_inputs(files: Sequence[pathlib.Path], allow_binary: bool, flag: str) -> list[str]:
    """Refuse binary files (``DataError`` naming the first) unless ``allow_binary``; the files with
    undecodable bytes, as warnings ("FILE: N undecodable bytes in its first 64 KiB")."""
    warnings = []
    for file in files:
        try:
            why, bad = _sniff(file)
        except OSError as e:
            raise DataError(f"{flag}: cannot read {file} ({e.strerror or e})") from e
        if why and not allow_binary:
            raise DataError(f"{flag}: {file} looks binary ({why}); remove it from the input, or pass "
                            "--allow_binary to tokenize it anyway (undecodable bytes become U+FFFD)")
        if why or bad:
            warnings.append(f"{file}: {why or f'{bad} undecodable bytes in its first {SAMPLE_BYTES >> 10} KiB'}")
    return warnings
