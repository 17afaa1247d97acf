"""Shards that arrive over the network: ``http(s)://`` URLs and ``pipe:COMMAND``, opened by
webdataset's own ``gopen`` (``curl -f -s -L URL`` for http(s), the shell for ``pipe:``).

A source (``data.shards``, ``data.eval_shards`` where it exists) names either

- a **shard folder**: an http(s) URL of the folder ``gwtn shards`` wrote (``index.json`` and
  the tars beside it, e.g. served as files), or a ``pipe:`` command with ``{name}`` where a file
  name goes (``pipe:aws s3 cp s3://bucket/imagenet/{name} -``). index.json is read through it,
  so splits, sample counts and everything the local reader promises (exact resume position,
  the validation carve-out, eval exactly once) hold as for a local folder; or
- a **brace pattern of tars**, as in webdataset (``https://host/train-{0000..0099}.tar``,
  ``pipe:gsutil cat gs://bucket/train-{0000..0099}.tar``): every tar is read once first to count
  its samples, as a local glob's headers are.

Tars are read as streams (``tarfile`` mode ``r|``), in order; a resume position is reached by
reading through the samples before it without decoding them, as locally.

Retry policy, for a stream that breaks mid-tar (the server closed the connection: curl exits
18 or 56; a ``pipe:`` command that exits non-zero): the same URL is opened again up to
:data:`RETRIES` times, waiting :data:`BACKOFF_S` × 2^k seconds before try k, and the bytes
already delivered are read and dropped, so the tar reader sees the same bytes as an unbroken
read. Each reopening is counted (``connection dropped, retried`` in the skip counts of the
stream, saved with its position and reported in stage.json) and logged. When the tries run out
the read fails with :class:`UnreachableData` (an ``OSError``: one line, exit 74), never a short
epoch. An HTTP error status (curl ``-f`` exits 22: 404, 403, …) is not retried: it is a wrong
source, :class:`DataSourceError` (one line, exit 2).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Iterator

import braceexpand

from .errors import DataSourceError

log = logging.getLogger("gwtn")

RETRIES = 3
BACKOFF_S = 1.0
RETRIED = "connection dropped, retried"
CURL_HTTP_ERROR = 22  # curl -f: the server answered with a status of 400 or more
CURL_MESSAGES = {6: "host name not resolved", 7: "could not connect", 18: "transfer cut short",
                 22: "HTTP error status", 28: "timed out", 52: "empty reply",
                 56: "connection broken"}


class UnreachableData(OSError):
    """A URL that could not be read whole within the retry policy."""


# Errors of a source rather than damage in a tar: the tar readers let them through.
NOT_DAMAGE = (DataSourceError, UnreachableData)


def is_url(source: object) -> bool:
    """Whether ``source`` is read over the network (http, https or ``pipe:``)."""
    return isinstance(source, str) and source.startswith(("http://", "https://", "pipe:"))


def is_folder(source: str) -> bool:
    """Whether a URL source names a shard folder (index.json beside the tars) rather than a
    pattern of tars: an http(s) URL whose last part is not a ``.tar``, a ``pipe:`` with
    ``{name}``."""
    if source.startswith("pipe:"):
        return "{name}" in source
    return not source.split("?")[0].rstrip("/").endswith(".tar")


def join(folder: str, name: str) -> str:
    """The URL of file ``name`` of the shard folder ``folder``."""
    if folder.startswith("pipe:"):
        return folder.replace("{name}", name)
    return f"{folder.rstrip('/')}/{name}"


def expand(pattern: str) -> list[str]:
    """The tar URLs of a brace pattern, in its order."""
    return list(braceexpand.braceexpand(pattern))


def _status(pipe) -> int | None:
    return getattr(pipe, "status", None)


class RetryingStream(io.RawIOBase):
    """The bytes at ``url``, reopened after a break (the module docstring's policy)."""

    def __init__(self, url: str, counts: Counter | None = None):
        self.url, self.counts = url, Counter() if counts is None else counts
        self.pos, self.tries, self.done = 0, 0, False
        self.pipe = None
        self._open()

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        from webdataset.gopen import gopen  # here: is_url and the checks stay light

        self.pipe = gopen(self.url, "rb")
        left = self.pos
        while left:  # the bytes already delivered: read again and dropped
            chunk = self._read(min(left, 1 << 20))
            if not chunk:
                raise self._fail(EOFError("the reopened stream ended before the earlier break"))
            left -= len(chunk)

    def _read(self, n: int) -> bytes:
        data = self.pipe.read(n)
        if not data and getattr(self.pipe, "proc", None) is not None:
            # The end of the command's output can come before its exit: webdataset's Pipe
            # only polls, so wait for the status here (an OSError when curl failed), or a
            # transfer cut short reads as a tar that merely ends early.
            self.pipe.wait_for_child()
        return data

    def _fail(self, exc: BaseException) -> OSError:
        status = _status(self.pipe)
        if status == CURL_HTTP_ERROR:
            return DataSourceError(f"{self.url}: the server answered with an HTTP error "
                                   f"(404 not found, 403, …; curl exit {status}): check the URL")
        why = CURL_MESSAGES.get(status, f"exit {status}") if status is not None else str(exc)
        return UnreachableData(f"{self.url}: could not be read whole after {self.tries} "
                               f"tries ({why}; {RETRIES} retries, data.shards over the network)")

    def readinto(self, buffer) -> int:
        while True:
            try:
                data = self._read(len(buffer))
            except OSError as exc:  # webdataset's Pipe: the command exited with an error
                self._close_pipe()
                if _status(self.pipe) == CURL_HTTP_ERROR or self.tries >= RETRIES:
                    self.tries += 1
                    raise self._fail(exc) from None
                self.tries += 1
                self.counts[RETRIED] += 1
                wait = BACKOFF_S * 2 ** (self.tries - 1)
                log.warning("%s: %s after %d bytes; reading it again in %.0f s (try %d of %d)",
                            self.url, CURL_MESSAGES.get(_status(self.pipe), exc), self.pos,
                            wait, self.tries + 1, RETRIES + 1)
                time.sleep(wait)
                try:
                    self._open()
                except OSError as again:
                    if isinstance(again, (DataSourceError, UnreachableData)):
                        raise
                    continue  # the reopened stream broke too: the loop counts it
                continue
            buffer[:len(data)] = data
            self.pos += len(data)
            if not data:
                self.done = True
            return len(data)

    def _close_pipe(self) -> None:
        proc = getattr(self.pipe, "proc", None)
        with contextlib.suppress(OSError):
            self.pipe.stream.close() if proc else self.pipe.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()  # closed before the end: the command is not needed any more
            proc.wait()
            if self.pipe.status is None:
                self.pipe.status = proc.returncode

    def close(self) -> None:
        if self.pipe is not None and not self.closed:
            self._close_pipe()
        super().close()


@contextlib.contextmanager
def open_tar(url: str, counts: Counter | None = None) -> Iterator[tarfile.TarFile]:
    """A tar to iterate in order: a local file (seekable), or a URL read as a stream."""
    if not is_url(url):
        with tarfile.open(url, "r:") as tf:
            yield tf
        return
    raw = RetryingStream(url, counts)
    try:
        with tarfile.open(fileobj=io.BufferedReader(raw, 1 << 16), mode="r|") as tf:
            yield tf
    finally:
        raw.close()


def read_bytes(url: str) -> bytes:
    """A whole small file (index.json) from a URL."""
    with RetryingStream(url) as raw, io.BufferedReader(raw) as f:
        return f.read()
