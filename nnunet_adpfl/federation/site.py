"""A site of a federation: the client for the shared folder and the nnU-Net trainer mixin.

Round protocol at a site (epochs_per_round local epochs per round):
    load global R-1 -> train -> upload delta (signed) -> wait for global R -> load it -> checkpoint -> ...
Each round end is checkpointed (atomically) BEFORE the upload, so the checkpoint always accounts for every
step released. Restart with the same command: the site loads that checkpoint, uploads the round if the crash
came before the upload, loads the round's global model and goes on; no round is trained or released twice.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from . import files as ff
from .federation_file import FederationFileError, site_federation
from .released import ema_of_globals
from ..common.config import SettingsError, load_settings
from ..common.seeding import seed_all
from ..common.tensors import load_unique_state, unique_state


class SiteClient:
    """A site's side of the folder protocol. federation.json must carry this site's HMAC; a global model that
    fails a check is refused (logged) and the site keeps waiting for a valid one."""

    def __init__(self, fed: str | Path, site: str, key_file: str | Path, wait_timeout_s: float = 86400,
                 poll_interval: float = 2.0, log=print):
        self.fed = Path(fed)
        self.key = ff.load_key(key_file)
        try:
            self.cfg = site_federation(self.fed, site, self.key)
        except FederationFileError as e:
            raise SettingsError(str(e)) from None
        self.site = site
        self.wait_timeout_s = wait_timeout_s
        self.poll_interval = poll_interval
        self.log = log

    def upload(self, r: int, delta: dict[str, torch.Tensor], num_cases: int, privacy: dict | None) -> dict:
        tensor_path, manifest_path = ff.update_paths(self.fed, r, self.site)
        manifest = {"kind": "update", "federation": self.cfg["id"], "site": self.site, "round": r,
                    "num_cases": int(num_cases), **(privacy or {})}
        return ff.write_tensors_with_manifest(tensor_path, manifest_path, delta, manifest,
                                              ff.signed_by_site(self.key), self.fed)

    def own_update(self, r: int) -> dict | None:
        """This site's uploaded manifest for round r, if present and signed by this site."""
        _, manifest_path = ff.update_paths(self.fed, r, self.site)
        try:
            manifest = ff.read_manifest(self.fed, manifest_path)
        except (FileNotFoundError, ff.Rejected):
            return None
        return manifest if ff.mac_ok(self.key, manifest, manifest.get("hmac")) and manifest.get("round") == r \
            and manifest.get("federation") == self.cfg["id"] and manifest.get("site") == self.site else None

    def global_manifest(self, r: int) -> dict:
        """The manifest of round r's global model, checked with this site's HMAC (its tensors are not read)."""
        manifest = ff.read_manifest(self.fed, ff.global_paths(self.fed, r)[1])
        macs = manifest.get("hmacs")
        if not ff.mac_ok(self.key, manifest, macs.get(self.site) if isinstance(macs, dict) else None):
            raise ff.Rejected(f"global model of round {r}: bad or missing HMAC for site {self.site!r}")
        ff.check_global_manifest(manifest, r, self.cfg["id"])
        return manifest

    def wait_global(self, r: int, spec: dict | None = None) -> dict[str, torch.Tensor]:
        """Round r's global model once a valid one is in the folder; one that fails a check is refused (logged
        once) and the wait goes on, until ``wait_timeout_s``."""
        start, note, refused, refused_files = time.time(), 0.0, None, None
        while True:
            files = _identity(ff.global_paths(self.fed, r))
            if files is not None and files != refused_files:
                try:
                    return ff.read_global(self.fed, r, self.cfg["id"], self.site, self.key, spec)[1]
                except FileNotFoundError:
                    pass
                except Exception as e:  # noqa: BLE001  (Rejected, or anything else a hostile file causes)
                    refused, refused_files = getattr(e, "reason", f"{type(e).__name__}: {str(e)[:200]}"), files
                    self.log(f"site {self.site}: REFUSED the global model of round {r}: {refused} (waiting for a "
                             "valid one)")
            waited = time.time() - start
            if waited > self.wait_timeout_s:
                last = f" The last one found was refused: {refused}." if refused else ""
                raise TimeoutError(f"site {self.site}: no valid global model for round {r} in {self.fed} after "
                                   f"{waited:.0f} s.{last} Is the aggregator running ('nnunet-adpfl aggregate "
                                   f"{self.fed}')? Restarting this command later resumes where it stopped.")
            if waited - note > 60:
                self.log(f"site {self.site}: waiting for the global model of round {r} ({waited:.0f} s)")
                note = waited
            time.sleep(self.poll_interval)


def _identity(paths) -> tuple | None:
    """Which files are at ``paths`` now (inode, size, mtime; not followed), None while the last is absent."""
    out = []
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        out.append(None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns))
    return None if out[-1] is None else tuple(out)


def round_seed(seed: int, site: str, r: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{site}/{r}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


class FederatedTrainerMixin:
    """Turns an nnU-Net trainer into a federation site. Settings (nnUNet_adpfl_config): federation_dir,
    site_id, site_key_file, round_wait_timeout_s; rounds, epochs per round and iterations per epoch come
    from the federation's federation.json."""
    federation_mode = "npfl"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            raise SettingsError("federated trainers do not support DDP")
        s = load_settings()
        missing = [k for k in ("federation_dir", "site_id", "site_key_file") if not s[k]]
        if missing:
            raise SettingsError(f"{type(self).__name__} needs {missing} in the settings file ($nnUNet_adpfl_config)")
        self.fed_settings = s
        self.client = SiteClient(s["federation_dir"], s["site_id"], s["site_key_file"], s["round_wait_timeout_s"],
                                 log=self.print_to_log_file)
        cfg = self.client.cfg
        if cfg["mode"] != self.federation_mode:
            raise SettingsError(f"{type(self).__name__} trains mode '{self.federation_mode}', but the federation "
                                f"in {s['federation_dir']} runs mode '{cfg['mode']}'")
        if cfg["configuration"] != configuration:
            raise SettingsError(f"the federation trains configuration '{cfg['configuration']}', not '{configuration}'")
        self.epochs_per_round = cfg["epochs_per_round"]
        self.num_epochs = cfg["rounds"] * cfg["epochs_per_round"]
        if cfg.get("iterations_per_epoch"):
            self.num_iterations_per_epoch = cfg["iterations_per_epoch"]
        if s["initial_lr"] is not None:
            self.initial_lr = s["initial_lr"]
        if s["num_threads"] is not None:  # nnU-Net's CPU default is every core, for each site process
            torch.set_num_threads(s["num_threads"])
            self.print_to_log_file(f"torch CPU threads: {torch.get_num_threads()}")
        self.save_every = self.epochs_per_round  # nnU-Net's checkpoint_latest at every round end
        self._round_start: dict[str, torch.Tensor] | None = None

    # ---- helpers --------------------------------------------------------------------------------
    def _module(self):
        from torch._dynamo.eval_frame import OptimizedModule
        return self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu().clone() for k, v in unique_state(self._module()).items()}

    def _load_global(self, tensors: dict[str, torch.Tensor]) -> None:
        load_unique_state(self._module(), {k: v.to(self.device) for k, v in tensors.items()})
        self._round_start = {k: v.clone() for k, v in tensors.items()}

    def _num_cases(self) -> int:
        return len(self.do_split()[0])

    def _privacy_manifest(self) -> dict:
        """Privacy fields of an update's manifest (DP trainers add their accountant)."""
        return {}

    def _start_round(self, r: int) -> None:
        """Called before round r's local training. Deterministic mode (settings 'seed'): every round starts from
        RNG states fixed by (seed, site, round)."""
        seed = self.fed_settings["seed"]
        if seed is None:
            return
        seed_all(round_seed(seed, self.client.site, r))

    def _check_plans(self) -> None:
        from .plan import plans_digest
        expected = self.client.cfg.get("plans_sha256")
        if expected is None:
            raise SettingsError(f"the federation in {self.client.fed} has no plan yet ('nnunet-adpfl plan')")
        if plans_digest(self.plans_manager.plans) != expected:
            raise SettingsError(
                f"this site's plans ({self.plans_manager.plans_name}) differ from the federation's plan "
                f"(sha256 {expected[:12]}...): install it with 'nnunet-adpfl install-plan' and preprocess again")

    # ---- nnU-Net hooks --------------------------------------------------------------------------
    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self._check_plans()
        for name in ("checkpoint_latest.pth", "checkpoint_final.pth"):
            path = os.path.join(self.output_folder, name)
            if self.current_epoch == 0 and os.path.isfile(path):
                self.print_to_log_file(f"federation: resuming from {path}")
                self.load_checkpoint(path)
                break
        done = self._sync_with_federation()
        super().on_train_start()
        if done < self.client.cfg["rounds"]:
            self._start_round(done + 1)

    def _sync_with_federation(self) -> int:
        """Bring the network to the global model of the last round this site took part in; returns that round.
        A checkpoint holding a round's local training that was not uploaded yet is uploaded now (the same
        update the crashed run would have sent)."""
        epr = self.epochs_per_round
        done = self.current_epoch // epr
        if self.current_epoch % epr:
            raise RuntimeError(f"checkpoint at epoch {self.current_epoch} is not at a round boundary ({epr} epochs "
                               "per round); remove it to restart this site's training")
        if self.client.own_update(done + 1) is not None:
            raise RuntimeError(f"site {self.client.site} uploaded round {done + 1}, but its newest checkpoint is from "
                               f"round {done}: restore the checkpoint folder ({self.output_folder}) instead of "
                               "training that round again (it would be released twice)")
        spec = ff.tensor_spec(self._state())
        if done > 0 and self.client.own_update(done) is None:
            self._round_start = self.client.wait_global(done - 1, spec)
            self._upload(done)
        self._load_global(self.client.wait_global(done, spec))
        return done

    def on_epoch_end(self):
        if (self.current_epoch + 1) % self.epochs_per_round == 0:
            r = (self.current_epoch + 1) // self.epochs_per_round
            # checkpoint first: a crash after the upload then resumes with this round's full local state
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
            self._upload(r)
            self._load_global(self.client.wait_global(r, ff.tensor_spec(self._round_start)))
            self.print_to_log_file(f"federation: loaded global model of round {r}")
            if r < self.client.cfg["rounds"]:
                self._start_round(r + 1)
        super().on_epoch_end()

    def on_train_end(self):
        """With the federation's ``release_ema_decay``, the final checkpoint (and nnU-Net's validation) hold the EMA
        of the global models of the rounds this site finished, computed from the signed globals it holds."""
        decay = self.client.cfg.get("release_ema_decay")
        rounds = self.current_epoch // self.epochs_per_round
        if decay is not None and rounds > 0:
            spec = ff.tensor_spec(self._state())
            ema = ema_of_globals((self.client.wait_global(r, spec) for r in range(1, rounds + 1)), decay)
            load_unique_state(self._module(), {k: v.to(self.device) for k, v in ema.items()})
            self.print_to_log_file(f"federation: final model = EMA of the global models of rounds 1..{rounds} "
                                   f"(decay {decay})")
        super().on_train_end()

    def _local_delta(self) -> dict[str, torch.Tensor]:
        """This round's local update: the weights now minus the global model the round started from."""
        return {k: (v.to(torch.float32) - self._round_start[k].to(torch.float32)) if v.is_floating_point()
                else torch.zeros_like(v) for k, v in self._state().items()}

    def _upload(self, r: int) -> None:
        delta = self._local_delta()
        tensors, encoding = self._upload_tensors(r, delta)
        subset = {"subset": True} if len(delta) < len(self._round_start) else {}  # absent tensors: zero update
        manifest = self.client.upload(r, tensors, self._num_cases(),
                                      {**self._privacy_manifest(), **encoding, **subset})
        self.print_to_log_file(f"federation: uploaded round {r} update ({manifest['bytes'] / 1e6:.1f} MB)")

    def _upload_tensors(self, r: int, delta: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """What goes into the shared folder for this round's update, and its manifest fields (ADP-FL: top-k)."""
        return delta, {}

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically (a crash while saving leaves the previous one intact)."""
        tmp = f"{filename}.tmp"
        super().save_checkpoint(tmp)
        if os.path.exists(tmp):
            os.replace(tmp, filename)
