"""Federation set-up and the aggregator (restartable from the shared folder alone)."""
from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import torch

from . import files as ff
from .released import check_decay
from .strategies import FedAvg
from ..common.initial_weights import describe_file, load_weights_file
from ..common.tensors import unique_state

MODES = ("npfl", "dpfl", "adpfl")


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def create_federation(fed: Path, keys_dir: Path, sites: list[str], rounds: int, epochs_per_round: int,
                      mode: str, iterations_per_epoch: int | None = None, configuration: str = "3d_fullres",
                      quorum: int | None = None, round_timeout_s: float | None = None, seed: int = 0,
                      initial_weights: str | Path | None = None, release_ema_decay: float | None = None) -> dict:
    """Write federation.json into the shared folder and one key per site into ``keys_dir`` (keep it off the
    shared folder: the aggregator needs all keys, each site only its own). ``initial_weights``: public weights
    (an nnU-Net checkpoint or .safetensors, trained with the federation's plan) that become the round-0 model.
    ``release_ema_decay``: the sites' final model is the EMA of the global models (``released.py``), not the last one."""
    fed, keys_dir = Path(fed), Path(keys_dir)
    if (fed / ff.FEDERATION_FILE).exists():
        raise FileExistsError(f"{fed / ff.FEDERATION_FILE} exists already; use a new folder")
    if len(set(sites)) != len(sites) or not sites or not all(s.replace("-", "").replace("_", "").isalnum()
                                                             for s in sites):
        raise ValueError(f"sites must be distinct names of letters, digits, '-' or '_', got {sites}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    quorum = len(sites) if quorum is None else quorum
    if not 1 <= quorum <= len(sites):
        raise ValueError(f"quorum must be between 1 and {len(sites)}, got {quorum}")
    if keys_dir.resolve() == fed.resolve() or fed.resolve() in keys_dir.resolve().parents:
        raise ValueError("keys_dir must not be inside the shared federation folder")
    cfg = {
        "format": 1, "id": str(uuid.uuid4()), "created": ff.now(), "sites": list(sites),
        "rounds": _positive_int("rounds", rounds), "epochs_per_round": _positive_int("epochs_per_round",
                                                                                      epochs_per_round),
        "iterations_per_epoch": None if iterations_per_epoch is None else _positive_int("iterations_per_epoch",
                                                                                         iterations_per_epoch),
        "mode": mode, "configuration": configuration, "quorum": quorum, "round_timeout_s": round_timeout_s,
        "seed": seed, "strategy": FedAvg.name, "plans_sha256": None,
        "initial_weights": None if initial_weights is None else describe_file(initial_weights),
        "release_ema_decay": check_decay(release_ema_decay),
    }
    keys_dir.mkdir(parents=True, exist_ok=True)
    for site in sites:
        key_file = keys_dir / f"{site}.key"
        if not key_file.exists():
            ff.write_bytes_atomic(key_file, ff.generate_key().encode(), mode=0o600)
    ff.write_json_atomic(fed / ff.FEDERATION_FILE, cfg)
    return cfg


def load_federation(fed: Path) -> dict:
    path = Path(fed) / ff.FEDERATION_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {fed} a federation folder ('nnunet-adpfl federation init')?")
    cfg = ff.read_json(path)
    missing = {"id", "sites", "rounds", "epochs_per_round", "mode", "configuration", "quorum"} - set(cfg)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}")
    try:
        check_decay(cfg.get("release_ema_decay"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg


def load_site_keys(keys_dir: Path, sites: list[str]) -> dict[str, bytes]:
    return {site: ff.load_key(Path(keys_dir) / f"{site}.key") for site in sites}


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
        self.fed = Path(fed)
        self.cfg = load_federation(self.fed)
        self.keys = load_site_keys(keys_dir, self.cfg["sites"])
        self.strategy = strategy or FedAvg()
        self.poll_interval = poll_interval
        self.log = log
        self._strays: set[tuple[int, str]] = set()

    def last_completed_round(self) -> int:
        r = -1
        while ff.global_paths(self.fed, r + 1)[1].exists():
            r += 1
        return r

    def ensure_initial_model(self) -> None:
        if ff.global_paths(self.fed, 0)[1].exists():
            return
        plans_file, dataset_file = plans_files(self.fed)
        if not plans_file.exists():
            raise FileNotFoundError(f"{plans_file} missing: create the federation plan first ('nnunet-adpfl plan')")
        plans, dataset_json = ff.read_json(plans_file), ff.read_json(dataset_file)
        tensors = build_initial_model(plans, dataset_json, self.cfg["configuration"], self.cfg.get("seed", 0))
        source = self.cfg.get("initial_weights")
        if source is not None:
            tensors = load_weights_file(source, tensors)
        self._write_global(0, tensors, {"sites": [], "num_cases": 0, "initial_weights": source})
        self.log(f"round 0: initial model written ({sum(v.numel() for v in tensors.values()):,} parameters, "
                 f"{'from ' + source['file'] if source else 'random initialisation'})")

    def _write_global(self, r: int, tensors: dict, info: dict) -> dict:
        tensor_path, manifest_path = ff.global_paths(self.fed, r)
        manifest = {"kind": "global", "federation": self.cfg["id"], "round": r, "strategy": self.strategy.name,
                    **info}
        return ff.write_tensors_with_manifest(tensor_path, manifest_path, tensors, manifest,
                                              ff.signed_for_sites(self.keys))

    def run(self, max_rounds: int | None = None) -> int:
        """Run until the last round (or ``max_rounds`` more rounds) is closed; returns the last closed round."""
        self.ensure_initial_model()
        r = self.last_completed_round()
        stop = self.cfg["rounds"] if max_rounds is None else min(self.cfg["rounds"], r + max_rounds)
        if r > 0:
            self.log(f"resuming after round {r} (found in {self.fed})")
        while r < stop:
            r += 1
            self.run_round(r)
        return r

    def _opened_at(self, r: int) -> float:
        path = ff.round_dir(self.fed, r) / "opened.json"
        if not path.exists():
            ff.write_json_atomic(path, {"opened": time.time()})
        return ff.read_json(path)["opened"]

    def _judge(self, r: int, spec: dict, accepted: dict, judged: dict) -> None:
        for site in self.cfg["sites"]:
            if site in accepted:
                continue
            _, manifest_path = ff.update_paths(self.fed, r, site)
            if not manifest_path.exists():
                continue
            fingerprint = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
            if judged.get(site) == fingerprint:
                continue
            judged[site] = fingerprint
            try:
                manifest, _ = ff.read_update(self.fed, r, site, self.cfg["id"], self.keys, spec)
            except ff.Rejected as e:
                ff.log_rejection(self.fed, r, site, e.reason)
                self.log(f"round {r}: REJECTED update of site {site}: {e.reason}")
                continue
            accepted[site] = manifest
            self.log(f"round {r}: accepted update of site {site} ({manifest['num_cases']} cases, "
                     f"{manifest['bytes'] / 1e6:.1f} MB)")
        self._judge_strays(r)

    def _judge_strays(self, r: int) -> None:
        """Files from names that are not sites of the federation are logged once, never read further."""
        updates = ff.round_dir(self.fed, r) / "updates"
        for path in updates.glob("*.json") if updates.exists() else []:
            if path.stem not in self.keys and (r, path.name) not in self._strays:
                self._strays.add((r, path.name))
                ff.log_rejection(self.fed, r, path.stem, f"unknown site {path.stem!r}")
                self.log(f"round {r}: REJECTED {path.name}: unknown site {path.stem!r}")

    def run_round(self, r: int) -> dict:
        previous = ff.stored_global(self.fed, r - 1)
        spec = ff.tensor_spec(previous)
        opened, timeout = self._opened_at(r), self.cfg.get("round_timeout_s")
        deadline = None if timeout is None else opened + timeout
        accepted, judged, last_note = {}, {}, 0.0
        sites = self.cfg["sites"]
        while True:
            self._judge(r, spec, accepted, judged)
            if len(accepted) == len(sites):
                break
            if deadline is not None and time.time() >= deadline and len(accepted) >= self.cfg["quorum"]:
                self.log(f"round {r}: timeout; closing with quorum {sorted(accepted)} "
                         f"(missing {sorted(set(sites) - set(accepted))})")
                break
            if time.time() - last_note > 30:
                self.log(f"round {r}/{self.cfg['rounds']}: waiting for {sorted(set(sites) - set(accepted))}")
                last_note = time.time()
            time.sleep(self.poll_interval)
        self.strategy.begin(previous)
        epsilons = {}
        for site in sorted(accepted):  # sorted: the result does not depend on arrival order
            try:
                manifest, delta = ff.read_update(self.fed, r, site, self.cfg["id"], self.keys, spec)
            except ff.Rejected as e:  # changed after it was accepted
                ff.log_rejection(self.fed, r, site, e.reason)
                self.log(f"round {r}: REJECTED update of site {site} at aggregation: {e.reason}")
                continue
            self.strategy.add(delta, manifest["num_cases"])
            epsilons[site] = manifest.get("epsilon")
            del delta
        if not epsilons:
            raise RuntimeError(f"round {r}: every accepted update failed its re-check; nothing to aggregate")
        info = {"sites": sorted(epsilons), "num_cases": sum(accepted[s]["num_cases"] for s in epsilons),
                "epsilon_by_site": epsilons}
        manifest = self._write_global(r, self.strategy.finish(), info)
        self.log(f"round {r}/{self.cfg['rounds']}: global model written from {info['sites']} "
                 f"({info['num_cases']} cases)")
        return manifest
