"""The one-run audit through a real nnU-Net DP trainer (nnunet-adpfl audit-trainer): a run with the noise off
breaks the accounted epsilon, the real trainer at the same settings does not."""
import json
from pathlib import Path

import pytest

from nnunet_adpfl.privacy.audit import PLOT_NAME, REPORT_NAME
from nnunet_adpfl.workflows.trainer_audit import run_trainer_audit

SETTINGS = {"target_epsilon": 1.0, "num_epochs": 1, "num_iterations_per_epoch": 12, "num_val_iterations_per_epoch": 1,
            "dp_trainable": "norm_bias"}
CANARIES = 200  # 20 guesses per side: 40 right guesses alone bound epsilon >= ~2.5 at 95%


def _audit(tmp_path, monkeypatch, broken):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(SETTINGS))
    monkeypatch.setenv("nnUNet_adpfl_config", str(settings))
    return run_trainer_audit("nnUNetTrainerDPSGD", "501", "3d_fullres", canaries=CANARIES, broken=broken)


def test_trainer_audit_detects_a_run_without_noise_and_passes_the_real_one(nnunet_paths, tmp_path, monkeypatch):
    broken = _audit(tmp_path, monkeypatch, "no_noise")
    assert broken["steps"] == 12 and broken["accounted_epsilon"] == pytest.approx(1.0, rel=0.02)
    assert broken["empirical_epsilon_lower_bound"] > broken["accounted_epsilon"]
    assert broken["guesses_made"] == 2 * CANARIES // 10 and broken["canary_draws"] > 0

    real = _audit(tmp_path, monkeypatch, "none")
    assert real["mechanism"] == "as accounted" and real["noise_multiplier"] == broken["noise_multiplier"]
    assert real["empirical_epsilon_lower_bound"] < real["accounted_epsilon"]
    root, env = nnunet_paths
    fold = next(Path(env["nnUNet_results"]).glob("Dataset501_*/nnUNetTrainerDPSGDAudit__nnUNetPlans__3d_fullres/fold_0"))
    assert json.loads((fold / REPORT_NAME).read_text())["broken"] == "none"
    assert (fold / PLOT_NAME).stat().st_size > 10_000


def test_trainer_audit_refuses_what_it_cannot_audit(nnunet_paths, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="not a DP trainer"):
        run_trainer_audit("nnUNetTrainer", "501", "3d_fullres")
    with pytest.raises(SystemExit, match="federated trainer"):
        run_trainer_audit("nnUNetTrainerDPFL", "501", "3d_fullres")
    with pytest.raises(SystemExit, match="Could not find a dataset with the ID 999"):
        run_trainer_audit("nnUNetTrainerDPSGD", "999", "3d_fullres")
    with pytest.raises(SystemExit, match="did not start with 'Dataset'"):
        run_trainer_audit("nnUNetTrainerDPSGD", "kidney", "3d_fullres")
    with pytest.raises(ValueError, match="guesses per side"):
        run_trainer_audit("nnUNetTrainerDPSGD", "501", "3d_fullres", canaries=10, guesses=6)
