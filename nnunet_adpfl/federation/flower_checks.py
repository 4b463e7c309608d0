"""Checks of what a relay peer sends: every field of a relay message is parsed here before anything uses it.

A registered SuperNode that holds no site key, a key-holding site and a compromised SuperLink can all send any
bytes. Each function returns well-typed values or raises ``RelayError`` with a reason the relay logs; no other
exception type comes out of them, whatever the input (deep or huge JSON, NaN/Infinity, wrong types, missing or
extra keys). Stdlib only: the ClientApp imports it for every message.
"""
from __future__ import annotations

import re

from ..common.safe_io import UnsafeInput, loads_json

MAX_FIELD_BYTES = 1 << 20      # one JSON field of a message (a status lists a few names and rounds)
MAX_FIELD_DEPTH = 4            # the deepest legitimate field: status -> files -> name -> sha256
MAX_FILES_PER_MESSAGE = 16
MAX_ROUND = 9999               # round_NNNN
MAX_TEXT = 2000                # an error message from a peer, as logged
SHA256 = re.compile(r"[0-9a-f]{64}")
NONCE = re.compile(r"[0-9a-f]{32}")
SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # as files.SITE_ID


class RelayError(Exception):
    """A relay message failed a check (malformed, bad HMAC, a path the sender may not write, ...)."""


def parse_field(name: str, text) -> object:
    """One field of a message's ConfigRecord: a JSON text within the size and depth limits, finite numbers."""
    if not isinstance(text, str):
        raise RelayError(f"field {name!r} is a {type(text).__name__}, not a JSON text")
    try:
        return loads_json(text, MAX_FIELD_BYTES, MAX_FIELD_DEPTH)
    except UnsafeInput as e:
        raise RelayError(f"field {name!r}: {e.reason}") from None


def _dict(value, what: str, keys: set[str]) -> dict:
    if not isinstance(value, dict):
        raise RelayError(f"{what} is a {type(value).__name__}, not an object")
    if set(value) != keys:
        raise RelayError(f"{what} has keys {sorted(value)[:8]}, expected {sorted(keys)}")
    return value


def rounds(value, what: str) -> list[int]:
    """A list of distinct round numbers 0..MAX_ROUND."""
    if not isinstance(value, list) or len(value) > MAX_ROUND + 1:
        raise RelayError(f"{what} is not a list of rounds")
    if not all(type(r) is int and 0 <= r <= MAX_ROUND for r in value) or len(set(value)) != len(value):
        raise RelayError(f"{what} holds something that is not a distinct round number 0..{MAX_ROUND}")
    return sorted(value)


def sha256_or_none(value, what: str) -> str | None:
    if value is None or (isinstance(value, str) and SHA256.fullmatch(value)):
        return value
    raise RelayError(f"{what} is not a sha256 hex digest")


def status(value, small_names: set[str]) -> dict:
    """A folder's status (flower_relay.folder_status): sha256 of some of ``small_names``, global and update rounds."""
    value = _dict(value, "status", {"files", "globals", "updates"})
    files = value["files"]
    if not isinstance(files, dict) or not set(files) <= small_names:
        raise RelayError(f"status.files names files other than {sorted(small_names)}")
    for name, digest in files.items():
        if sha256_or_none(digest, f"status.files[{name!r}]") is None:
            raise RelayError(f"status.files[{name!r}] is not a sha256 hex digest")
    return {"files": dict(files), "globals": rounds(value["globals"], "status.globals"),
            "updates": rounds(value["updates"], "status.updates")}


def held(value) -> dict | None:
    """What the coordinator says it holds of a site: None, or its update rounds and fingerprint sha256."""
    if value is None:
        return None
    value = _dict(value, "held", {"updates", "fingerprint"})
    return {"updates": rounds(value["updates"], "held.updates"),
            "fingerprint": sha256_or_none(value["fingerprint"], "held.fingerprint")}


def nonce(value) -> str:
    if isinstance(value, str) and NONCE.fullmatch(value):
        return value
    raise RelayError("the nonce is not 32 hex digits")


def mac_or_none(value, what: str) -> str | None:
    return sha256_or_none(value, what)  # an HMAC-SHA256 is written as 64 hex digits too


def site_id(value) -> str:
    if isinstance(value, str) and SITE_ID.fullmatch(value):
        return value
    raise RelayError(f"site {str(value)[:80]!r} is not a site name")


def text(value) -> str:
    """A peer's free text (an error message) made safe for one log line."""
    return repr(str(value)[:MAX_TEXT])
