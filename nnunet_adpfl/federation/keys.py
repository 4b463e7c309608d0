"""Reading a site key file (no torch: the Flower ClientApp imports it too)."""
from __future__ import annotations

from pathlib import Path

from ..common.safe_io import UnsafeInput, read_file

MAX_KEY_FILE_BYTES = 4096


def load_key(path: str | Path) -> bytes:
    """A site key as 'nnunet-adpfl federation init' writes it (hex): a regular file reached without a symlink,
    at most MAX_KEY_FILE_BYTES, at least 16 bytes of key."""
    try:
        text = read_file(path, MAX_KEY_FILE_BYTES).decode("ascii").strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"key file {path} does not exist") from None
    except (UnsafeInput, UnicodeDecodeError) as e:
        raise ValueError(f"key file {path}: {getattr(e, 'reason', e)}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"key file {path} must hold a hex key (as written by 'nnunet-adpfl federation init')") \
            from None
    if len(key) < 16:
        raise ValueError(f"key in {path} is too short ({len(key)} bytes)")
    return key
