"""Writing files so that a reader, or a crash, never sees half of one."""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile


def write_atomically(path: str, data: bytes) -> None:
    """Write to a hidden temporary file beside `path`, then rename it over `path`: a reader (or a crash)
    sees the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)  # keep the permissions of the file we replace
    except OSError:
        mode = 0o644  # mkstemp makes the file owner-only; a model file should be readable like others
    tmp = tempfile.NamedTemporaryFile(dir=directory, delete=False,
                                      prefix="." + os.path.basename(path), suffix=".partial")
    try:
        with tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, mode)
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
