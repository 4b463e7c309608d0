"""Federation set-up and the aggregator (restartable from the shared folder alone).

The aggregator trusts nothing in the folder that it cannot authenticate: federation.json and the plan are checked
with every site's HMAC when it starts (``federation_file.open_federation``), a global model it finds (after a
restart) and a round's ``opened.json`` only count if they carry its HMACs, and every update is checked in full.
Anything that fails a check is logged in ``round_R/rejections.jsonl`` and skipped; nothing in the folder ends it.
"""
from __future__ import annotations

import math
import os
import stat
import time
import uuid
from pathlib import Path

import torch

from . import files as ff
from .federation_file import (DEFAULT_NORM_RATIO, MODES, check_federation, load_federation, load_site_keys,  # noqa: F401 (re-exported)
                              open_federation, read_plan_files, write_federation)
from .released import check_decay
from .restore import ClosedRoundAltered, aggregate_signed_sites, restore_global  # noqa: F401 (ClosedRoundAltered)
from .strategies import FedAvg
from ..common.atomic import remove_stale_temporaries
from ..common.safe_io import UnsafeInput
from ..common.initial_weights import describe_file, load_weights_file
from ..common.tensors import unique_state

RECLOSE_MAX_WAIT_S = 300.0  # the longest pause before a round whose global was refused is closed again
STALE_TEMPORARY_S = 3600.0  # temporaries older than this are from killed writers: removed when the aggregator starts
PLAN_WAIT_S = 60.0


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def create_federation(fed: Path, keys_dir: Path, sites: list[str], rounds: int, epochs_per_round: int,
                      mode: str, iterations_per_epoch: int | None = None, configuration: str = "3d_fullres",
                      quorum: int | None = None, round_timeout_s: float | None = None, seed: int = 0,
                      initial_weights: str | Path | None = None, release_ema_decay: float | None = None,
                      max_update_norm_ratio: float | None = DEFAULT_NORM_RATIO) -> dict:
    """Write federation.json into the shared folder and one key per site into ``keys_dir`` (keep it off the
    shared folder: the aggregator needs all keys, each site only its own). ``initial_weights``: public weights
    (an nnU-Net checkpoint or .safetensors, trained with the federation's plan) that become the round-0 model.
    ``release_ema_decay``: the sites' final model is the EMA of the global models (``released.py``), not the last one.
    ``max_update_norm_ratio``: an update whose L2 norm exceeds this multiple of the median norm of the round's
    updates is rejected (None: no bound). federation.json is signed with every site's key."""
    fed, keys_dir = Path(fed), Path(keys_dir)
    if (fed / ff.FEDERATION_FILE).exists():
        raise FileExistsError(f"{fed / ff.FEDERATION_FILE} exists already; use a new folder")
    if len(set(sites)) != len(sites) or not sites or not all(isinstance(s, str) and ff.SITE_ID.fullmatch(s)
                                                             for s in sites):
        raise ValueError(f"sites must be distinct names of 1-64 letters, digits, '-' or '_' (starting with a letter "
                         f"or digit), got {sites}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    quorum = len(sites) if quorum is None else quorum
    if not 1 <= quorum <= len(sites):
        raise ValueError(f"quorum must be between 1 and {len(sites)}, got {quorum}")
    if keys_dir.resolve() == fed.resolve() or fed.resolve() in keys_dir.resolve().parents:
        raise ValueError("keys_dir must not be inside the shared federation folder")
    cfg = {
        "format": 2, "id": str(uuid.uuid4()), "created": ff.now(), "sites": list(sites),
        "rounds": _positive_int("rounds", rounds), "epochs_per_round": _positive_int("epochs_per_round",
                                                                                      epochs_per_round),
        "iterations_per_epoch": None if iterations_per_epoch is None else _positive_int("iterations_per_epoch",
                                                                                         iterations_per_epoch),
        "mode": mode, "configuration": configuration, "quorum": quorum, "round_timeout_s": round_timeout_s,
        "seed": seed, "strategy": FedAvg.name, "plans_sha256": None,
        "initial_weights": None if initial_weights is None else describe_file(initial_weights),
        "release_ema_decay": check_decay(release_ema_decay), "max_update_norm_ratio": max_update_norm_ratio,
    }
    check_federation(cfg, fed / ff.FEDERATION_FILE)
    keys_dir.mkdir(parents=True, exist_ok=True)
    for site in sites:
        key_file = keys_dir / f"{site}.key"
        if not key_file.exists():
            ff.write_bytes_atomic(key_file, ff.generate_key().encode(), mode=0o600)
    fed.mkdir(parents=True, exist_ok=True)
    return write_federation(fed, cfg, load_site_keys(keys_dir, sites))


def plans_files(fed: Path) -> tuple[Path, Path]:
    return Path(fed) / "plans" / "nnUNetPlans.json", Path(fed) / "plans" / "dataset.json"


def build_network(plans: dict, dataset_json: dict, configuration: str) -> torch.nn.Module:
    """The network nnU-Net builds from the plan for training (deep supervision on), nnU-Net's initialisation."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import,
                                  determine_num_input_channels(pm, cm, dataset_json), heads, allow_init=True,
                                  deep_supervision=True)


def build_initial_model(plans: dict, dataset_json: dict, configuration: str, seed: int) -> dict[str, torch.Tensor]:
    """Initial weights of the federation's network, built from its plan with nnU-Net's initialisation."""
    torch.manual_seed(seed)
    net = build_network(plans, dataset_json, configuration)
    return {k: v.clone() for k, v in unique_state(net).items()}


class Aggregator:
    """Closes rounds: waits for every site (or, after the round timeout, a quorum), checks each update,
    aggregates with the strategy and writes the signed global model. Its state is the folder itself."""

    def __init__(self, fed: Path, keys_dir: Path, strategy=None, poll_interval: float = 2.0, log=print):
        self.fed, self.keys_dir = Path(fed), Path(keys_dir)
        self.cfg, self.keys = open_federation(self.fed, self.keys_dir)
        self.strategy = strategy or FedAvg()
        self.poll_interval = poll_interval
        self.log = log
        self.norm_ratio = self.cfg.get("max_update_norm_ratio", DEFAULT_NORM_RATIO)
        self._strays: set[tuple[int, str]] = set()
        for path in remove_stale_temporaries(self.fed, STALE_TEMPORARY_S):
            self.log(f"removed {path.relative_to(self.fed)}, a temporary file left by a killed writer")

    def reject(self, r: int, name: str, reason: str) -> None:
        """Log a rejected file (``name``: the site, or the file) in the round's rejections.jsonl and here."""
        self.log(f"round {r}: REJECTED {name[:100]!r}: {reason}")
        failure = ff.log_rejection(self.fed, r, name, reason)
        if failure:
            self.log(failure)

    def last_completed_round(self) -> int:
        """The last round whose global model carries this aggregator's HMACs (a forged one is logged and ignored:
        that round is closed again)."""
        r = 0
        while True:
            try:
                ff.own_global_manifest(self.fed, r + 1, self.cfg["id"], self.keys)
            except FileNotFoundError:
                return r
            except ff.Rejected as e:
                self.reject(r + 1, "global.json", e.reason)
                return r
            r += 1

    def ensure_initial_model(self) -> None:
        try:
            self._closed_global(0)
            return
        except FileNotFoundError:
            pass
        except ff.Rejected as e:
            self.reject(0, "global.json", f"{e.reason}; the initial model is written again")
        tensors, source = self._initial_model(), self.cfg.get("initial_weights")
        self._write_global(0, tensors, {"sites": [], "num_cases": 0, "initial_weights": source})
        self.log(f"round 0: initial model written ({sum(v.numel() for v in tensors.values()):,} parameters, "
                 f"{'from ' + source['file'] if source else 'random initialisation'})")

    def _initial_model(self) -> dict:
        files = read_plan_files(self.fed, self._with_plan())
        tensors = build_initial_model(files["nnUNetPlans.json"], files["dataset.json"], self.cfg["configuration"],
                                      self.cfg.get("seed", 0))
        source = self.cfg.get("initial_weights")
        return tensors if source is None else load_weights_file(source, tensors)

    def _closed_global(self, r: int) -> dict:
        """The tensors of global r, with every check of ``read_own_global``; Rejected if its manifest is not this
        aggregator's (the round is closed again). Tensors that fail the signed sha256 are restored bit-for-bit
        from the inputs the manifest names, or ClosedRoundAltered stops the aggregator (``restore.py``)."""
        manifest = ff.own_global_manifest(self.fed, r, self.cfg["id"], self.keys)
        try:
            return ff.read_verified_tensors(ff.global_paths(self.fed, r)[0], manifest, None, self.fed)
        except ff.Rejected as e:
            self.reject(r, "global", f"{e.reason}; rebuilding it from the inputs its signed manifest names")
        tensors = restore_global(self.fed, r, manifest, lambda: self._initial_model() if r == 0 else
                                 aggregate_signed_sites(self.fed, r, manifest, self._closed_global(r - 1),
                                                        self.cfg["id"], self.keys, self.strategy))
        self.log(f"round {r}: global model restored bit-for-bit (signed sha256 {manifest['sha256'][:12]}...)")
        return tensors

    def _with_plan(self) -> dict:
        """The federation's settings once they record a plan (the coordinator's 'plan' writes the plan files, then
        signs federation.json: waits up to PLAN_WAIT_S for the second step)."""
        end = time.time() + PLAN_WAIT_S
        while self.cfg.get("plan_files") is None and ff.exists(self.fed / "plans") and time.time() < end:
            time.sleep(min(self.poll_interval, 1.0))
            self.cfg, self.keys = open_federation(self.fed, self.keys_dir)
        return self.cfg

    def _write_global(self, r: int, tensors: dict, info: dict) -> dict:
        tensor_path, manifest_path = ff.global_paths(self.fed, r)
        manifest = {"kind": "global", "federation": self.cfg["id"], "round": r, "strategy": self.strategy.name,
                    **info}
        return ff.write_tensors_with_manifest(tensor_path, manifest_path, tensors, manifest,
                                              ff.signed_for_sites(self.keys), self.fed)

    def run(self, max_rounds: int | None = None) -> int:
        """Run until the last round (or ``max_rounds`` more rounds) is closed; returns the last closed round."""
        self.ensure_initial_model()
        r = self.last_completed_round()
        stop = self.cfg["rounds"] if max_rounds is None else min(self.cfg["rounds"], r + max_rounds)
        if r > 0:
            self.log(f"resuming after round {r} (found in {self.fed})")
        furthest, reclosed = r, 0
        while r < stop:
            try:
                self.run_round(r + 1)
                r += 1
                if r > furthest:
                    furthest, reclosed = r, 0
            except ff.Rejected as e:  # the global it builds on was altered after it was checked: close it again
                self.reject(r, "global", e.reason)
                reclosed += 1  # after a pause that doubles each time: never a busy loop
                time.sleep(min(self.poll_interval * 2 ** min(reclosed, 20), RECLOSE_MAX_WAIT_S))
                if r == 0:
                    self.ensure_initial_model()
                else:
                    r -= 1
            except (UnsafeInput, OSError) as e:  # e.g. a folder where the global must go: logged, tried again
                self.log(f"round {r + 1}: cannot write to the folder ({getattr(e, 'reason', e)}); trying again")
                time.sleep(self.poll_interval)
        return r

    def _opened_at(self, r: int) -> float:
        """When round r opened, from its opened.json if that carries this aggregator's HMACs, else now."""
        path = ff.round_dir(self.fed, r) / "opened.json"
        try:
            content = ff.read_manifest(self.fed, path)
            opened = content.get("opened")
            if not ff.macs_ok(self.keys, content) or content.get("round") != r or \
                    content.get("federation") != self.cfg["id"] or not isinstance(opened, (int, float)):
                raise ff.Rejected("opened.json does not carry the aggregator's HMACs for this round")
            return float(opened)
        except FileNotFoundError:
            pass
        except ff.Rejected as e:
            self.reject(r, "opened.json", f"{e.reason}; the round's timer starts now")
        content = {"kind": "opened", "federation": self.cfg["id"], "round": r, "opened": time.time()}
        content.update(ff.signed_for_sites(self.keys)(content))
        ff.write_json_in(self.fed, path, content)
        return content["opened"]

    def _judge(self, r: int, spec: dict, accepted: dict, norms: dict, judged: dict) -> None:
        for site in self.cfg["sites"]:
            if site in accepted:
                continue
            _, manifest_path = ff.update_paths(self.fed, r, site)
            try:
                st = os.lstat(manifest_path)
            except OSError:
                continue
            fingerprint = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)  # a new file is judged again
            if judged.get(site) == fingerprint:
                continue
            judged[site] = fingerprint
            try:
                manifest, delta, _ = ff.read_update(self.fed, r, site, self.cfg["id"], self.keys, spec)
            except ff.Rejected as e:
                self.reject(r, site, e.reason)
                continue
            except Exception as e:  # noqa: BLE001  (no input may end the aggregator)
                self.reject(r, site, f"could not be checked ({type(e).__name__}: {str(e)[:200]})")
                continue
            accepted[site], norms[site] = manifest, update_norm(delta)
            self.log(f"round {r}: accepted update of site {site} ({manifest['num_cases']} cases, "
                     f"{manifest['bytes'] / 1e6:.1f} MB, norm {norms[site]:.3g})")
        self._judge_strays(r)

    def _judge_strays(self, r: int) -> None:
        """Manifests from names that are not sites of the federation are logged once, never read further."""
        updates = ff.round_dir(self.fed, r) / "updates"
        try:
            is_folder = stat.S_ISDIR(os.lstat(updates).st_mode)
            names = os.listdir(updates) if is_folder else ["/"]  # "/": no file name, stands for the folder itself
        except OSError:
            return
        for name in names:
            stem = name.removesuffix(".json")
            if (r, name) in self._strays or name != "/" and (not name.endswith(".json") or stem in self.keys):
                continue
            self._strays.add((r, name))
            self.reject(r, "updates" if name == "/" else stem, "the updates folder is a symlink or a file (not "
                        "followed)" if name == "/" else f"unknown site {stem[:100]!r}")

    def _within_norm_bound(self, r: int, norms: dict[str, float]) -> list[str]:
        """The sites whose update norm is at most norm_ratio x the median (the lower one) of the round's norms."""
        if self.norm_ratio is None:
            return sorted(norms)
        median = sorted(norms.values())[(len(norms) - 1) // 2]
        kept = []
        for site in sorted(norms):
            if norms[site] > self.norm_ratio * median:
                self.reject(r, site, f"update norm {norms[site]:.3g} exceeds {self.norm_ratio:g} x the median "
                                     f"norm of the round's updates ({median:.3g})")
            else:
                kept.append(site)
        return kept

    def run_round(self, r: int) -> dict:
        previous = self._closed_global(r - 1)
        spec = ff.tensor_spec(previous)
        opened, timeout = self._opened_at(r), self.cfg.get("round_timeout_s")
        deadline = None if timeout is None else opened + timeout
        accepted, norms, judged, last_note = {}, {}, {}, 0.0
        sites = self.cfg["sites"]
        while True:
            self._judge(r, spec, accepted, norms, judged)
            closing = len(accepted) == len(sites) or (
                deadline is not None and time.time() >= deadline and len(accepted) >= self.cfg["quorum"])
            if closing:
                if len(accepted) < len(sites):
                    self.log(f"round {r}: timeout; closing with quorum {sorted(accepted)} "
                             f"(missing {sorted(set(sites) - set(accepted))})")
                manifest = self._close(r, previous, spec, accepted, norms)
                if manifest is not None:
                    return manifest
            if time.time() - last_note > 30:
                self.log(f"round {r}/{self.cfg['rounds']}: waiting for {sorted(set(sites) - set(accepted))}")
                last_note = time.time()
            time.sleep(self.poll_interval)

    def _close(self, r: int, previous: dict, spec: dict, accepted: dict, norms: dict) -> dict | None:
        """Aggregate the accepted updates within the norm bound and write the signed global; None (back to waiting)
        if every one of them changed since it was accepted, or none of them holds anything to aggregate."""
        self.strategy.begin(previous)
        used = {}
        for site in self._within_norm_bound(r, norms):  # sorted: the result does not depend on arrival order
            try:
                manifest, delta, trained = ff.read_update(self.fed, r, site, self.cfg["id"], self.keys, spec)
                if manifest["sha256"] != accepted[site]["sha256"]:  # the norm bound was checked on the accepted one
                    raise ff.Rejected("the update changed since it was accepted")
            except Exception as e:  # noqa: BLE001  changed after it was accepted
                self.reject(r, site, f"at aggregation: {getattr(e, 'reason', e)}")
                del accepted[site], norms[site]
                continue
            self.strategy.add(delta, manifest["num_cases"], trained)
            used[site] = manifest
            del delta
        if not used:
            return None
        try:
            tensors = self.strategy.finish()
        except ValueError as e:  # no tensor trained by any of them: as if none was there
            for site in used:
                self.reject(r, site, f"at aggregation: {e}; nothing to aggregate")
                del accepted[site], norms[site]
            return None
        info = {"sites": sorted(used), "num_cases": sum(m["num_cases"] for m in used.values()),
                "epsilon_by_site": {s: _epsilon(m) for s, m in used.items()}}
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # never signed: the previous global is released again
            self.reject(r, "global", f"the aggregate is not finite ({bad[:3]}); the previous global model is "
                                     "released unchanged")
            tensors, info = previous, {**info, "unchanged": f"aggregate not finite in {bad[:3]}"}
        manifest = self._write_global(r, tensors, info)
        self.log(f"round {r}/{self.cfg['rounds']}: global model written from {info['sites']} "
                 f"({info['num_cases']} cases)")
        return manifest


def _epsilon(manifest: dict) -> float | None:
    """The epsilon an update reports, as a float (only a number is copied into the global)."""
    return None if manifest.get("epsilon") is None else float(manifest["epsilon"])


def update_norm(delta: dict[str, torch.Tensor]) -> float:
    """L2 norm of an update's float tensors (in float64)."""
    return math.sqrt(sum(float(v.to(torch.float64).square().sum()) for v in delta.values() if v.is_floating_point()))
