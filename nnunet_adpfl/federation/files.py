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

Everything in the folder may have been written by someone without a key: every read goes through
``common.safe_io`` (regular files only, no symlink followed, bounded sizes, strict JSON) and every failure is a
``Rejected`` with its reason; every write goes through ``common.atomic.write_bytes_in`` (confined to the folder,
no symlink followed).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from ..common.atomic import append_line_in, write_bytes_atomic, write_bytes_in, write_json_atomic  # noqa: F401
from ..common.safe_io import UnsafeInput, loads_json, read_file, read_json_file
from ..common.tensors import tensors_to_bytes
from .keys import load_key  # noqa: F401  (ff.load_key)
from .names import FEDERATION_FILE  # noqa: F401  (ff.FEDERATION_FILE)

MAC_FIELDS = ("hmac", "hmacs")
SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # every site id, checked with fullmatch at every load
MAX_MANIFEST_BYTES = 4 << 20
MAX_CASES = 10 ** 9  # a site's num_cases: the global's sum stays a small integer


class Rejected(UnsafeInput):
    """A file in the shared folder failed a check; ``reason`` says which."""


# ---- paths -------------------------------------------------------------------------------------------
def check_site_id(site) -> str:
    if not isinstance(site, str) or not SITE_ID.fullmatch(site):
        raise ValueError(f"site id {str(site)[:80]!r} is not 1-64 letters, digits, '-' or '_' (starting with a "
                         "letter or digit)")
    return site


def round_dir(fed: Path, r: int) -> Path:
    if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= 9999:
        raise ValueError(f"round must be an integer in 0..9999, got {r!r}")
    return Path(fed) / f"round_{r:04d}"


def update_paths(fed: Path, r: int, site: str) -> tuple[Path, Path]:
    d = round_dir(fed, r) / "updates"
    check_site_id(site)
    return d / f"{site}.safetensors", d / f"{site}.json"


def global_paths(fed: Path, r: int) -> tuple[Path, Path]:
    d = round_dir(fed, r)
    return d / "global.safetensors", d / "global.json"


# ---- files -----------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """A JSON file this party wrote itself or a tool reads (no checks); for the shared folder: read_manifest."""
    with open(path) as f:
        return json.load(f)


def read_manifest(fed: Path, path: Path, max_bytes: int = MAX_MANIFEST_BYTES) -> dict:
    """A JSON object from the shared folder: regular file below ``fed`` reached without a symlink, bounded size and
    depth, finite numbers only. FileNotFoundError if absent; Rejected (with the reason) for anything else."""
    try:
        content = read_json_file(path, root=fed, max_bytes=max_bytes)
    except UnsafeInput as e:
        raise Rejected(e.reason) from None
    if not isinstance(content, dict):
        raise Rejected(f"{Path(path).name} is not a JSON object")
    return content


def exists(path: Path) -> bool:
    """Whether something (even a dangling symlink) is at ``path``: such entries are judged, not skipped."""
    return os.path.lexists(path)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- keys and MACs -----------------------------------------------------------------------------------
def generate_key() -> str:
    return secrets.token_hex(32)


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k not in MAC_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def mac(key: bytes, manifest: dict) -> str:
    return hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()


def mac_ok(key: bytes, manifest: dict, value: str | None) -> bool:
    if not isinstance(value, str) or not isinstance(manifest, dict):
        return False
    try:
        expected = mac(key, manifest)
    except (TypeError, ValueError, RecursionError):  # not JSON-serialisable: nobody signed it
        return False
    return hmac.compare_digest(expected, value)


def macs_ok(site_keys: dict[str, bytes], content: dict) -> bool:
    """Every site's HMAC in ``content['hmacs']`` verifies (what the coordinator signs for all sites)."""
    macs = content.get("hmacs") if isinstance(content, dict) else None
    return isinstance(macs, dict) and set(macs) == set(site_keys) and bool(site_keys) and \
        all(mac_ok(key, content, macs.get(site)) for site, key in site_keys.items())


# ---- tensors -----------------------------------------------------------------------------------------
def tensor_spec(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}


def max_tensor_bytes(spec: dict[str, tuple]) -> int:
    """The largest tensor file a model of this spec can need: dense, or top-k (int64 index + value per entry,
    at most every entry), plus the safetensors header."""
    dense = sum(torch.Size(shape).numel() * _itemsize(dtype) for shape, dtype in spec.values())
    return 3 * dense + sum(2 * len(k) + 400 for k in spec) + 65536


def _itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype.removeprefix("torch."), torch.float64)).element_size()


def signed_by_site(key: bytes):
    """Signer for a site's update: one HMAC with the site's key."""
    return lambda manifest: {"hmac": mac(key, manifest)}


def signed_for_sites(site_keys: dict[str, bytes]):
    """Signer for a global model: one HMAC per site, each with that site's key."""
    return lambda manifest: {"hmacs": {site: mac(k, manifest) for site, k in sorted(site_keys.items())}}


def write_json_in(fed: Path, path: Path, content: dict) -> None:
    """JSON written atomically inside the federation folder ``fed``, no symlink followed."""
    write_bytes_in(fed, path, json.dumps(content, indent=2, allow_nan=False).encode())


def write_tensors_with_manifest(tensor_path: Path, manifest_path: Path, tensors: dict[str, torch.Tensor],
                                manifest: dict, signer, fed: Path) -> dict:
    """Write tensors, then the manifest (with sha256, size and MACs): the manifest appears last. Both inside the
    federation folder ``fed``, never through a symlink. A manifest that ``read_manifest`` would refuse is never
    written (ValueError, before anything is)."""
    data = tensors_to_bytes(tensors)
    manifest = {**manifest, "file": tensor_path.name, "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data), "created": now()}
    manifest.update(signer(manifest))
    text = json.dumps(manifest, indent=2, allow_nan=False).encode()
    try:
        loads_json(text, MAX_MANIFEST_BYTES)
    except UnsafeInput as e:  # a plain ValueError: a bug to stop at, not a folder problem to retry
        raise ValueError(f"{manifest_path.name} not written: its readers would refuse it ({e.reason})") from None
    write_bytes_in(fed, tensor_path, data)
    write_bytes_in(fed, manifest_path, text)
    return manifest


def read_verified_tensors(tensor_path: Path, manifest: dict, spec: dict[str, tuple] | None,
                          root: Path | None = None, max_bytes: int | None = None) -> dict:
    """Load tensors named by a (MAC-checked) manifest, checking size, sha256, keys/shapes/dtypes, finiteness.
    The file is read only up to the manifest's size, and at most ``max_bytes`` (what the model can need), from a
    regular file reached without a symlink below ``root``."""
    size = manifest.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise Rejected(f"manifest gives no valid size ({str(size)[:40]!r})")
    if max_bytes is not None and size > max_bytes:
        raise Rejected(f"manifest claims {size} bytes, more than the {max_bytes} this model can need")
    try:
        data = read_file(tensor_path, size, root)
    except FileNotFoundError:
        raise Rejected(f"tensor file {tensor_path.name} is missing") from None
    except UnsafeInput as e:
        raise Rejected(f"truncated or altered file: {e.reason}") from None
    if len(data) != size:
        raise Rejected(f"truncated or altered file: {len(data)} bytes, manifest says {size}")
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
                spec: dict[str, tuple]) -> tuple[dict, dict, set[str] | None]:
    """A site's update for round r, fully checked: (manifest, the dense update, the tensors a subset update holds,
    i.e. those the site trained; None: all). Tensors a subset update leaves out are zero in the dense update.
    Raises Rejected with the reason otherwise."""
    if site not in site_keys:
        raise Rejected(f"unknown site {str(site)[:80]!r}")
    tensor_path, manifest_path = update_paths(fed, r, site)
    try:
        manifest = read_manifest(fed, manifest_path)
    except FileNotFoundError:
        raise Rejected("manifest is missing") from None
    if not mac_ok(site_keys[site], manifest, manifest.get("hmac")):
        raise Rejected("bad HMAC (wrong key or altered manifest)")
    if manifest.get("federation") != federation_id:
        raise Rejected(f"update belongs to another federation ({str(manifest.get('federation'))[:80]!r})")
    if manifest.get("site") != site or manifest.get("kind") != "update":
        raise Rejected(f"manifest names site {str(manifest.get('site'))[:80]!r} / kind "
                       f"{str(manifest.get('kind'))[:40]!r}")
    if manifest.get("round") != r:
        raise Rejected(f"wrong round: manifest says {str(manifest.get('round'))[:40]!r}, folder is round {r} "
                       "(replay?)")
    _check_copied_fields(manifest)
    if manifest.get("file") != tensor_path.name:
        raise Rejected(f"manifest names file {manifest.get('file')!r}, expected {tensor_path.name!r}")
    subset = manifest.get("subset", False)
    if subset not in (True, False):
        raise Rejected(f"subset must be true or false, got {subset!r}")
    if manifest.get("encoding") not in (None, "topk"):
        raise Rejected(f"unknown encoding {manifest.get('encoding')!r}")
    stored = read_verified_tensors(tensor_path, manifest, None, fed, max_tensor_bytes(spec))
    sent = {k.rsplit("::", 1)[0] for k in stored} if manifest.get("encoding") == "topk" else set(stored)
    if subset and not any("float" in spec[k][1] for k in sent & set(spec)):  # nothing the average could use
        raise Rejected("subset update holds no tensors to aggregate (no float tensor of the model)")
    trained = sent if subset else None
    if manifest.get("encoding") == "topk":
        dense = _decode_topk(stored, {k: v for k, v in spec.items() if k in sent} if subset else spec, spec)
    else:
        dense = _zero_filled(_checked(stored, {k: v for k, v in spec.items() if k in stored} if subset else spec),
                             spec)
    return manifest, dense, trained


def _check_copied_fields(manifest: dict) -> None:
    """The fields the global copies (its num_cases sum, epsilon_by_site) must keep it small enough for readers."""
    cases, epsilon = manifest.get("num_cases"), manifest.get("epsilon")
    if not isinstance(cases, int) or isinstance(cases, bool) or not 1 <= cases <= MAX_CASES:
        raise Rejected(f"num_cases must be an integer in 1..{MAX_CASES}, got {str(cases)[:80]!r}")
    if epsilon is not None and (not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool)
                                or not 0 <= epsilon < math.inf):
        raise Rejected(f"epsilon must be a finite number >= 0 or absent, got {str(epsilon)[:80]!r}")


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


def check_global_manifest(manifest: dict, r: int, federation_id: str) -> None:
    if manifest.get("federation") != federation_id or manifest.get("round") != r or manifest.get("kind") != "global":
        raise Rejected(f"global model of round {r}: manifest is for federation "
                       f"{str(manifest.get('federation'))[:80]!r}, round {str(manifest.get('round'))[:40]!r}")


def read_global(fed: Path, r: int, federation_id: str, site: str, key: bytes,
                spec: dict[str, tuple] | None = None) -> tuple[dict, dict]:
    """The global model of round r as seen by ``site`` (its own HMAC entry checked). FileNotFoundError while the
    manifest is absent; Rejected for anything else that fails a check."""
    tensor_path, manifest_path = global_paths(fed, r)
    manifest = read_manifest(fed, manifest_path)
    macs = manifest.get("hmacs")
    if not mac_ok(key, manifest, macs.get(site) if isinstance(macs, dict) else None):
        raise Rejected(f"global model of round {r}: bad or missing HMAC for site {site!r}")
    check_global_manifest(manifest, r, federation_id)
    return manifest, read_verified_tensors(tensor_path, manifest, spec, fed,
                                           None if spec is None else max_tensor_bytes(spec))


def own_global_manifest(fed: Path, r: int, federation_id: str, site_keys: dict[str, bytes]) -> dict:
    """The aggregator's check of a global it wrote (after a restart): every site's HMAC, federation and round.
    FileNotFoundError while absent; Rejected otherwise."""
    manifest = read_manifest(fed, global_paths(fed, r)[1])
    if not macs_ok(site_keys, manifest):
        raise Rejected(f"global model of round {r} does not carry the aggregator's HMACs (altered or forged)")
    check_global_manifest(manifest, r, federation_id)
    return manifest


def read_own_global(fed: Path, r: int, federation_id: str, site_keys: dict[str, bytes]) -> dict:
    """The tensors of a global the aggregator wrote, every check of ``own_global_manifest`` plus sha256."""
    manifest = own_global_manifest(fed, r, federation_id, site_keys)
    return read_verified_tensors(global_paths(fed, r)[0], manifest, None, fed)


def stored_global(fed: Path, r: int) -> dict:
    """The global model of round r as stored (size and sha256 checked against its manifest): for tools and tests;
    the aggregator uses ``read_own_global``, a site ``read_global`` (both check HMACs)."""
    tensor_path, manifest_path = global_paths(fed, r)
    return read_verified_tensors(tensor_path, read_manifest(fed, manifest_path), None, fed)


def log_rejection(fed: Path, r: int, site: str, reason: str) -> str | None:
    """Append-only record of rejections (one JSON object per line), never written through a symlink. Returns
    why the record could not be written (the caller logs it), else None."""
    line = json.dumps({"time": now(), "site": str(site)[:100], "reason": str(reason)[:2000]}) + "\n"
    try:
        append_line_in(fed, round_dir(fed, r) / "rejections.jsonl", line)
    except (UnsafeInput, OSError) as e:
        return f"rejections.jsonl of round {r} not written: {getattr(e, 'reason', e)}"
    return None
