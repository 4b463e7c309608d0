"""Issue 39: with nnU-Net's recommended ResEnc presets the plan's batch is an input of the DP defaults, never a
reason to stop. Real nnUNetPlannerResEncM plan and preprocessing of the small test dataset, then the DP trainer
initialises with that plan and with the same plan at the issue's batch of 10 (more than the fold's 8 cases).
The default suite checks the same logic on nnU-Net's default plan (test_dp_defaults.py, batch 10)."""
import json

import pytest
import torch

from nnunet_adpfl.training import dp_defaults

RESENC_PLANS = "nnUNetResEncUNetMPlans"


@pytest.fixture
def resenc_plans(nnunet_paths, kidney_preprocessed, tmp_path):
    from nnunet_adpfl.nnunet.pipeline import nnunet_command, run
    root, env = kidney_preprocessed
    folder = next((root / "nnUNet_preprocessed").glob("Dataset501_*"))
    if not (folder / f"{RESENC_PLANS}_3d_fullres").is_dir():
        run([nnunet_command("nnUNetv2_plan_experiment"), "-d", "501", "-pl", "nnUNetPlannerResEncM"], env,
            tmp_path / "plan.log")
        run([nnunet_command("nnUNetv2_preprocess"), "-d", "501", "-plans_name", RESENC_PLANS, "-c", "3d_fullres",
             "-np", "1"], env, tmp_path / "preprocess.log")
    plans = json.loads((folder / f"{RESENC_PLANS}.json").read_text())
    plans["plans_name"] = f"{RESENC_PLANS}B10"  # same preprocessed data (the configuration's data_identifier)
    plans["configurations"]["3d_fullres"]["batch_size"] = 10
    (folder / f"{RESENC_PLANS}B10.json").write_text(json.dumps(plans))
    return RESENC_PLANS, f"{RESENC_PLANS}B10"


@pytest.mark.slow  # nnU-Net's ResEnc-M planning and preprocessing: about a minute on a loaded machine
@pytest.mark.parametrize("settings", [{"dp_max_case_passes": 4000}, {"dp_defaults": "nnunet"}])
def test_resenc_m_plan_never_stops_the_dp_trainer(resenc_plans, tmp_path, monkeypatch, settings):
    from nnunetv2.run.run_training import get_trainer_from_args
    f = tmp_path / "settings.json"
    f.write_text(json.dumps(settings))
    monkeypatch.setenv("nnUNet_adpfl_config", str(f))
    for plans_name in resenc_plans:
        trainer = get_trainer_from_args("501", "3d_fullres", 0, "nnUNetTrainerDPSGD", plans_name,
                                        device=torch.device("cpu"))
        trainer.initialize()
        n = len(trainer.do_split()[0])
        assert type(trainer.network).__name__ == "ResidualEncoderUNet"
        batch = trainer.dp_settings["expected_batch_size"]
        assert 1 <= batch <= n // 2 and trainer.dp_defaults["chosen"]["expected_batch_size"] == batch
        if plans_name.endswith("B10"):
            assert trainer.batch_size == 10 > n
        if "dp_defaults" in settings:
            assert batch == dp_defaults.unset_batch(trainer.batch_size, n)
        trainer.get_dataloaders()
        assert trainer._sample_rate() == pytest.approx(batch / n)
