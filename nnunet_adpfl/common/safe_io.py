"""Reading files and JSON that someone else may have written (a shared folder, a peer's message).

Stdlib only (the Flower relay imports it and must not import torch). Every function raises ``UnsafeInput``
(a ValueError) with a reason a log can carry, never another exception, for any malformed or hostile input:

- ``loads_json``: bounded size and nesting depth, no NaN/Infinity (nor a number that overflows to it), no
  duplicate keys;
- ``read_file``: a regular file only, reached without following a symlink in any component below ``root``
  (nor the file itself), opened non-blocking (a FIFO never hangs), at most ``max_bytes`` read;
- ``read_json_file``: both.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

MAX_JSON_BYTES = 4 << 20
MAX_JSON_DEPTH = 32


class UnsafeInput(ValueError):
    """A file or message failed a safety check; ``reason`` says which."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _json_depth(text: str) -> int:
    """Deepest nesting of [ and { outside strings (checked before parsing: json's parser recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnsafeInput(f"number {text[:40]!r} is not finite")
    return value


def _refuse_constant(name: str):
    raise UnsafeInput(f"{name} is not allowed in JSON here")


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise UnsafeInput(f"duplicate key {k[:40]!r}")
        out[k] = v
    return out


def loads_json(data: bytes | str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """Parse untrusted JSON, or raise UnsafeInput."""
    if len(data) > max_bytes:
        raise UnsafeInput(f"JSON of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise UnsafeInput(f"not UTF-8: {e}") from None
    if _json_depth(text) > max_depth:
        raise UnsafeInput(f"JSON nested deeper than {max_depth}")
    try:
        return json.loads(text, parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_refuse_constant,
                          object_pairs_hook=_no_duplicates)
    except UnsafeInput:
        raise
    except (ValueError, RecursionError, OverflowError) as e:
        raise UnsafeInput(f"not valid JSON: {str(e)[:200]}") from None


def _bounded_int(text: str) -> int:
    if len(text) > 40:
        raise UnsafeInput(f"integer of {len(text)} digits")
    return int(text)


def _walk_no_symlinks(root: Path, path: Path) -> None:
    """Every component of ``path`` below ``root`` must exist and not be a symlink; ``path`` must lie in ``root``."""
    root_abs, path_abs = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    try:
        rel = path_abs.relative_to(root_abs)
    except ValueError:
        raise UnsafeInput(f"{path} is outside {root}") from None
    if ".." in rel.parts:
        raise UnsafeInput(f"{path} escapes {root}")
    current = root_abs
    for part in rel.parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise UnsafeInput(f"cannot inspect {current}: {e}") from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeInput(f"{current} is a symlink (not followed)")


def check_inside(root: str | Path, path: str | Path) -> None:
    """Raise UnsafeInput unless ``path`` lies inside ``root`` and no existing component below ``root`` is a
    symlink (for paths about to be written; missing components are fine)."""
    root_abs, path_abs = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    try:
        rel = path_abs.relative_to(root_abs)
    except ValueError:
        raise UnsafeInput(f"{path} is outside {root}") from None
    current = root_abs
    for part in rel.parts:
        current = current / part
        if os.path.islink(current):
            raise UnsafeInput(f"{current} is a symlink (not followed)")


def read_file(path: str | Path, max_bytes: int, root: str | Path | None = None) -> bytes:
    """Bytes of a regular file of at most ``max_bytes``; no symlink followed (in ``path`` itself, and in every
    component below ``root`` when given). FileNotFoundError if it does not exist; UnsafeInput otherwise."""
    path = Path(path)
    if root is not None:
        _walk_no_symlinks(Path(root), path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP for a symlink, EISDIR, EACCES, ...
        raise UnsafeInput(f"cannot open {path.name}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeInput(f"{path.name} is not a regular file")
        if st.st_size > max_bytes:
            raise UnsafeInput(f"{path.name} has {st.st_size} bytes, more than the limit of {max_bytes}")
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise UnsafeInput(f"{path.name} grew past the limit of {max_bytes} bytes while read")
        return data
    finally:
        os.close(fd)


def read_json_file(path: str | Path, root: str | Path | None = None, max_bytes: int = MAX_JSON_BYTES,
                   max_depth: int = MAX_JSON_DEPTH):
    """Untrusted JSON from a file: ``read_file`` then ``loads_json``."""
    try:
        return loads_json(read_file(path, max_bytes, root), max_bytes, max_depth)
    except UnsafeInput as e:
        raise UnsafeInput(f"{Path(path).name}: {e.reason}") from None
