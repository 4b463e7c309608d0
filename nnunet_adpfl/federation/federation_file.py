"""federation.json and plans/: the federation's settings and plan, signed by the coordinator.

federation.json carries one HMAC per site (``hmacs``, over its canonical JSON without the MAC fields), made with
that site's key: the aggregator (which holds every key) checks all of them whenever it starts, a site checks its
own. The plan files are covered through their sha256 in the signed ``plan_files`` (and the plans' digest in
``plans_sha256``). So someone who can write the folder but holds no key cannot change a setting, add a site, or
swap the plan; a site, holding one key, can forge the file only for itself.

Every field is checked at every load (types, ranges, site ids against ``files.SITE_ID``), and key files are read
only from ``<keys_dir>/<site id>.key``.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

from . import files as ff
from .names import PLAN_FILES, PLANS_FOLDER
from .released import check_decay
from ..common.safe_io import UnsafeInput, loads_json, read_file

MODES = ("npfl", "dpfl", "adpfl")
MAX_PLAN_FILE_BYTES = 16 << 20
DEFAULT_NORM_RATIO = 10.0
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class FederationFileError(ValueError):
    """federation.json or a plan file is missing a field, malformed, or fails its HMAC."""


def federation_path(fed: Path) -> Path:
    return Path(fed) / ff.FEDERATION_FILE


def plans_folder(fed: Path) -> Path:
    return Path(fed) / PLANS_FOLDER


def write_federation(fed: Path, cfg: dict, site_keys: dict[str, bytes]) -> dict:
    """Sign ``cfg`` for every site and write it (atomically, inside ``fed``); returns the signed content."""
    body = {k: v for k, v in cfg.items() if k not in ff.MAC_FIELDS}
    check_federation(body, federation_path(fed))
    if set(site_keys) != set(body["sites"]):
        raise ValueError(f"keys for {sorted(site_keys)} cannot sign a federation of {body['sites']}")
    signed = {**body, **ff.signed_for_sites(site_keys)(body)}
    ff.write_json_in(fed, federation_path(fed), signed)
    return signed


def _int(cfg: dict, name: str, low: int, high: int, optional: bool = False):
    value = cfg.get(name)
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FederationFileError(f"{name} must be an integer in {low}..{high}, got {str(value)[:40]!r}")


def check_federation(cfg: dict, path: Path) -> dict:
    """Every field of a federation.json, or FederationFileError naming ``path`` and the field."""
    try:
        if not isinstance(cfg, dict):
            raise FederationFileError("not a JSON object")
        missing = {"id", "sites", "rounds", "epochs_per_round", "mode", "configuration", "quorum"} - set(cfg)
        if missing:
            raise FederationFileError(f"lacks {sorted(missing)}")
        if not isinstance(cfg["id"], str) or not 0 < len(cfg["id"]) <= 100:
            raise FederationFileError("id must be a string")
        sites = cfg["sites"]
        if not isinstance(sites, list) or not 1 <= len(sites) <= 1000 or len(set(map(str, sites))) != len(sites):
            raise FederationFileError("sites must be a list of 1 to 1000 distinct site ids")
        for site in sites:
            ff.check_site_id(site)
        _int(cfg, "rounds", 1, 9999)
        _int(cfg, "epochs_per_round", 1, 10 ** 6)
        _int(cfg, "iterations_per_epoch", 1, 10 ** 9, optional=True)
        _int(cfg, "quorum", 1, len(sites))
        _int(cfg, "seed", -2 ** 63, 2 ** 64, optional=True)
        if cfg["mode"] not in MODES:
            raise FederationFileError(f"mode must be one of {MODES}, got {str(cfg['mode'])[:40]!r}")
        if not isinstance(cfg["configuration"], str) or not _NAME.fullmatch(cfg["configuration"]):
            raise FederationFileError(f"configuration {str(cfg['configuration'])[:40]!r} is not a configuration name")
        for name, low in (("round_timeout_s", 0.0), ("max_update_norm_ratio", 1.0)):
            value = cfg.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or
                                      not math.isfinite(value) or value < low):
                raise FederationFileError(f"{name} must be a number >= {low} or null, got {str(value)[:40]!r}")
        if cfg.get("plans_sha256") is not None and not _HEX64.fullmatch(str(cfg["plans_sha256"])):
            raise FederationFileError("plans_sha256 must be a sha256 hex digest")
        files = cfg.get("plan_files")
        if files is not None and (not isinstance(files, dict) or set(files) != set(PLAN_FILES) or
                                  not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in files.values())):
            raise FederationFileError(f"plan_files must map {list(PLAN_FILES)} to sha256 hex digests")
        weights = cfg.get("initial_weights")
        if weights is not None and not (isinstance(weights, dict) and isinstance(weights.get("file"), str) and
                                        _HEX64.fullmatch(str(weights.get("sha256")))):
            raise FederationFileError("initial_weights must name a file and its sha256")
        check_decay(cfg.get("release_ema_decay"))
    except ValueError as e:
        raise FederationFileError(f"{path}: {e}") from None
    return cfg


def load_federation(fed: Path) -> dict:
    """federation.json with every field checked, NOT yet authenticated (``open_federation`` at the coordinator,
    ``site_federation`` at a site also check its HMACs)."""
    path = federation_path(fed)
    try:
        cfg = ff.read_manifest(Path(fed), path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: is {fed} a federation folder ('nnunet-adpfl federation init')?") \
            from None
    except ff.Rejected as e:
        raise FederationFileError(f"{path}: {e.reason}") from None
    return check_federation(cfg, path)


def load_site_keys(keys_dir: Path, sites: list[str]) -> dict[str, bytes]:
    """Each site's key, read from ``<keys_dir>/<site>.key`` only (site ids are checked first)."""
    return {ff.check_site_id(site): ff.load_key(Path(keys_dir) / f"{site}.key") for site in sites}


def open_federation(fed: Path, keys_dir: Path) -> tuple[dict, dict[str, bytes]]:
    """The coordinator's view: federation.json checked with every site's HMAC, and the site keys."""
    cfg = load_federation(fed)
    try:
        keys = load_site_keys(keys_dir, cfg["sites"])
    except FileNotFoundError as e:  # a site added to federation.json by someone without the coordinator's keys
        raise FederationFileError(f"{federation_path(fed)} names a site whose key is not in {keys_dir} ({e}): it was "
                                  "altered or not written by this coordinator") from None
    if not ff.macs_ok(keys, cfg):
        raise FederationFileError(f"{federation_path(fed)} does not carry a valid HMAC for every site: it was "
                                  "altered or not written by the coordinator (restore it, or re-create the federation)")
    return cfg, keys


def site_federation(fed: Path, site: str, key: bytes) -> dict:
    """A site's view: federation.json checked with the site's own HMAC; the site must be one of its sites."""
    cfg = load_federation(fed)
    if site not in cfg["sites"]:
        raise FederationFileError(f"site {str(site)[:80]!r} is not a site of the federation in {fed} "
                                  f"({cfg['sites']})")
    macs = cfg.get("hmacs")
    if not ff.mac_ok(key, cfg, macs.get(site) if isinstance(macs, dict) else None):
        raise FederationFileError(f"{federation_path(fed)} fails the HMAC of site {site} (wrong key, or the file was "
                                  "altered or not written by the coordinator)")
    return cfg


# ---- the plan ----------------------------------------------------------------------------------------
def _plan_file_bytes(fed: Path, name: str) -> bytes:
    path = plans_folder(fed) / name
    try:
        return read_file(path, MAX_PLAN_FILE_BYTES, root=fed)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} missing: create the federation plan first ('nnunet-adpfl plan')") from None
    except UnsafeInput as e:
        raise FederationFileError(f"{path}: {e.reason}") from None


def read_plan_bytes(fed: Path, digests: dict[str, str] | None = None) -> dict[str, bytes]:
    """Each plan file's bytes, read once (whatever is checked is what is used); checked against ``digests``, the
    signed sha256 by name, if given."""
    out = {}
    for name in PLAN_FILES:
        out[name] = _plan_file_bytes(fed, name)
        if digests is not None and hashlib.sha256(out[name]).hexdigest() != digests[name]:
            raise FederationFileError(f"{plans_folder(fed) / name} differs from the plan the coordinator signed "
                                      "(sha256 mismatch)")
    return out


def plan_json(fed: Path, name: str, data: bytes) -> dict:
    """A plan file's bytes as a JSON object (bounded size and depth, finite numbers)."""
    try:
        content = loads_json(data, MAX_PLAN_FILE_BYTES)
    except UnsafeInput as e:
        raise FederationFileError(f"{plans_folder(fed) / name}: {e.reason}") from None
    if not isinstance(content, dict):
        raise FederationFileError(f"{plans_folder(fed) / name} is not a JSON object")
    return content


def read_plan_files(fed: Path, cfg: dict) -> dict[str, dict]:
    """The plan files (by name), each checked against its sha256 in the (authenticated) ``cfg``."""
    digests = cfg.get("plan_files")
    if digests is None:
        raise FileNotFoundError(f"the federation in {fed} has no plan yet ('nnunet-adpfl plan')")
    return {name: plan_json(fed, name, data) for name, data in read_plan_bytes(fed, digests).items()}


def write_plan_files(fed: Path, contents: dict[str, bytes]) -> dict[str, str]:
    """Write the plan files into ``fed/plans``; returns the sha256 of the bytes written, for ``sign_plan``."""
    for name, data in contents.items():
        ff.write_bytes_in(fed, plans_folder(fed) / name, data)
    return plan_digests(contents)


def plan_digests(contents: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}


def sign_plan(fed: Path, keys_dir: Path, plans_sha256: str, plan_files: dict[str, str]) -> dict:
    """Record the plan in federation.json, signed: the plans' digest and ``plan_files``, the sha256 of the plan
    files as the coordinator wrote or checked them (never read again from the shared folder)."""
    cfg, keys = open_federation(fed, keys_dir)
    return write_federation(fed, {**cfg, "plans_sha256": plans_sha256, "plan_files": dict(plan_files)}, keys)


def adopt_plan(fed: Path, keys_dir: Path, planned_fed: Path) -> dict:
    """Give a new federation the plan of ``planned_fed`` (same coordinator and keys): its files, checked against
    its signed federation.json, copied into ``fed/plans`` (the bytes checked), and recorded in ``fed``'s signed
    federation.json."""
    planned_cfg, _ = open_federation(planned_fed, keys_dir)
    if planned_cfg.get("plan_files") is None:
        raise FileNotFoundError(f"the federation in {planned_fed} has no plan yet ('nnunet-adpfl plan')")
    data = read_plan_bytes(planned_fed, planned_cfg["plan_files"])
    return sign_plan(fed, keys_dir, planned_cfg["plans_sha256"], write_plan_files(fed, data))
