"""A federated trainer started without its site settings (issue 37): a short message, no traceback, no output
folder left behind."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nnunet_adpfl.common.config import SettingsError

FEDERATED = {"nnUNetTrainerFL": ("npfl", "nnUNetTrainer"), "nnUNetTrainerDPFL": ("dpfl", "nnUNetTrainerDPSGD"),
             "nnUNetTrainerADPFL": ("adpfl", "nnUNetTrainerDPSGD"),
             "nnUNetTrainerADPFLMorph": ("adpfl", "nnUNetTrainerDPMorph")}


def _check_message(text: str, name: str, mode: str, single_site: str) -> None:
    assert "$nnUNet_adpfl_config is unset" in text and f"{name} trains one site of a federation" in text
    assert f"nnunet-adpfl federation init /shared/fed --sites A,B,C --rounds 20 --mode {mode}" in text
    assert "nnunet-adpfl aggregate /shared/fed" in text and f"-tr {single_site}" in text
    simulated = name != "nnUNetTrainerADPFLMorph"  # nnunet-adpfl simulate runs FL, DPFL and ADPFL
    assert (f"nnunet-adpfl simulate --sites 3 --trainer {name}" in text) == simulated


@pytest.mark.parametrize("name", sorted(FEDERATED))
def test_federated_trainer_without_settings_stops_before_the_output_folder(nnunet_paths, name):
    """Through nnU-Net's own get_trainer_from_args (what nnUNetv2_train calls)."""
    from nnunetv2.run.run_training import get_trainer_from_args
    root, env = nnunet_paths
    before = set(root.rglob(f"{name}__*"))  # other tests share this nnU-Net root
    with pytest.raises(SystemExit) as stop:
        get_trainer_from_args("501", "3d_fullres", 0, name, "nnUNetPlans", device=torch.device("cpu"))
    _check_message(str(stop.value.code), name, *FEDERATED[name])
    assert set(root.rglob(f"{name}__*")) == before  # no nnU-Net output folder <trainer>__<plans>__<configuration>


def test_settings_file_without_site_keys_names_them(nnunet_paths, tmp_path, monkeypatch):
    from nnunetv2.run.run_training import get_trainer_from_args
    settings = tmp_path / "s.json"
    settings.write_text('{"site_id": "A"}')
    monkeypatch.setenv("nnUNet_adpfl_config", str(settings))
    with pytest.raises(SystemExit, match=f"the settings file {settings} .* lacks federation_dir, site_key_file"):
        get_trainer_from_args("501", "3d_fullres", 0, "nnUNetTrainerDPFL", "nnUNetPlans", device=torch.device("cpu"))


@pytest.mark.slow
def test_nnUNetv2_train_without_settings_prints_no_traceback(nnunet_paths):
    """The stock command (about 30 s on 2 busy CPU cores, most of it nnU-Net's trainer search)."""
    root, env = nnunet_paths
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "nnUNet_adpfl_config"}
    train = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    done = subprocess.run([train, "501", "3d_fullres", "0", "-tr", "nnUNetTrainerADPFL", "-device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    _check_message(done.stderr, "nnUNetTrainerADPFL", "adpfl", "nnUNetTrainerDPSGD")
    assert not list(root.rglob("nnUNetTrainerADPFL__*"))


@pytest.mark.parametrize("name", ["nnUNetTrainerDPFL", "nnUNetTrainerADPFL"])
def test_a_private_site_without_noise_is_refused_before_it_joins(nnunet_paths, tmp_path, monkeypatch, name):
    """noise_multiplier 0 and no target: every upload would be unprotected (epsilon infinite)."""
    from nnunetv2.run.run_training import get_trainer_from_args
    f = tmp_path / "site.json"
    f.write_text(json.dumps({"federation_dir": str(tmp_path / "fed"), "site_id": "A", "site_key_file": "A.key",
                             "target_epsilon": None, "noise_multiplier": 0.0}))
    monkeypatch.setenv("nnUNet_adpfl_config", str(f))
    with pytest.raises(SettingsError, match="without any privacy guarantee"):
        get_trainer_from_args("501", "3d_fullres", 0, name, "nnUNetPlans", device=torch.device("cpu"))
