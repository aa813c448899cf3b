"""Where decision records go: a file rotated by size, or a stream (stdout).

Sinks are called only from the writer thread, one batch of lines at a time, and may block
(a slow disk or a full pipe): the queue in front of them absorbs it, never a Check.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, Protocol

from ..errors import DecisionLogError
from .settings import STDOUT, DecisionLogSettings


class Sink(Protocol):
    """Receives finished lines (without their newline); raising loses that batch only."""

    def write(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...


class StreamSink:
    """Lines to a text stream, flushed after every batch."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, lines: list[str]) -> None:
        self.stream.write("".join(f"{line}\n" for line in lines))
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class FileSink:
    """Appends lines to ``path``; with ``max_bytes``, rotates before a line would make the
    file larger: ``path`` → ``path.1`` → ... → ``path.<backups>`` (the oldest is deleted;
    with 0 backups the file starts over). A line longer than ``max_bytes`` gets a file of
    its own. If the file is moved or deleted behind extauthz's back (an external logrotate),
    it is reopened under its name at the next batch; if it is truncated (``copytruncate``),
    writing goes on at its new end. A new file is created readable by its owner only: records
    hold request details.
    """

    def __init__(self, path: Path, *, max_bytes: int = 0, backups: int = 0) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file = self._open()

    def _open(self) -> IO[bytes]:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            f = os.fdopen(fd, "ab")
        except OSError as exc:
            raise DecisionLogError(
                f"--decision-log {self.path}: cannot open: {exc.strerror or exc}"
            ) from exc
        st = os.fstat(f.fileno())
        self._size = st.st_size
        self._inode = (st.st_dev, st.st_ino)
        return f

    def write(self, lines: list[str]) -> None:
        self._reopen_if_moved()
        chunk: list[bytes] = []
        for line in lines:
            data = f"{line}\n".encode()
            if self.max_bytes and self._size and self._size + len(data) > self.max_bytes:
                self._file.write(b"".join(chunk))
                chunk.clear()
                self._rotate()
            chunk.append(data)
            self._size += len(data)
        self._file.write(b"".join(chunk))
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._file = self._open()

    def _reopen_if_moved(self) -> None:
        """Also recovers from a rotation that failed halfway (a closed file)."""
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self._inode
            self._size = min(self._size, st.st_size)  # truncated by someone else
        except FileNotFoundError:
            moved = True
        if moved or self._file.closed:
            self._file.close()
            self._file = self._open()

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def open_sink(settings: DecisionLogSettings) -> Sink:
    """The sink of ``--decision-log``; the file is opened now, so a bad path stops startup."""
    if settings.path == STDOUT:
        return StreamSink(sys.stdout)
    path = Path(settings.path)
    if path.is_dir():
        raise DecisionLogError(f"--decision-log {path}: is a directory; expected a file path")
    return FileSink(path, max_bytes=settings.max_bytes, backups=settings.backups)
