"""Content-addressed blob storage through fsspec: a local directory or an object store.

Blobs are named by their content hash (`<root>/<h[:2]>/<h>.safetensors`), so a blob is
written once and never modified, and identical weights are stored once however many
revisions use them.

Atomicity: on a local filesystem a blob is written to a temporary file in the same
directory, fsync'd, renamed over the final name and the directory fsync'd, so a reader (or
a crash) never sees a half-written blob under its final name.  Object stores (s3://, gs://,
...) publish an object only when its upload completes, so there a plain put is already
atomic; both go through the same `put` call.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..formats.atomic import TMP_MARK, write_atomic

__all__ = ["BlobFile", "BlobStore"]

_SUFFIX = ".safetensors"
_TMP_MARK = TMP_MARK  # temporary files of write_atomic, which gc removes when stale
# The only names the store writes: <h[:2]>/<h>.safetensors and, while writing,
# <h[:2]>/<h>.safetensors.tmp-<hex>.  Anything else under the root is not ours.
_BLOB_NAME = re.compile(r"(?P<h>[0-9a-f]{64})\.safetensors(?P<tmp>\.tmp-[0-9a-f]+)?")


@dataclass
class BlobFile:
    """One file found under the blob root (used by gc)."""

    path: str
    content_hash: str | None  # None for temporary files
    size: int
    mtime: float  # seconds since the epoch; 0 when the store does not say


class BlobStore:
    """Blobs under `url` (a local path or any fsspec URL)."""

    def __init__(self, url: str) -> None:
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def path(self, content_hash: str) -> str:
        return f"{self.root}/{content_hash[:2]}/{content_hash}{_SUFFIX}"

    def exists(self, content_hash: str) -> bool:
        return self.fs.exists(self.path(content_hash))

    def put(self, content_hash: str, data: bytes) -> None:
        """Store `data` under `content_hash` atomically (see the module docstring)."""
        final = self.path(content_hash)
        if self.local:
            self._put_local(final, data)
        else:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(final, data)

    @staticmethod
    def _put_local(final: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        write_atomic(final, data)

    def size(self, content_hash: str) -> int | None:
        """The stored blob's size in bytes; None when there is no file under its name."""
        try:
            info = self.fs.info(self.path(content_hash))
        except FileNotFoundError:
            return None
        if info.get("type") not in (None, "file"):
            return None
        return int(info.get("size") or 0)

    def mtime(self, path: str) -> float | None:
        """The modification time of `path` now (seconds since the epoch; 0 when the store
        does not say); None when it is gone."""
        try:
            return _mtime(self.fs.info(path))
        except FileNotFoundError:
            return None

    def get(self, content_hash: str) -> bytes:
        """The blob's bytes. Raises FileNotFoundError when it is absent."""
        return self.fs.cat_file(self.path(content_hash))

    def delete(self, path: str) -> None:
        self.fs.rm_file(path)

    def parse(self, path: str) -> tuple[str, bool] | None:
        """(content hash, is a temporary file) when `path` is a name this store writes,
        in the directory it writes it to; None for anything else."""
        prefix = self.root.rstrip("/") + "/"
        if not path.startswith(prefix):
            return None
        parts = path[len(prefix) :].split("/")
        if len(parts) != 2:
            return None
        m = _BLOB_NAME.fullmatch(parts[1])
        if m is None or parts[0] != m["h"][:2]:
            return None
        return m["h"], m["tmp"] is not None

    def walk(self) -> Iterator[BlobFile]:
        """Every blob and temporary file of this store under the root (files of other
        names are not ours and are never listed)."""
        if not self.fs.exists(self.root):
            return
        for path, info in self.fs.find(self.root, detail=True).items():
            parsed = self.parse(path)
            if parsed is None:
                continue  # not ours: leave it alone
            h, tmp = parsed
            yield BlobFile(
                path=path,
                content_hash=None if tmp else h,
                size=int(info.get("size") or 0),
                mtime=_mtime(info),
            )

    @staticmethod
    def now() -> float:
        return time.time()


def _mtime(info: dict) -> float:
    # Each fsspec backend names the modification time its own way (local: mtime,
    # s3: LastModified, gcs: updated, memory: created).
    value = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created") or 0
    if isinstance(value, str):
        from datetime import datetime

        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            value = 0
    if hasattr(value, "timestamp"):
        value = value.timestamp()
    return float(value)
