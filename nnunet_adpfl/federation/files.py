"""The federation's shared-folder protocol (DESIGN.md section 4).

Layout of the shared folder::

    federation.json                        sites, rounds, epochs per round, mode, plans digest, id
    plans/nnUNetPlans.json, dataset.json   the one plan every site uses
    round_0000/global.safetensors + .json  initial model (manifest signed for every site)
    round_R/updates/<site>.safetensors + <site>.json   a site's update (manifest signed with its key)
    round_R/global.safetensors + global.json            the aggregate of round R
    round_R/rejections.jsonl               every rejected file with its reason

Tensors travel as safetensors (never pickle). Every file is written under a temporary name in the same folder,
fsynced and renamed; a manifest is written after its tensors, so a manifest's presence means both are complete.
HMAC-SHA256 over the canonical JSON of a manifest (without its MAC fields) with a per-site key: a site's
update carries its HMAC; a global carries one HMAC per site, so no site can forge a global for the others.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from ..common.atomic import write_bytes_atomic, write_json_atomic  # noqa: F401  (re-exported: the protocol's file API)
from ..common.tensors import tensors_to_bytes

FEDERATION_FILE = "federation.json"
MAC_FIELDS = ("hmac", "hmacs")


class Rejected(Exception):
    """A file in the shared folder failed a check; ``reason`` says which."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---- paths -------------------------------------------------------------------------------------------
def round_dir(fed: Path, r: int) -> Path:
    return Path(fed) / f"round_{r:04d}"


def update_paths(fed: Path, r: int, site: str) -> tuple[Path, Path]:
    d = round_dir(fed, r) / "updates"
    return d / f"{site}.safetensors", d / f"{site}.json"


def global_paths(fed: Path, r: int) -> tuple[Path, Path]:
    d = round_dir(fed, r)
    return d / "global.safetensors", d / "global.json"


# ---- files -----------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- keys and MACs -----------------------------------------------------------------------------------
def generate_key() -> str:
    return secrets.token_hex(32)


def load_key(path: str | Path) -> bytes:
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"key file {path} does not exist") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"key file {path} must hold a hex key (as written by 'nnunet-adpfl federation init')") \
            from None
    if len(key) < 16:
        raise ValueError(f"key in {path} is too short ({len(key)} bytes)")
    return key


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k not in MAC_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def mac(key: bytes, manifest: dict) -> str:
    return hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()


def mac_ok(key: bytes, manifest: dict, value: str | None) -> bool:
    return isinstance(value, str) and hmac.compare_digest(mac(key, manifest), value)


# ---- tensors -----------------------------------------------------------------------------------------
def tensor_spec(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}


def signed_by_site(key: bytes):
    """Signer for a site's update: one HMAC with the site's key."""
    return lambda manifest: {"hmac": mac(key, manifest)}


def signed_for_sites(site_keys: dict[str, bytes]):
    """Signer for a global model: one HMAC per site, each with that site's key."""
    return lambda manifest: {"hmacs": {site: mac(k, manifest) for site, k in sorted(site_keys.items())}}


def write_tensors_with_manifest(tensor_path: Path, manifest_path: Path, tensors: dict[str, torch.Tensor],
                                manifest: dict, signer) -> dict:
    """Write tensors, then the manifest (with sha256, size and MACs): the manifest appears last."""
    data = tensors_to_bytes(tensors)
    write_bytes_atomic(tensor_path, data)
    manifest = {**manifest, "file": tensor_path.name, "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data), "created": now()}
    manifest.update(signer(manifest))
    write_json_atomic(manifest_path, manifest)
    return manifest


def read_verified_tensors(tensor_path: Path, manifest: dict, spec: dict[str, tuple] | None) -> dict:
    """Load tensors named by a (MAC-checked) manifest, checking size, sha256, keys/shapes/dtypes, finiteness."""
    try:
        data = tensor_path.read_bytes()
    except FileNotFoundError:
        raise Rejected(f"tensor file {tensor_path.name} is missing") from None
    if len(data) != manifest.get("bytes"):
        raise Rejected(f"truncated or altered file: {len(data)} bytes, manifest says {manifest.get('bytes')}")
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise Rejected("sha256 of the tensor file does not match the manifest")
    try:
        tensors = st_load(data)
    except (SafetensorError, Exception) as e:  # malformed header or payload
        raise Rejected(f"not a valid safetensors file: {e}") from None
    if spec is not None:
        _checked(tensors, spec)
    nonfinite = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise Rejected(f"NaN/Inf in {nonfinite[:3]}")
    return tensors


def read_update(fed: Path, r: int, site: str, federation_id: str, site_keys: dict[str, bytes],
                spec: dict[str, tuple]) -> tuple[dict, dict]:
    """A site's update for round r, fully checked; raises Rejected with the reason otherwise."""
    tensor_path, manifest_path = update_paths(fed, r, site)
    if site not in site_keys:
        raise Rejected(f"unknown site {site!r}")
    try:
        manifest = read_json(manifest_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Rejected(f"manifest is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise Rejected("manifest is not a JSON object")
    if not mac_ok(site_keys[site], manifest, manifest.get("hmac")):
        raise Rejected("bad HMAC (wrong key or altered manifest)")
    if manifest.get("federation") != federation_id:
        raise Rejected(f"update belongs to another federation ({manifest.get('federation')!r})")
    if manifest.get("site") != site or manifest.get("kind") != "update":
        raise Rejected(f"manifest names site {manifest.get('site')!r} / kind {manifest.get('kind')!r}")
    if manifest.get("round") != r:
        raise Rejected(f"wrong round: manifest says {manifest.get('round')!r}, folder is round {r} (replay?)")
    cases = manifest.get("num_cases")
    if not isinstance(cases, int) or isinstance(cases, bool) or cases < 1:
        raise Rejected(f"num_cases must be a positive integer, got {cases!r}")
    if manifest.get("file") != tensor_path.name:
        raise Rejected(f"manifest names file {manifest.get('file')!r}, expected {tensor_path.name!r}")
    subset = manifest.get("subset", False)
    if subset not in (True, False):
        raise Rejected(f"subset must be true or false, got {subset!r}")
    if manifest.get("encoding") not in (None, "topk"):
        raise Rejected(f"unknown encoding {manifest.get('encoding')!r}")
    stored = read_verified_tensors(tensor_path, manifest, None)
    if subset and not stored:
        raise Rejected("subset update holds no tensors")
    if manifest.get("encoding") == "topk":
        sent = {k.rsplit("::", 1)[0] for k in stored}
        return manifest, _decode_topk(stored, {k: v for k, v in spec.items() if k in sent} if subset else spec, spec)
    return manifest, _zero_filled(_checked(stored, {k: v for k, v in spec.items() if k in stored} if subset else spec),
                                  spec)


def _checked(tensors: dict, spec: dict[str, tuple]) -> dict:
    """``tensors`` must have exactly the names, shapes and dtypes of ``spec``."""
    got = tensor_spec(tensors)
    if set(got) != set(spec):
        missing, extra = sorted(set(spec) - set(got)), sorted(set(got) - set(spec))
        raise Rejected(f"wrong tensor names: missing {missing[:5]}, unexpected {extra[:5]}")
    bad = [k for k in spec if tuple(got[k][0]) != tuple(spec[k][0]) or got[k][1] != spec[k][1]]
    if bad:
        k = bad[0]
        raise Rejected(f"wrong shape/dtype for {k}: {got[k]} instead of {spec[k]} ({len(bad)} tensors)")
    return tensors


_DTYPES = {"torch.int64": torch.int64, "torch.int32": torch.int32, "torch.bool": torch.bool}


def _zero_filled(tensors: dict, spec: dict[str, tuple]) -> dict:
    """A dense update over the whole model: tensors not sent (frozen or never encoded) are zero."""
    out = dict(tensors)
    for k, (shape, dtype) in spec.items():
        if k not in out:
            out[k] = torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch."), None)
                                 if "float" in dtype else _DTYPES.get(dtype, torch.int64))
    return out


def _decode_topk(encoded: dict, sent: dict[str, tuple], spec: dict[str, tuple]) -> dict:
    """Dense update from a top-k (indices + values) encoding of the tensors ``sent``, checked against the model;
    the others (non-float, or frozen ones of a subset update) are zero."""
    from ..privacy.sparsify import topk_decode

    try:
        dense = topk_decode(encoded, {k: v for k, v in sent.items() if "float" in v[1]})
    except ValueError as e:
        raise Rejected(f"bad top-k encoding: {e}") from None
    return _zero_filled(dense, spec)


def read_global(fed: Path, r: int, federation_id: str, site: str, key: bytes,
                spec: dict[str, tuple] | None = None) -> tuple[dict, dict]:
    """The global model of round r as seen by ``site`` (its own HMAC entry checked)."""
    tensor_path, manifest_path = global_paths(fed, r)
    manifest = read_json(manifest_path)
    if not mac_ok(key, manifest, (manifest.get("hmacs") or {}).get(site)):
        raise Rejected(f"global model of round {r}: bad or missing HMAC for site {site!r}")
    if manifest.get("federation") != federation_id or manifest.get("round") != r or manifest.get("kind") != "global":
        raise Rejected(f"global model of round {r}: manifest is for federation {manifest.get('federation')!r}, "
                       f"round {manifest.get('round')!r}")
    return manifest, read_verified_tensors(tensor_path, manifest, spec)


def stored_global(fed: Path, r: int) -> dict:
    """The global model of round r as stored (size and sha256 checked against its manifest): the coordinator's view
    and tools'; a site uses ``read_global``, which also checks the site's HMAC."""
    tensor_path, manifest_path = global_paths(fed, r)
    return read_verified_tensors(tensor_path, read_json(manifest_path), None)


def log_rejection(fed: Path, r: int, site: str, reason: str) -> None:
    """Append-only record of rejections (one JSON object per line)."""
    path = round_dir(fed, r) / "rejections.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": now(), "site": site, "reason": reason}) + "\n")
        f.flush()
        os.fsync(f.fileno())
