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
import re
import secrets
import time
from pathlib import Path

from ..common.atomic import write_bytes_atomic

# Not built on files.py (paths, mac): it imports torch, ~3 s for each message (the SuperNode starts a new
# flwr-clientapp process per message). tests/test_flower_relay.py checks the names against files.py's paths.
PROTOCOL = "nnunet-adpfl-relay/1"
FEDERATION_FILE = "federation.json"
PLAN_FILES = ("plans/nnUNetPlans.json", "plans/dataset.json", "plans/dataset_fingerprint.json")
MAX_GLOBALS_PER_MESSAGE = 2
MAX_UPDATES_PER_MESSAGE = 2
RETRY_REFUSED_S = 30.0
_ROUND = r"round_\d{4}"
_PUSHABLE = re.compile(rf"^(federation\.json|plans/(nnUNetPlans|dataset|dataset_fingerprint)\.json|"
                       rf"{_ROUND}/global\.(safetensors|json))$")


class RelayError(Exception):
    """A relay message failed a check (bad HMAC, a path the sender may not write, ...)."""


def pullable(site: str) -> re.Pattern:
    """The files of a site the coordinator may pull (and write into its folder): its updates and fingerprint."""
    s = re.escape(site)
    return re.compile(rf"^({_ROUND}/updates/{s}\.(safetensors|json)|fingerprints/{s}\.json)$")


def round_name(r: int) -> str:
    return f"round_{r:04d}"


def global_names(r: int) -> list[str]:
    return [f"{round_name(r)}/global.safetensors", f"{round_name(r)}/global.json"]  # tensors before manifest


def update_names(r: int, site: str) -> list[str]:
    return [f"{round_name(r)}/updates/{site}.safetensors", f"{round_name(r)}/updates/{site}.json"]


def fingerprint_name(site: str) -> str:
    return f"fingerprints/{site}.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_nonce() -> str:
    return secrets.token_hex(16)


def relay_mac(key: bytes, direction: str, nonce: str, site: str, body: dict) -> str:
    """HMAC-SHA256 with the site's key over one message of the relay (direction 'push' or 'reply')."""
    text = json.dumps({"protocol": PROTOCOL, "direction": direction, "nonce": nonce, "site": site, **body},
                      sort_keys=True, separators=(",", ":"))
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: sha256(data) for name, data in files.items()}


def _rounds(fed: Path, pattern: str) -> list[int]:
    return sorted(int(p.parts[-3 if "updates" in pattern else -2].removeprefix("round_"))
                  for p in fed.glob(pattern))


def folder_status(fed: Path, site: str) -> dict:
    """What a folder holds, as the relay compares it: sha256 of the small files, rounds of the written-once ones."""
    fed = Path(fed)
    small = [FEDERATION_FILE, *PLAN_FILES, fingerprint_name(site)]
    return {"files": {n: sha256((fed / n).read_bytes()) for n in small if (fed / n).is_file()},
            "globals": _rounds(fed, "round_*/global.json"),
            "updates": _rounds(fed, f"round_*/updates/{site}.json")}


def _ordered(names) -> list[str]:
    """Tensors before manifests, plans before federation.json: a reader that sees a manifest finds its tensors."""
    return sorted(names, key=lambda n: (n.endswith(".json") and "round_" in n, n == FEDERATION_FILE, n))


def _write_files(fed: Path, files: dict[str, bytes], allowed: re.Pattern, overwrite=lambda name: True) -> list[str]:
    bad = [n for n in files if not allowed.match(n) or ".." in n.split("/")]
    if bad:
        raise RelayError(f"refused to write {bad[:3]}: not a path this sender may write")
    written = []
    for name in _ordered(files):
        path = Path(fed) / name
        if path.exists() and (not overwrite(name) or path.read_bytes() == files[name]):
            continue
        write_bytes_atomic(path, files[name])
        written.append(name)
    return written


# ---- the site side (ClientApp) --------------------------------------------------------------------------
def site_exchange(fed: Path, site: str, key: bytes, nonce: str, push: dict[str, bytes], push_mac: str | None,
                  held: dict | None) -> tuple[dict, dict[str, bytes], str]:
    """Apply one request of the coordinator to the site's local folder; returns (status, files, reply MAC).
    ``held``: what the coordinator holds of this site (update rounds, fingerprint sha256); the reply brings this
    site's own files it lacks (None: the coordinator does not know this node yet, nothing is sent)."""
    fed = Path(fed)
    if push:
        expected = relay_mac(key, "push", nonce, site, {"files": _digests(push)})
        if not (isinstance(push_mac, str) and hmac.compare_digest(expected, push_mac)):
            raise RelayError("files pushed without a valid coordinator HMAC for this site: nothing written")
        _write_files(fed, push, _PUSHABLE)
    status, files = folder_status(fed, site), {}
    if held is not None:
        missing = [r for r in status["updates"] if r not in set(held.get("updates", []))]
        for r in missing[:MAX_UPDATES_PER_MESSAGE]:
            for name in update_names(r, site):
                files[name] = (fed / name).read_bytes()
        theirs = status["files"].get(fingerprint_name(site))
        if theirs is not None and theirs != held.get("fingerprint"):
            files[fingerprint_name(site)] = (fed / fingerprint_name(site)).read_bytes()
    return status, files, relay_mac(key, "reply", nonce, site, {"status": status, "files": _digests(files)})


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
            path = self.fed / name
            if path.is_file():
                data = path.read_bytes()
                if have.get(name) != sha256(data):
                    push[name] = data
        held = set(status["globals"])
        missing = [r for r in _rounds(self.fed, "round_*/global.json") if r not in held]
        for r in missing[:MAX_GLOBALS_PER_MESSAGE]:
            for name in global_names(r):
                push[name] = (self.fed / name).read_bytes()
        return push

    def _held(self, site: str) -> dict:
        mine = self.fed / fingerprint_name(site)
        return {"updates": _rounds(self.fed, f"round_*/updates/{site}.json"),
                "fingerprint": sha256(mine.read_bytes()) if mine.is_file() else None}

    def request(self, node: int) -> dict:
        """The content of the next request to ``node``: nonce, files to write (with their HMAC), what we hold."""
        nonce, site = new_nonce(), self.sites.get(node)
        push, held, mac = {}, None, None
        if site is not None and site in self.status:
            push, held = self._push_plan(site, self.status[site]), self._held(site)
            if push:
                mac = relay_mac(self.keys[site], "push", nonce, site, {"files": _digests(push)})
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

    def handle_reply(self, node: int, site: str, status: dict, files: dict[str, bytes], mac: str) -> list[str]:
        """Check a node's reply (its site's HMAC over our nonce) and write the files it brought."""
        nonce, expected_site = self.pending.pop(node, (None, None))
        if nonce is None:
            return []
        if site not in self.keys:
            self.refuse(node, f"claims unknown site {site!r}")
            return []
        if not (isinstance(mac, str) and hmac.compare_digest(
                relay_mac(self.keys[site], "reply", nonce, site, {"status": status, "files": _digests(files)}),
                mac)):
            self.refuse(node, f"reply for site {site!r} without a valid HMAC of that site's key")
            return []
        if expected_site is not None and site != expected_site:
            self.refuse(node, f"was site {expected_site!r}, now claims {site!r}")
            return []
        if expected_site is None and files:
            self.refuse(node, f"site {site!r} sent files before it was known")
            return []
        allowed = pullable(site)
        foreign = sorted(n for n in files if not allowed.match(n) or ".." in n.split("/"))
        if foreign:
            self.refuse(node, f"site {site!r} sent files that are not its own to send: {foreign[:3]}")
            return []
        if node not in self.sites:
            self.log(f"relay: node {node} is site {site}")
        self.refused.pop(node, None)
        self.sites[node] = site
        self.status[site] = status
        self.bytes_pulled += sum(len(v) for v in files.values())
        written = _write_files(self.fed, files, allowed,
                               overwrite=lambda name: name == fingerprint_name(site))  # updates: first one only
        for name in written:
            self.log(f"relay: received {name} from site {site} ({len(files[name]):,} bytes)")
        return written

    def finished(self) -> bool:
        """The last round's global model is at the coordinator and every site holds it."""
        if not (self.fed / global_names(self.rounds)[1]).exists():
            return False
        sites = set(self.keys)
        return all(self.rounds in self.status.get(s, {}).get("globals", []) for s in sites)
