"""Store-and-forward relay between the coordinator's federation folder and each site's local copy of it.

The Flower transport moves the shared-folder protocol's files (files.py), byte for byte, over Flower messages:
the unchanged Aggregator runs on the coordinator's folder and the unchanged SiteClient (inside nnUNetv2_train) on
the site's local folder, so every check (HMACs, sha256, names, shapes, dtypes, finiteness, round, site) and
every restart guarantee stays the folder protocol's. This module is the relay's logic without Flower:

- ``site_exchange`` runs at a site (the ClientApp): it writes the files the coordinator pushed (only after
  checking the coordinator's HMAC with the site's key, and only to the paths the coordinator may write),
  sends this site's own update and fingerprint files the coordinator says it lacks (nothing else) and its
  folder's status, all HMAC-signed with the site's key over the coordinator's fresh nonce;
- ``Relay`` runs at the coordinator (the ServerApp): it plans one request per node from that node's last
  status (the globals, plans and federation.json it lacks; the updates the coordinator lacks), checks each
  reply's HMAC (a node proves which site it is with that site's key; a node that cannot is refused and gets
  nothing) and writes the pulled files with the atomic writers, tensors before manifests. An update already in
  the coordinator's folder is never overwritten: the aggregator judges the first one, as on a shared folder.

Stateless apart from the two folders: restarting either side loses nothing.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path

from ..common.atomic import write_bytes_in
from ..common.safe_io import UnsafeInput, read_file
from . import flower_checks as check
from .flower_checks import MAX_FILES_PER_MESSAGE, RelayError
from .names import FEDERATION_FILE, PLANS_FOLDER
from .names import PLAN_FILES as PLAN_NAMES

__all__ = ["RelayError", "Relay", "site_exchange", "folder_status", "pullable", "relay_mac"]

# Not built on files.py (paths, mac): it imports torch, ~3 s for each message (the SuperNode starts a new
# flwr-clientapp process per message). tests/test_flower_relay.py checks the names against files.py's paths.
PROTOCOL = "nnunet-adpfl-relay/1"
PLAN_FILES = tuple(f"{PLANS_FOLDER}/{name}" for name in PLAN_NAMES)
MAX_GLOBALS_PER_MESSAGE = 2
MAX_UPDATES_PER_MESSAGE = 2
RETRY_REFUSED_S = 30.0
MAX_JSON_FILE_BYTES = 16 << 20          # federation.json, plans, manifests, fingerprints
MIN_TENSOR_FILE_BYTES = 64 << 20
MAX_TENSOR_FILE_BYTES = 4 << 30
_ROUND = r"round_([0-9]{4})"  # not \d, which matches non-ASCII digits too
# names are matched with fullmatch: "$" would also let a name with a trailing newline through
_PUSHABLE = re.compile(rf"federation\.json|plans/(nnUNetPlans|dataset|dataset_fingerprint)\.json|"
                       rf"{_ROUND}/global\.(safetensors|json)")


def pullable(site: str) -> re.Pattern:
    """The files of a site the coordinator may pull (and write into its folder): its updates and fingerprint."""
    s = re.escape(site)
    return re.compile(rf"{_ROUND}/updates/{s}\.(safetensors|json)|fingerprints/{s}\.json")


def round_name(r: int) -> str:
    return f"round_{r:04d}"


def global_names(r: int) -> list[str]:
    return [f"{round_name(r)}/global.safetensors", f"{round_name(r)}/global.json"]  # tensors before manifest


def update_names(r: int, site: str) -> list[str]:
    return [f"{round_name(r)}/updates/{site}.safetensors", f"{round_name(r)}/updates/{site}.json"]


def fingerprint_name(site: str) -> str:
    return f"fingerprints/{site}.json"


def small_names(site: str) -> set[str]:
    """The files a status lists by sha256."""
    return {FEDERATION_FILE, *PLAN_FILES, fingerprint_name(site)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_nonce() -> str:
    return secrets.token_hex(16)


def relay_mac(key: bytes, direction: str, nonce: str, site: str, body: dict) -> str:
    """HMAC-SHA256 with the site's key over one message of the relay (direction 'push' or 'reply')."""
    text = json.dumps({"protocol": PROTOCOL, "direction": direction, "nonce": nonce, "site": site, **body},
                      sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: sha256(data) for name, data in files.items()}


def tensor_limit(fed: Path) -> int:
    """Largest .safetensors file the relay reads, sends or writes: 4 x the round-0 global model of this folder
    (a top-k upload at full density, int64 indices + float32 values, is 3 x a dense float32 update), within
    [64 MiB, 4 GiB]."""
    try:
        st = os.lstat(Path(fed) / global_names(0)[0])
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
    except OSError:
        size = 0
    return min(MAX_TENSOR_FILE_BYTES, max(MIN_TENSOR_FILE_BYTES, 4 * size + (1 << 20)))


def file_limit(fed: Path, name: str) -> int:
    return tensor_limit(fed) if name.endswith(".safetensors") else MAX_JSON_FILE_BYTES


def _read(fed: Path, name: str) -> bytes | None:
    """A file of the folder, bounded, no symlink followed; None if absent (UnsafeInput if not a safe file)."""
    try:
        return read_file(Path(fed) / name, file_limit(fed, name), root=fed)
    except FileNotFoundError:
        return None


def _rounds(fed: Path, pattern: str) -> list[int]:
    """Rounds of the files matching ``pattern`` (round_*/...); folders not named round_NNNN are ignored."""
    found = set()
    for p in Path(fed).glob(pattern):
        m = re.fullmatch(_ROUND, p.relative_to(fed).parts[0])
        if m:
            found.add(int(m.group(1)))
    return sorted(found)


def folder_status(fed: Path, site: str) -> dict:
    """What a folder holds, as the relay compares it: sha256 of the small files, rounds of the written-once ones.
    A small file that is not a safe regular file (a symlink, too large) counts as missing."""
    fed, files = Path(fed), {}
    for name in sorted(small_names(site)):
        try:
            data = _read(fed, name)
        except UnsafeInput:
            data = None
        if data is not None:
            files[name] = sha256(data)
    return {"files": files, "globals": _rounds(fed, "round_*/global.json"),
            "updates": _rounds(fed, f"round_*/updates/{site}.json")}


def _ordered(names) -> list[str]:
    """Tensors before manifests, plans before federation.json: a reader that sees a manifest finds its tensors."""
    return sorted(names, key=lambda n: (n.endswith(".json") and "round_" in n, n == FEDERATION_FILE, n))


def check_files(files, allowed: re.Pattern, max_tensor_bytes: int) -> dict[str, bytes]:
    """The files of a message: at most MAX_FILES_PER_MESSAGE, names this sender may write (fullmatch), sizes
    within MAX_JSON_FILE_BYTES (JSON) and ``max_tensor_bytes`` (.safetensors); RelayError otherwise."""
    if not isinstance(files, dict) or len(files) > MAX_FILES_PER_MESSAGE:
        raise RelayError(f"more than {MAX_FILES_PER_MESSAGE} files in one message")
    bad = [n for n in files if not (isinstance(n, str) and allowed.fullmatch(n))]
    if bad:
        raise RelayError(f"refused to write {[str(n)[:80] for n in bad[:3]]}: not a path this sender may write")
    def limit(name: str) -> int:
        return max_tensor_bytes if name.endswith(".safetensors") else MAX_JSON_FILE_BYTES
    big = [n for n, data in files.items() if not isinstance(data, bytes) or len(data) > limit(n)]
    if big:
        raise RelayError(f"{big[:3]} larger than the relay's limit ({limit(big[0]):,} bytes)")
    return files


def _write_files(fed: Path, files: dict[str, bytes], overwrite=lambda name: True) -> list[str]:
    """Write checked files (check_files) below ``fed``, never through a symlink."""
    written = []
    for name in _ordered(files):
        if not overwrite(name) and os.path.lexists(Path(fed) / name):
            continue
        try:
            if _read(fed, name) == files[name]:
                continue
        except UnsafeInput:
            pass  # not a safe file: replaced below
        write_bytes_in(fed, Path(fed) / name, files[name])
        written.append(name)
    return written


# ---- the site side (ClientApp) --------------------------------------------------------------------------
def push_body(push: dict[str, bytes], held: dict | None) -> dict:
    """What the coordinator's request HMAC covers: the files it pushes and, once it knows the site, what it holds
    of it (another registered node could otherwise queue requests that make this site send its files again)."""
    body = {"files": _digests(push)}
    return body if held is None else {**body, "held": held}


def site_exchange(fed: Path, site: str, key: bytes, nonce, push: dict[str, bytes], push_mac,
                  held) -> tuple[dict, dict[str, bytes], str]:
    """Apply one request of the coordinator to the site's local folder; returns (status, files, reply MAC).
    ``held``: what the coordinator holds of this site (update rounds, fingerprint sha256); the reply brings this
    site's own files it lacks (None: the coordinator does not know this node yet, nothing is sent).
    Every argument from the message is checked first: RelayError (and nothing written) if one is malformed."""
    fed = Path(fed)
    nonce, held = check.nonce(nonce), check.held(held)
    push_mac = check.mac_or_none(push_mac, "push_mac")
    check_files(push, _PUSHABLE, MAX_TENSOR_FILE_BYTES)  # before round 0 arrives a site knows no model size
    if push or held is not None:  # a request that writes files or asks for this site's files: the coordinator's
        expected = relay_mac(key, "push", nonce, site, push_body(push, held))
        if push_mac is None or not hmac.compare_digest(expected, push_mac):
            raise RelayError("a request with files or 'held' without a valid coordinator HMAC for this site: "
                             "nothing written or sent")
    if push:
        fed.mkdir(parents=True, exist_ok=True)
        _write_files(fed, push)
    status, files = folder_status(fed, site), {}
    if held is not None:
        missing = [r for r in status["updates"] if r not in set(held["updates"])]
        for r in missing[:MAX_UPDATES_PER_MESSAGE]:
            pair = {name: _read_or_none(fed, name) for name in update_names(r, site)}
            if None not in pair.values():
                files.update(pair)
        theirs = status["files"].get(fingerprint_name(site))
        if theirs is not None and theirs != held["fingerprint"]:
            data = _read_or_none(fed, fingerprint_name(site))
            if data is not None:
                files[fingerprint_name(site)] = data
    return status, files, relay_mac(key, "reply", nonce, site, {"status": status, "files": _digests(files)})


def _read_or_none(fed: Path, name: str) -> bytes | None:
    """A file to send, or None if it is missing or not a safe regular file within the limits (not sent)."""
    try:
        return _read(fed, name)
    except UnsafeInput:
        return None


# ---- the coordinator side (ServerApp) --------------------------------------------------------------------
class Relay:
    """The coordinator's half: one request per node and cycle, built from the node's last authenticated status."""

    def __init__(self, fed: Path, site_keys: dict[str, bytes], rounds: int, log=print):
        self.fed = Path(fed)
        self.keys = site_keys
        self.rounds = rounds
        self.log = log
        self.sites: dict[int, str] = {}       # node id -> site it proved to be
        self.status: dict[str, dict] = {}     # site -> its folder's last status
        self.pending: dict[int, tuple] = {}   # node id -> (nonce, site) of the request in flight
        self.refused: dict[int, str] = {}     # node id -> why it was refused
        self.refused_at: dict[int, float] = {}
        self.bytes_pushed = 0
        self.bytes_pulled = 0

    def _push_plan(self, site: str, status: dict) -> dict[str, bytes]:
        push, have = {}, status["files"]
        for name in (*PLAN_FILES, FEDERATION_FILE):
            data = _read(self.fed, name)
            if data is not None and have.get(name) != sha256(data):
                push[name] = data
        held = set(status["globals"])
        missing = [r for r in _rounds(self.fed, "round_*/global.json") if r not in held]
        for r in missing[:MAX_GLOBALS_PER_MESSAGE]:
            for name in global_names(r):
                data = _read(self.fed, name)
                if data is None:
                    raise UnsafeInput(f"{name} is missing")
                push[name] = data
        return push

    def _held(self, site: str) -> dict:
        mine = _read_or_none(self.fed, fingerprint_name(site))
        return {"updates": _rounds(self.fed, f"round_*/updates/{site}.json"),
                "fingerprint": sha256(mine) if mine is not None else None}

    def request(self, node: int) -> dict:
        """The content of the next request to ``node``: nonce, files to write (with their HMAC), what we hold."""
        nonce, site = new_nonce(), self.sites.get(node)
        push, held, mac = {}, None, None
        if site is not None and site in self.status:
            push, held = self._push_plan(site, self.status[site]), self._held(site)
            mac = relay_mac(self.keys[site], "push", nonce, site, push_body(push, held))
        self.pending[node] = (nonce, site)
        self.bytes_pushed += sum(len(v) for v in push.values())
        return {"nonce": nonce, "push": push, "push_mac": mac, "held": held}

    def refuse(self, node: int, reason: str) -> None:
        if self.refused.get(node) != reason:
            self.log(f"relay: REFUSED node {node}: {reason}")
        self.refused[node] = reason
        self.refused_at[node] = time.time()
        self.sites.pop(node, None)

    def may_ask(self, node: int) -> bool:
        """A refused node is asked again only every RETRY_REFUSED_S seconds (it may have been reconfigured)."""
        return time.time() - self.refused_at.get(node, 0.0) >= RETRY_REFUSED_S

    def handle_reply(self, node: int, site, status, files: dict[str, bytes], mac) -> list[str]:
        """Check a node's reply (its site's HMAC over our nonce) and write the files it brought. Anything
        malformed or unverified refuses the node (logged); nothing it sent is used."""
        nonce, expected_site = self.pending.pop(node, (None, None))
        if nonce is None:
            return []
        try:
            site, status = self._check_reply(nonce, expected_site, site, status, files, mac)
        except RelayError as e:
            self.refuse(node, str(e))
            return []
        if node not in self.sites:
            self.log(f"relay: node {node} is site {site}")
        self.refused.pop(node, None)
        self.sites[node] = site
        self.status[site] = status
        self.bytes_pulled += sum(len(v) for v in files.values())
        written = _write_files(self.fed, files,
                               overwrite=lambda name: name == fingerprint_name(site))  # updates: first one only
        for name in written:
            self.log(f"relay: received {name} from site {site} ({len(files[name]):,} bytes)")
        return written

    def _check_reply(self, nonce: str, expected_site, site, status, files, mac) -> tuple[str, dict]:
        site = check.site_id(site)
        if site not in self.keys:
            raise RelayError(f"claims unknown site {site!r}")
        status = check.status(status, small_names(site))
        mac = check.mac_or_none(mac, "mac")
        if not isinstance(files, dict) or not all(isinstance(v, bytes) for v in files.values()):
            raise RelayError("files are not byte strings")
        expected = relay_mac(self.keys[site], "reply", nonce, site, {"status": status, "files": _digests(files)})
        if mac is None or not hmac.compare_digest(expected, mac):
            raise RelayError(f"reply for site {site!r} without a valid HMAC of that site's key")
        if expected_site is not None and site != expected_site:
            raise RelayError(f"was site {expected_site!r}, now claims {site!r}")
        if expected_site is None and files:
            raise RelayError(f"site {site!r} sent files before it was known")
        try:
            check_files(files, pullable(site), tensor_limit(self.fed))
        except RelayError as e:
            raise RelayError(f"site {site!r} sent files that are not its own to send: {e}") from None
        late = [n for n in files if n.startswith("round_") and not 1 <= int(n[6:10]) <= self.rounds]
        if late:
            raise RelayError(f"site {site!r} sent updates of rounds outside 1..{self.rounds}: {late[:3]}")
        return site, status

    def finished(self) -> bool:
        """The last round's global model is at the coordinator and every site holds it."""
        if not (self.fed / global_names(self.rounds)[1]).is_file():
            return False
        sites = set(self.keys)
        return all(self.rounds in self.status.get(s, {}).get("globals", []) for s in sites)
