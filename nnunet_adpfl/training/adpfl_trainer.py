"""ADP-FL: DP-FL + private-step sparsification + adaptive (quantile) clipping + a dynamic noise schedule, all in
one privacy account, + top-k upload sparsification (post-processing). Each mechanism can be switched off in the
settings file (ablations); see docs/ADPFL.md.

Accounting: every step is one Poisson-sampled Gaussian mechanism with the round's noise multiplier sigma_r (the
schedule is calibrated before training so the whole run spends the target epsilon). With adaptive clipping, the
step's two releases (gradient sum with multiplier sigma_grad, centred unclipped count with multiplier sigma_count)
together have multiplier sigma_r (Andrew et al., Thm 1; nnunet_adpfl.adaptive). The private-step mask is chosen
from the previous released global update or a seeded random subset, never from the current data.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..federation import files as ff
from ..privacy.adaptive import (NoiseSchedule, QuantileClipTracker, calibrate_schedule, count_noise_warning,
                                 default_sigma_count, noise_aware_clip_lr, split_noise)
from ..common.atomic import write_bytes_atomic
from ..common.config import SettingsError
from .fed_trainers import FederatedDPTrainer
from ..privacy.noisy_step import add_noise
from ..privacy.sparsify import ErrorFeedback, MaskedPerCaseGradients, masked_add_noise, released_global_update, step_mask, \
    topk_encode


class FederatedADPTrainer(FederatedDPTrainer):
    federation_mode = "adpfl"
    # per-run state, set during training: per-round sigmas, clip tracker from a checkpoint, upload residual and
    # the round whose upload left it
    _schedule: list[float] = []
    _restored_tracker = None
    _feedback = None
    _feedback_round = 0

    # ---- noise schedule -------------------------------------------------------------------------
    def _steps_per_round(self) -> int:
        return self.epochs_per_round * self.num_iterations_per_epoch

    def _noise_multiplier(self, sample_rate: float) -> float:
        s, rounds = self.dp_settings, self.client.cfg["rounds"]
        if s["noise_multiplier"] is not None or s["adpfl_noise_schedule"] == "constant":
            base = super()._noise_multiplier(sample_rate)
            self._schedule = [base] * rounds
        else:
            schedule = NoiseSchedule(s["adpfl_noise_schedule"], end_ratio=s["adpfl_schedule_end_ratio"])
            self._schedule = calibrate_schedule(schedule, s["target_epsilon"], s["delta"], sample_rate,
                                                self._steps_per_round(), rounds, s["accountant"])
        # a finished site started again (--c, or rerun: it resumes from checkpoint_final) is past the last round
        return self._schedule[min(self.current_epoch // self.epochs_per_round, rounds - 1)]

    def _budget_steps(self, sample_rate: float, sigma: float, remaining: int) -> int:
        """The whole remaining schedule must fit the budget (it was calibrated to)."""
        target = self.dp_settings["target_epsilon"]
        if target is None:
            return remaining
        done_rounds = self.accountant.steps // self._steps_per_round()
        planned = [(sg, sample_rate, self._steps_per_round()) for sg in self._schedule[done_rounds:]]
        spend = self.accountant.epsilon(planned)
        if spend > target * 1.000001:
            raise SettingsError(f"the noise schedule would spend epsilon {spend:.3f} > target {target}")
        return remaining

    # ---- per-round mechanisms -------------------------------------------------------------------
    def _start_round(self, r: int) -> None:
        super()._start_round(r)
        s, pv = self.dp_settings, self.privacy
        pv["noise_multiplier"] = self._schedule[min(r, len(self._schedule)) - 1]
        pv["masks"] = None
        if s["adpfl_step_sparsity"] != "none":
            previous = None
            if s["adpfl_step_sparsity"] == "topk_prev_global" and r >= 3:
                names = list(pv["params"])
                g1, g2 = (self.client.wait_global(r - k) for k in (1, 2))
                previous = released_global_update({n: g1[n] for n in names}, {n: g2[n] for n in names})
            method = "random" if s["adpfl_step_sparsity"] == "random" else "topk_prev_global"
            masks = step_mask({n: p.detach() for n, p in pv["params"].items()}, s["adpfl_step_density"], method, r,
                              self.client.cfg.get("seed", 0), previous)
            pv["masks"] = [masks[n].to(self.device) for n in pv["params"]]
        if s["adpfl_adaptive_clip"] and "clip_tracker" not in pv:
            pv["clip_tracker"] = self._restored_tracker or self._new_clip_tracker()
            tracker = pv["clip_tracker"]
            self.print_to_log_file(f"adaptive clipping: count noise std {tracker.sigma_count:.3g} on an expected batch "
                                   f"of {tracker.expected_batch_size:g}, clip learning rate {tracker.learning_rate:.3g}")
            warning = count_noise_warning(tracker.learning_rate, tracker.sigma_count, tracker.expected_batch_size)
            if warning:
                self.print_to_log_file(f"WARNING: {warning}")

    def _new_clip_tracker(self) -> QuantileClipTracker:
        s, batch = self.dp_settings, self.privacy["expected_batch_size"]
        sigma_count = self._count_noise_multiplier(batch)
        return QuantileClipTracker(
            clip=s["max_grad_norm"], expected_batch_size=batch, sigma_count=sigma_count,
            target_quantile=s["adpfl_clip_quantile"],
            learning_rate=s["adpfl_clip_lr"] or noise_aware_clip_lr(sigma_count, batch),
            max_clip=None if s["adpfl_clip_max_ratio"] is None else s["adpfl_clip_max_ratio"] * s["max_grad_norm"])

    def _count_noise_multiplier(self, batch: float) -> float:
        """adpfl_count_noise, or its default; refused at the start (not at the first step) when it is too small to
        split every round's noise multiplier (2 * count noise > sigma)."""
        s, sigma = self.dp_settings, max(self._schedule)
        try:
            sigma_count = s["adpfl_count_noise"] or default_sigma_count(batch, sigma)
            split_noise(sigma, sigma_count)
        except ValueError as e:
            raise SettingsError(f"adaptive clipping (adpfl_adaptive_clip, adpfl_count_noise): {e}") from None
        return sigma_count

    # ---- the private step -----------------------------------------------------------------------
    def _clip_norm(self) -> float:
        tracker = self.privacy.get("clip_tracker")
        return tracker.clip if tracker is not None else super()._clip_norm()

    def _per_case_engine(self):
        masks = self.privacy.get("masks")
        engine = super()._per_case_engine()
        return engine if masks is None else MaskedPerCaseGradients(engine, masks)

    def _gradient_noise_multiplier(self) -> float:
        tracker = self.privacy.get("clip_tracker")
        sigma = self.privacy["noise_multiplier"]
        return tracker.gradient_noise_multiplier(sigma) if tracker is not None else sigma

    def _noisy_gradient(self, sums: list[torch.Tensor], noise_std: float) -> list[torch.Tensor]:
        pv = self.privacy
        if pv.get("masks") is None:
            return add_noise(sums, noise_std, pv["expected_batch_size"], pv["generator"])
        return masked_add_noise(sums, pv["masks"], noise_std, pv["expected_batch_size"], pv["generator"])

    def _after_step(self, sums) -> None:
        tracker = self.privacy.get("clip_tracker")
        if tracker is not None:
            tracker.update(sums.norms, self.privacy["generator"])

    # ---- upload sparsification (post-processing) ------------------------------------------------
    def _upload_tensors(self, r: int, delta: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        density = self.dp_settings["adpfl_upload_density"]
        if density is None:
            return delta, {}
        floats = {k: v for k, v in delta.items() if v.is_floating_point()}
        if self.dp_settings["adpfl_error_feedback"]:
            if self._feedback is None:
                self._feedback = ErrorFeedback()
            encoded, _ = self._feedback.compress(floats, density)
            self._feedback_round = r
        else:
            encoded = topk_encode(floats, density)
        return encoded, {"encoding": "topk", "density": density}

    # ---- state, report --------------------------------------------------------------------------
    def _log_epoch_state(self) -> None:
        super()._log_epoch_state()
        tracker = self.privacy.get("clip_tracker") if self.privacy else None
        self.logger.local_logger.log("adpfl_clip_tracker", tracker.state_dict() if tracker else None,
                                     self.current_epoch)

    def _dp_log_key_names(self) -> list[str]:
        return super()._dp_log_key_names() + ["adpfl_clip_tracker"]

    @staticmethod
    def _residual_path(checkpoint: str) -> Path:
        return Path(checkpoint).with_name(Path(checkpoint).stem + "_upload_residual.safetensors")

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus, beside the one restarts load, the error-feedback residual (and the round that
        left it)."""
        if self._feedback is not None and self.local_rank == 0 and Path(filename).name == "checkpoint_latest.pth":
            write_bytes_atomic(self._residual_path(filename),
                               st_save(self._feedback.state_dict(), metadata={"round": str(self._feedback_round)}))
        super().save_checkpoint(filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        states = [st for st in self.logger.get_value("adpfl_clip_tracker", step=None) if isinstance(st, dict)]
        if states:
            self._restored_tracker = QuantileClipTracker.from_state_dict(states[-1])
        path = self._residual_path(filename_or_checkpoint) if isinstance(filename_or_checkpoint, str) else None
        if path is not None and path.is_file():
            with safe_open(str(path), "pt") as f:
                self._feedback = ErrorFeedback()
                self._feedback.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
                self._feedback_round = int(f.metadata()["round"])

    def _sync_with_federation(self) -> int:
        """On a restart, also restore the upload residual. Two checkpoints end a round: ours before the upload
        (it holds the residual of the round before) and nnU-Net's periodic one after it (it holds this round's
        residual). In the first case, if the round's update was uploaded, its compression is redone
        (deterministic) to carry exactly the residual the crashed run had."""
        done = self.current_epoch // self.epochs_per_round
        if done > 0 and self.dp_settings["adpfl_upload_density"] is not None and self.dp_settings[
                "adpfl_error_feedback"] and self._feedback_round != done:
            if self._feedback_round != done - 1:
                self.print_to_log_file(f"federation: upload residual of round {done - 1} not found (have round "
                                       f"{self._feedback_round}); continuing without it")
                self._feedback, self._feedback_round = None, done - 1
            if self.client.own_update(done) is not None:
                self._round_start = self.client.wait_global(done - 1, ff.tensor_spec(self._state()))
                self._upload_tensors(done, self._local_delta())
        return super()._sync_with_federation()

    def _report_extra(self) -> dict:
        s, pv = self.dp_settings, self.privacy
        tracker = pv.get("clip_tracker")
        return {**super()._report_extra(), "adpfl": {
            "noise_schedule": {"kind": s["adpfl_noise_schedule"] if s["noise_multiplier"] is None else "constant",
                               "end_ratio": s["adpfl_schedule_end_ratio"], "noise_multiplier_per_round": self._schedule},
            "adaptive_clipping": None if tracker is None else {
                "target_quantile": tracker.target_quantile, "learning_rate": tracker.learning_rate,
                "count_noise_multiplier": tracker.sigma_count, "current_clip": tracker.clip,
                "max_clip": tracker.max_clip,
                "gradient_noise_multiplier_now": tracker.gradient_noise_multiplier(pv["noise_multiplier"]),
                "accounting": "per step one Gaussian mechanism with the round's noise multiplier: gradient and "
                              "count noise split so their combination equals it (Andrew et al. 2021, Thm 1)"},
            "step_sparsification": {"method": s["adpfl_step_sparsity"], "density": s["adpfl_step_density"]},
            "upload_sparsification": {"density": s["adpfl_upload_density"],
                                      "error_feedback": s["adpfl_error_feedback"],
                                      "accounting": "post-processing of the noisy update: free"},
        }}
