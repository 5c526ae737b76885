"""Reading a file an operator names: only a regular file, and never more than a size limit."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NamedTuple

_KIND_NAMES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class FileRefused(Exception):
    """Why a file was not read, worded to follow "cannot read PATH: "."""


class RegularFile(NamedTuple):
    """A regular file's content and the mode it had when it was read."""

    content: bytes
    mode: int


def read_regular_file(path: str | Path, limit: int) -> RegularFile:
    """Read `path` if it is a regular file of at most `limit` bytes; raise FileRefused if not."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer. The type check is made on the
        # opened descriptor, so the file cannot be swapped between the check and the read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        raise FileRefused(error.strerror or type(error).__name__) from None
    except ValueError:  # a NUL byte, or a character the file system encoding cannot hold
        raise FileRefused("not a valid file name") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused(f"it is {_kind(mode)}, not a regular file")
        with open(fd, "rb", closefd=False) as handle:
            content = handle.read(limit + 1)
    except OSError as error:
        raise FileRefused(error.strerror or type(error).__name__) from None
    finally:
        os.close(fd)
    if len(content) > limit:
        raise FileRefused(f"it is larger than {format_size(limit)}")
    return RegularFile(content, mode)


def format_size(size: int) -> str:
    """A byte count as people write limits: 16 MiB, 64 KiB, 100 bytes."""
    for unit, name in ((1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def _kind(mode: int) -> str:
    return next((name for is_kind, name in _KIND_NAMES if is_kind(mode)), "a special file")
