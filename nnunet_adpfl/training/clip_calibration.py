"""Clip norm C chosen on public data (DESIGN.md section 8).

The noise of a private step is sigma*C/B per coordinate whatever the cases' gradient norms are. When those norms
are far below C (fine-tuning ``norm_bias`` from public weights on the synthetic kidney: median 0.04 against the
default C = 1) nearly all of that noise buys nothing. ``nnUNetTrainerDPClipCalibration`` measures per-case gradient
norms on a *public* cohort at the initial (public) weights, with the private step's loss, trainable parameters and
augmentation multiplicity, and writes their quantiles to ``clip_calibration.json``. Choosing C from them costs no
privacy: no private case is read. It trains nothing and writes no checkpoint (like nnU-Net's benchmark trainer).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..common.atomic import write_json_atomic
from ..privacy.noisy_step import per_case_norms
from ..privacy.sampling import batch_to_device
from .dp_trainer import nnUNetTrainerDP

CALIBRATION_FILE = "clip_calibration.json"
REPORTED_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
DEFAULT_QUANTILE = 0.5  # the median, as adaptive clipping targets (Andrew et al.)


def summarise_norms(norms, quantile: float = DEFAULT_QUANTILE) -> dict:
    """Quantiles of measured per-case gradient norms and the clip norm at ``quantile``."""
    norms = np.asarray(norms, dtype=float)
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if norms.size == 0:
        raise ValueError("no per-case gradient was measured (every Poisson batch was empty): raise "
                         "num_iterations_per_epoch or expected_batch_size")
    if not np.all(np.isfinite(norms)):
        raise ValueError("a per-case gradient norm is not finite: the initial weights or the data are broken")
    return {"cases_measured": int(norms.size), "mean": float(norms.mean()),
            "quantiles": {str(q): float(np.quantile(norms, q)) for q in REPORTED_QUANTILES},
            "quantile": quantile, "suggested_max_grad_norm": float(np.quantile(norms, quantile))}


def read_suggested_clip(path: str | os.PathLike) -> float:
    """The clip norm a calibration file suggests (clear error when it is missing or not a calibration)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())["suggested_max_grad_norm"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no clip calibration at {path}: run nnUNetv2_train <public dataset> ... -tr "
                                "nnUNetTrainerDPClipCalibration -pretrained_weights <public weights>") from None
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a clip calibration (no 'suggested_max_grad_norm')") from None
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{path}: suggested_max_grad_norm must be > 0, got {value!r}")
    return float(value)


class nnUNetTrainerDPClipCalibration(nnUNetTrainerDP):
    """Per-case gradient norms on a public dataset at the initial weights -> ``clip_calibration.json``.

    Run it on public data only. Settings as for the private run (``dp_trainable``, ``augmentation_multiplicity``,
    ``expected_batch_size``); ``num_iterations_per_epoch`` Poisson batches are measured. No noise is added, so no
    noise multiplier is calibrated (that search took 90-150 s at the start on a loaded 2-core machine)."""
    takes_private_steps = False  # dp_defaults: only dp_trainable (as the private run's rule) and B

    def _noise_multiplier(self, sample_rate: float) -> float:
        return 0.0

    def _budget_steps(self, sample_rate: float, sigma: float, remaining: int) -> int:
        return remaining

    def run_training(self):
        self.on_train_start()
        self.network.train()
        engine = self.privacy["per_case"]
        norms = []
        for _ in range(self.num_iterations_per_epoch):
            data, target = batch_to_device(next(self.dataloader_train), self.device)
            if data is None:
                continue
            norms += [per_case_norms(grads).detach().cpu() for grads, _ in engine.chunks(data, target)]
        result = summarise_norms(torch.cat(norms).numpy() if norms else [])
        result.update({"dp_trainable": self.dp_settings["dp_trainable"],
                       "trainable_parameters": self.privacy["parameters"]["trainable"],
                       "augmentation_multiplicity": self.dp_settings["augmentation_multiplicity"],
                       "initial_weights": self.initial_weights,
                       "note": "measured on the dataset this trainer ran on: use it only if that dataset is public"})
        write_json_atomic(join(self.output_folder, CALIBRATION_FILE), result)
        q = result["quantiles"]
        self.print_to_log_file(
            f"per-case gradient norms of {result['cases_measured']} cases ({result['dp_trainable']}, "
            f"{result['trainable_parameters']:,} parameters): 10% {q['0.1']:.4g}, median {q['0.5']:.4g}, "
            f"90% {q['0.9']:.4g}; suggested max_grad_norm {result['suggested_max_grad_norm']:.4g} -> "
            f"{join(self.output_folder, CALIBRATION_FILE)}")
        nnUNetTrainer.on_train_end(self)  # loaders shut down; not the DP trainers' privacy report: nothing private ran

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass

    def save_checkpoint(self, filename: str) -> None:
        pass
