"""Atomic file writes: a temporary file in the same folder, fsync, rename. Readers never see a partial file,
and a crash leaves the previous version intact."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Permissions ``mode``, by default what a plain open() would give (mkstemp's 0600 would hide the file
    from the other parties' accounts on a shared mount)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str | Path, content: dict) -> None:
    write_bytes_atomic(path, json.dumps(content, indent=2, allow_nan=False).encode())
