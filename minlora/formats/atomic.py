"""Writing a local file so that a reader (or a crash) never sees half of it under its name."""
from __future__ import annotations

import os
import uuid
from typing import Union

__all__ = ["TMP_MARK", "write_atomic"]

# Temporary files are named `<final name><TMP_MARK><random hex>`: unique per writer, in the
# destination's directory (so the rename stays on one filesystem), and recognisable by a
# cleaner (the registry's gc removes stale ones).
TMP_MARK = ".tmp-"


def write_atomic(path: Union[str, "os.PathLike[str]"], data: bytes) -> None:
    """Writes `data` to `path`: to a temporary file beside it, fsync'd, renamed over `path`,
    and the directory fsync'd so the rename itself survives a power cut.  Concurrent writers
    of the same path each write their own temporary file; the last rename wins whole."""
    final = os.fspath(path)
    directory = os.path.dirname(final) or "."
    tmp = f"{final}{TMP_MARK}{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        # os.replace is atomic on POSIX: readers see the old file, or the whole new one.
        os.replace(tmp, final)
    except BaseException:
        os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
