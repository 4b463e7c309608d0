"""Atomic file writes: a temporary file in the same folder, fsync, rename. Readers never see a partial file,
and a crash leaves the previous version intact.

``write_bytes_in`` / ``append_line_in`` write below a ``root`` that others can write to (the federation folder):
they walk the folders from ``root`` with directory descriptors opened O_NOFOLLOW, so no symlink is ever followed
(a symlink where a folder belongs is replaced by a real folder), and nothing is written outside ``root``.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
import tempfile
import time
from pathlib import Path

from .safe_io import UnsafeInput

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
TEMPORARY = re.compile(r"\..+\.tmp")  # the temporary names written here: .<name>.<random>.tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_synced(fd: int, data: bytes, mode: int | None) -> None:
    """Set the permissions (``mode``, by default what a plain open() would give), write, fsync and close ``fd``."""
    os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Permissions ``mode``, by default what a plain open() would give (mkstemp's 0600 would hide the file
    from the other parties' accounts on a shared mount)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _write_synced(fd, data, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str | Path, content: dict) -> None:
    write_bytes_atomic(path, json.dumps(content, indent=2, allow_nan=False).encode())


def _relative_parts(root: Path, path: Path) -> tuple[str, ...]:
    root_abs, path_abs = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    try:
        parts = path_abs.relative_to(root_abs).parts
    except ValueError:
        raise UnsafeInput(f"{path} is outside {root}") from None
    if not parts or ".." in parts:
        raise UnsafeInput(f"{path} is not a file inside {root}")
    return parts


def _open_folder(root: Path, parts: tuple[str, ...]) -> int:
    """Descriptor of root/parts..., folders created as needed; a symlink (or a non-folder that is not a real
    folder) in the way is removed, never followed."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in parts:
            for _ in range(3):
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    break
                except FileNotFoundError:
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeInput(f"cannot open folder {part}: {e.strerror}") from None
                    os.unlink(part, dir_fd=fd)  # a symlink or file where a folder belongs: removed, not followed
            else:
                raise UnsafeInput(f"folder {part} keeps being replaced")
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def write_bytes_in(root: str | Path, path: str | Path, data: bytes, mode: int | None = None) -> None:
    """``write_bytes_atomic`` confined to ``root``: no symlink followed (a symlink at ``path`` is replaced)."""
    parts = _relative_parts(Path(root), Path(path))
    dfd = _open_folder(Path(root), parts[:-1])
    name, tmp = parts[-1], f".{parts[-1]}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o600, dir_fd=dfd)
        try:
            _write_synced(fd, data, mode)
            try:
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except IsADirectoryError:  # a folder planted where the file belongs: moved aside, not written into
                os.rename(name, f".{name}.{secrets.token_hex(6)}.moved-aside", src_dir_fd=dfd, dst_dir_fd=dfd)
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
    finally:
        os.close(dfd)


def _is_single_file(st: os.stat_result) -> bool:
    """A regular file with no other name (a hardlink may be a file outside the folder)."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def append_line_in(root: str | Path, path: str | Path, line: str) -> None:
    """Append ``line`` to a regular file below ``root``, fsynced; a symlink, FIFO or other non-regular file at
    ``path``, or a hardlink (a file with another name, maybe outside ``root``), is removed first (never written
    through); a folder there raises UnsafeInput."""
    parts = _relative_parts(Path(root), Path(path))
    dfd = _open_folder(Path(root), parts[:-1])
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        for _ in range(3):
            try:
                st = os.lstat(parts[-1], dir_fd=dfd)
                if stat.S_ISDIR(st.st_mode):
                    raise UnsafeInput(f"{path} is a folder")
                if not _is_single_file(st):
                    os.unlink(parts[-1], dir_fd=dfd)
            except FileNotFoundError:
                pass
            try:
                fd = os.open(parts[-1], flags, 0o666, dir_fd=dfd)
            except OSError as e:  # replaced by a symlink or FIFO in between: try again
                if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                    continue
                raise
            try:
                if not _is_single_file(os.fstat(fd)):
                    continue
                os.write(fd, line.encode())
                os.fsync(fd)
                return
            finally:
                os.close(fd)
        raise UnsafeInput(f"{path} keeps being replaced by something that is not a file")
    finally:
        os.close(dfd)


def remove_stale_temporaries(root: str | Path, max_age_s: float) -> list[Path]:
    """Remove the temporary files (``.<name>.<random>.tmp``) that writers killed mid-write left below ``root``,
    if older than ``max_age_s``; symlinks are not followed. Returns what was removed."""
    removed, limit, real = [], time.time() - max_age_s, os.path.realpath(root)  # the root may be a symlink itself
    for folder, _, names, fd in os.fwalk(real, follow_symlinks=False):  # by descriptor: a folder swapped for a
        for name in names:                                             # symlink meanwhile is not followed
            try:
                if TEMPORARY.fullmatch(name) and os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime < limit:
                    os.unlink(name, dir_fd=fd)
                    removed.append(Path(root) / os.path.relpath(folder, real) / name)
            except OSError:
                continue
    return removed
