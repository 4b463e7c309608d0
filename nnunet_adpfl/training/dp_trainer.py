"""nnU-Net trainer with per-case differential privacy (DP-SGD and its clipping-rule variants).

What it changes against ``nnUNetTrainer`` and why (DESIGN.md section 1):
- network built with non in-place activations; BatchNorm refused (it couples cases);
- per-case loss (no batch Dice); no AMP/GradScaler (bf16 autocast of the per-case pass: dp_autocast); no
  torch.compile; no batch-level gradient clip;
- Poisson sampling of cases, one patch per included case;
- noisy step from clipped per-case gradients, sigma derived from the target epsilon before training,
  training stops when the budget is spent; epsilon logged, plotted, checkpointed and reported.
"""
from __future__ import annotations

import math
import os
from functools import partial

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from ..privacy import report
from ..privacy.accounting import PrivacyAccountant, steps_within_budget
from ..common.atomic import write_bytes_atomic, write_json_atomic
from .ema import WeightEMA
from .held_out import HeldOutValidationMixin
from ..common.initial_weights import initial_weights_record, pretrained_origin, transfer_segmentation_layers
from ..privacy.clipping import make_rule
from ..common.config import SettingsError, apply_run_length, load_settings
from ..privacy.local_log import describe, epoch_values, record_epoch
from .dp_defaults import calibrate, unset_batch
from .dp_defaults_trainer import apply_to_trainer
from .dp_log import fold_warning, setup_lines
from .losses import PerCaseLoss
from ..privacy.noisy_step import add_noise, clipped_sum, cosine, make_noise_generator
from ..privacy.per_case_grads import PerCaseGradients, resolve_engine, trainable_params_reached_by_loss
from ..privacy.resume import EARLIER_KEY, describe_earlier, earlier_accounts, refuse_uncovered_resume
from ..privacy.sampling import PoissonDataLoader, batch_to_device, training_augmenter
from .trainable import count_parameters, make_dp_safe, select_trainable

def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights: 1/2^i, lowest resolution 0, normalised to sum 1."""
    w = np.array([1 / (2 ** i) for i in range(num_outputs)])
    w[-1] = 0
    return list(w / w.sum())


class nnUNetTrainerDP(HeldOutValidationMixin, nnUNetTrainer):
    """Base class of the DP trainers; subclasses choose the clipping rule."""
    clipping_rule = "flat"
    supports_ema = True  # federated trainers: no (a site's weights are replaced by the global model every round)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            raise SettingsError("DP trainers do not support DDP: per-rank batches would not be Poisson samples")
        if self.is_cascaded:
            raise SettingsError(f"{configuration}: a cascade's input is each case's segmentation by the previous "
                                "stage, whose models trained on the same patients outside this run's privacy account: "
                                "train 3d_fullres or 3d_lowres")
        self.dp_settings = load_settings()
        apply_run_length(self, self.dp_settings)
        self.grad_scaler = None
        self.rule = make_rule(self.clipping_rule, self.dp_settings)
        self.accountant = PrivacyAccountant(self.dp_settings["accountant"], self.dp_settings["delta"])
        self.privacy = None  # -> _setup_privacy
        self.dp_defaults: dict | None = None  # -> configure_optimizers
        if self.dp_settings["ema_decay"] is not None and not self.supports_ema:
            raise SettingsError(f"ema_decay is for single-site trainers, not {type(self).__name__}")
        self.ema: WeightEMA | None = None
        self._local_log: dict = {}  # local_only_log.json's series (unnoised values, never released)
        self._resumed_from: str | None = None  # the checkpoint this run continues (privacy/resume.py)
        self._earlier_accounts: list[dict] = []
        self._restored_ema: dict | None = None
        self._ensure_log_keys()

    # ---- nnU-Net defaults that break DP -------------------------------------------------------------
    def _do_i_compile(self):
        return False

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return make_dp_safe(get_network_from_plans(
            configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
            allow_init=True, deep_supervision=enable_deep_supervision))

    def _build_loss(self):
        ds = deep_supervision_weights(len(self._get_deep_supervision_scales())) if self.enable_deep_supervision \
            else None
        return PerCaseLoss(self.label_manager.has_regions, self.label_manager.ignore_label, ds)

    def get_dataloaders(self):
        """nnU-Net's loaders, with Poisson sampling for training (validation loader unchanged; none on fold all)."""
        patch_size = self.configuration_manager.patch_size
        ds_scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        label_kwargs = dict(foreground_labels=self.label_manager.foreground_labels,
                            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
                            ignore_label=self.label_manager.ignore_label)
        tr_transforms = self.get_training_transforms(
            patch_size, rotation, ds_scales, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            **label_kwargs)
        val_transforms = self.get_validation_transforms(ds_scales, is_cascaded=self.is_cascaded, **label_kwargs)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        self.num_training_cases = len(dataset_tr.identifiers)
        dl_tr = PoissonDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, self.label_manager,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  transforms=tr_transforms, sample_rate=self._sample_rate(),
                                  multiplicity=self.dp_settings["augmentation_multiplicity"])
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, patch_size, patch_size, self.label_manager,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  transforms=val_transforms) if dataset_val.identifiers else None
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            return SingleThreadedAugmenter(dl_tr, None), dl_val and SingleThreadedAugmenter(dl_val, None)
        pin = self.device.type == "cuda"
        mt_tr = training_augmenter(dl_tr, n_proc, pin)  # ordered: the steps are the draws in draw order
        mt_val = dl_val and NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4),
                                                         None, pin, 0.002)
        return mt_tr, mt_val

    # ---- privacy set-up -----------------------------------------------------------------------------
    def _expected_batch_size(self) -> int:
        return self.dp_settings["expected_batch_size"] or unset_batch(self.batch_size, self.num_training_cases)

    def _sample_rate(self) -> float:
        n, b = self.num_training_cases, self._expected_batch_size()
        if b > n:
            raise SettingsError(f"expected_batch_size {b} exceeds the {n} training cases of fold {self.fold}")
        if self.dp_settings["delta"] >= 1 / n:
            raise SettingsError(f"delta {self.dp_settings['delta']} must be < 1/N = {1 / n:.3g} for the {n} training "
                                "cases (a larger delta allows leaking a whole case)")
        return b / n

    def _planned_steps(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def _noise_multiplier(self, sample_rate: float) -> float:
        s = self.dp_settings
        if s["noise_multiplier"] is not None:
            return s["noise_multiplier"]
        return calibrate(s["target_epsilon"], s["delta"], sample_rate, self._planned_steps(), s["accountant"])

    def configure_optimizers(self):
        """nnU-Net's SGD and poly schedule with the settings' momentum (nnU-Net: 0.99), after the DP-aware defaults
        have chosen what the settings leave out (dp_defaults.py; the network exists now)."""
        if self.dp_defaults is None:
            self.dp_defaults = apply_to_trainer(self)
        optimizer, scheduler = super().configure_optimizers()
        for group in optimizer.param_groups:
            group["momentum"] = self.dp_settings["momentum"]
            group["nesterov"] = self.dp_settings["momentum"] > 0
        return optimizer, scheduler

    def on_train_start(self):
        refuse_uncovered_resume(self._resumed_from)
        self._earlier_accounts = earlier_accounts(self.output_folder, resumed=self._resumed_from is not None)
        super().on_train_start()
        fresh, origin = self.current_epoch == 0, self._initial_weights_origin()
        if fresh and origin["source"] == "pretrained":
            origin["segmentation_layers"] = transfer_segmentation_layers(self.network, origin["file"])
            self.print_to_log_file(f"-pretrained_weights: segmentation layers {origin['segmentation_layers']}")
        self.initial_weights = initial_weights_record(self.network, self.output_folder, fresh, origin)
        self._setup_privacy()

    def _initial_weights_origin(self) -> dict:
        """Where the starting weights came from (federated trainers: the federation's round-0 model)."""
        return pretrained_origin()

    def _example_batch(self):
        """Data-free input/target with the training shapes (used to find the parameters the loss reaches)."""
        x = torch.zeros((1, self.num_input_channels, *self.configuration_manager.patch_size), device=self.device)
        with torch.no_grad():
            out = self.network(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        channels = (len(self.label_manager.foreground_regions) + (self.label_manager.ignore_label is not None)
                    if self.label_manager.has_regions else 1)
        targets = [torch.zeros((1, channels, *o.shape[2:]), device=self.device) for o in outs]
        return x, targets if isinstance(out, (list, tuple)) else targets[0]

    def _setup_privacy(self):
        s = self.dp_settings
        q = self._sample_rate()
        sigma = self._noise_multiplier(q)
        params = self._private_params()
        engine = resolve_engine(s["per_sample_engine"])
        remaining = max(0, self._planned_steps() - self.accountant.steps)
        allowed = self._budget_steps(q, sigma, remaining)
        per_case_gradients = partial(PerCaseGradients, memory_limit_mib=s["dp_memory_limit_mib"],
                                     autocast=s["dp_autocast"])
        self.privacy = {
            "sample_rate": q, "noise_multiplier": sigma, "expected_batch_size": self._expected_batch_size(),
            "params": params, "steps_left": allowed, "engine": engine,
            "per_case": per_case_gradients(self.network, self.loss.per_case, params, engine,
                                           s["max_physical_batch_size"], s["augmentation_multiplicity"]),
            "parameters": {"dp_trainable": s["dp_trainable"], "trainable": count_parameters(params.values()),
                           "total": count_parameters(self.network.parameters())},
            "generator": make_noise_generator(self.device, s["noise_seed"]),
            "alignment": [],
        }
        if s["ema_decay"] is not None:
            self.ema = WeightEMA(params, s["ema_decay"])
            if self._restored_ema is not None:
                self.ema.load_state_dict(self._restored_ema)
        self.privacy["small_fold_warning"] = fold_warning(self, sigma)
        for line in setup_lines(self, allowed):
            self.print_to_log_file(line)
        for key, what in (("noise_seed", "the noise"), ("seed", "the Poisson draws")):
            if s[key] is not None:
                self.print_to_log_file(f"WARNING: {key} is set: {what} are predictable, no privacy guarantee.")
        if describe_earlier(self._earlier_accounts):
            self.print_to_log_file(describe_earlier(self._earlier_accounts))

    def _private_params(self) -> dict[str, nn.Parameter]:
        """The parameters the private step trains (dp_trainable, and reached by the loss); all others frozen.
        Decided from the architecture and a data-free example, never from private data."""
        chosen = select_trainable(self.network, self.dp_settings["dp_trainable"])
        for name, p in self.network.named_parameters():
            p.requires_grad_(name in chosen)
        params = trainable_params_reached_by_loss(self.network, self.loss.per_case, *self._example_batch())
        for name, p in self.network.named_parameters():
            p.requires_grad_(name in params)
        return params

    def _budget_steps(self, sample_rate: float, sigma: float, remaining: int) -> int:
        """How many of the remaining planned steps fit the budget."""
        target = self.dp_settings["target_epsilon"]
        return remaining if target is None else steps_within_budget(self.accountant, target, sigma, sample_rate,
                                                                    remaining)

    # ---- the private step (hooks below are what ADP-FL changes) ---------------------------------
    def train_step(self, batch: dict) -> dict:
        pv, s = self.privacy, self.dp_settings
        data, target = batch_to_device(batch, self.device)
        clip = self._clip_norm()
        sums = self._clipped_sums(data, target, clip)
        noisy = self._noisy_gradient(sums.clipped, self._gradient_noise_multiplier() * clip)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(pv["params"].values(), noisy):
            p.grad = g
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(pv["params"])
        self.accountant.step(pv["noise_multiplier"], pv["sample_rate"])
        pv["steps_left"] -= 1
        self._after_step(sums)
        if s["log_alignment"]:
            pv["alignment"].append((cosine(sums.raw, sums.clipped), cosine(sums.raw, noisy)))
        loss = float(sums.losses.mean()) if sums.batch_size else float("nan")
        return {"loss": np.array(loss)}

    def _clipped_sums(self, data, target, clip: float):
        """The step's sum of clipped per-case gradients (the audit adds its canaries here)."""
        return clipped_sum(self._per_case_engine(), self.rule, clip, data, target,
                           keep_raw=self.dp_settings["log_alignment"])

    def _clip_norm(self) -> float:
        return self.dp_settings["max_grad_norm"]

    def _per_case_engine(self) -> PerCaseGradients:
        return self.privacy["per_case"]

    def _gradient_noise_multiplier(self) -> float:
        return self.privacy["noise_multiplier"]

    def _noisy_gradient(self, sums: list[torch.Tensor], noise_std: float) -> list[torch.Tensor]:
        pv = self.privacy
        return add_noise(sums, noise_std, pv["expected_batch_size"], pv["generator"])

    def _after_step(self, sums) -> None:
        """Called after every private step (ADP-FL: the clip-norm update)."""

    def privacy_budget_spent(self) -> bool:
        return self.privacy is not None and self.privacy["steps_left"] <= 0

    def run_training(self):
        """nnU-Net's loop, ending early (with final checkpoint and validation) when the budget is spent."""
        self.on_train_start()
        while self.current_epoch < self.num_epochs and not self.privacy_budget_spent():
            self.on_epoch_start()
            self.on_train_epoch_start()
            steps = min(self.num_iterations_per_epoch, self.privacy["steps_left"])
            train_outputs = [self.train_step(next(self.dataloader_train)) for _ in range(steps)]
            self.on_train_epoch_end(train_outputs)
            if self.dataloader_val is None:  # fold 'all' (held_out.py)
                self.skip_validation_epoch()
            else:
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val_outputs = [self.validation_step(next(self.dataloader_val))
                                   for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        if self.privacy_budget_spent() and self.current_epoch < self.num_epochs:
            self.print_to_log_file(f"Privacy budget epsilon={self.dp_settings['target_epsilon']} spent: "
                                   f"training stopped after {self.accountant.steps} steps.")
        self.on_train_end()

    # ---- logging, report, checkpoint ----------------------------------------------------------------
    def _dp_log_key_names(self) -> list[str]:
        return ["epsilon", "dp_steps", "privacy_accountant"]

    def _ensure_log_keys(self):
        logs = self.logger.local_logger.my_fantastic_logging
        n_epochs = len(logs["train_losses"])
        for k in self._dp_log_key_names():
            logs.setdefault(k, [math.nan] * n_epochs)

    def _log_epoch_state(self) -> None:
        """State restored from checkpoints, logged once per epoch (saved in the checkpoint's logger)."""
        self.logger.local_logger.log("privacy_accountant", self.accountant.state_dict(), self.current_epoch)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        # every checkpoint carries the logger: no unnoised value goes there (local_log.py)
        self.logger.log("train_losses", math.nan, self.current_epoch)
        alignment = self.privacy["alignment"] if self.dp_settings["log_alignment"] else None
        local = epoch_values([float(o["loss"]) for o in train_outputs], alignment)
        self.privacy["alignment"] = []
        self._local_log = record_epoch(self.output_folder, self.current_epoch, local)
        eps = self.accountant.epsilon()
        self.logger.log("epsilon", eps, self.current_epoch)
        self.logger.log("dp_steps", self.accountant.steps, self.current_epoch)
        self._log_epoch_state()
        self.print_to_log_file(f"epsilon spent: {eps:.4f} (delta={self.accountant.delta}) after "
                               f"{self.accountant.steps} steps; {describe(local)}")
        self.write_privacy_report(final=False)

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.local_rank == 0:
            report.plot_privacy_progress({**self.logger.local_logger.my_fantastic_logging, **self._local_log},
                                         self.output_folder)

    def on_train_end(self):
        if self.ema is not None:  # the released model is the average of the noisy iterates (post-processing)
            self.ema.copy_to(self.privacy["params"])
            self.print_to_log_file(f"final model = EMA of the weights (decay {self.ema.decay})")
        super().on_train_end()
        self.write_privacy_report(final=True)

    @staticmethod
    def _ema_path(checkpoint: str) -> str:
        return os.path.splitext(checkpoint)[0] + "_ema.safetensors"

    def save_checkpoint(self, filename: str) -> None:
        if self.ema is not None and self.local_rank == 0:
            write_bytes_atomic(self._ema_path(filename), st_save(self.ema.state_dict()))
        super().save_checkpoint(filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self._resumed_from = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "a checkpoint"
        path = self._ema_path(filename_or_checkpoint) if isinstance(filename_or_checkpoint, str) else None
        if self.dp_settings["ema_decay"] is not None and path is not None and os.path.isfile(path):
            with safe_open(path, "pt") as f:
                self._restored_ema = {k: f.get_tensor(k) for k in f.keys()}
        self._ensure_log_keys()
        states = [st for st in self.logger.get_value("privacy_accountant", step=None) if isinstance(st, dict)]
        if states:
            self.accountant = PrivacyAccountant.from_state_dict(states[-1])

    def _report_extra(self) -> dict:
        """Mechanism-specific report fields (ADP-FL add theirs)."""
        s = self.dp_settings
        return {EARLIER_KEY: self._earlier_accounts, "initial_weights": self.initial_weights,
                "trainable_parameters": self.privacy["parameters"], "dp_defaults": self.dp_defaults,
                "small_fold_warning": self.privacy["small_fold_warning"], "validation": self.validation_note(),
                "augmentation_multiplicity": s["augmentation_multiplicity"], "momentum": s["momentum"],
                "released_model": "weights" if s["ema_decay"] is None else f"EMA of the weights (decay "
                                                                             f"{s['ema_decay']}), post-processing"}

    def write_privacy_report(self, final: bool) -> dict:
        if self.local_rank != 0 or self.privacy is None:
            return {}
        s, pv = self.dp_settings, self.privacy
        content = report.privacy_report(
            accountant=self.accountant, noise_multiplier=pv["noise_multiplier"], sample_rate=pv["sample_rate"],
            clipping=self.rule.describe(), max_grad_norm=s["max_grad_norm"], num_cases=self.num_training_cases,
            expected_batch_size=pv["expected_batch_size"], target_epsilon=s["target_epsilon"],
            planned_steps=self._planned_steps(), budget_exhausted=self.privacy_budget_spent(),
            trainer=self.__class__.__name__, final=final, deterministic_noise=s["noise_seed"] is not None,
            deterministic_sampling=s["seed"] is not None,
            extra=self._report_extra())
        write_json_atomic(join(self.output_folder, report.REPORT_NAME), content)
        return content
