"""plan -> train (short) -> predict through the real nnUNetv2_* commands, on CPU, for a DP trainer."""
import json

import numpy as np
import SimpleITK as sitk

from nnunet_adpfl.nnunet.pipeline import run
from nnunet_adpfl.privacy.report import PLOT_NAME, REPORT_NAME

SETTINGS = {"num_epochs": 2, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1, "target_epsilon": 8,
            "log_alignment": True}
REPORT_KEYS = {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant", "clipping",
               "max_grad_norm", "num_cases", "versions"}


def test_plan_train_predict_with_stock_commands(kidney_preprocessed, tmp_path):
    root, env = kidney_preprocessed
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(SETTINGS))
    env = {**env, "nnUNet_adpfl_config": str(settings), "nnUNet_n_proc_DA": "2"}
    run(["nnUNetv2_train", "501", "3d_fullres", "0", "-tr", "nnUNetTrainerPSAC", "-device", "cpu"], env,
        tmp_path / "train.log")
    fold = root / "nnUNet_results" / "Dataset501_SynthKidney" / "nnUNetTrainerPSAC__nnUNetPlans__3d_fullres" / "fold_0"
    report = json.loads((fold / REPORT_NAME).read_text())
    assert REPORT_KEYS <= set(report)
    assert report["final"] and report["steps"] == 6 and report["num_cases"] == 8
    assert 0 < report["epsilon"] <= 8.0 and report["clipping"] == {"rule": "psac", "r": 0.1}
    for name in ("checkpoint_final.pth", "progress.png", PLOT_NAME, "validation/summary.json"):
        assert (fold / name).exists(), name
    log = sorted(fold.glob("training_log_*.txt"))[-1].read_text()  # newest: other tests share the folder
    assert "epsilon spent" in log and "alignment cos" in log

    images = root / "nnUNet_raw" / "Dataset501_SynthKidney" / "imagesTs"
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "501", "-c", "3d_fullres", "-f", "0",
         "-tr", "nnUNetTrainerPSAC", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env,
        tmp_path / "predict.log")
    for image in images.glob("*_0000.nii.gz"):
        pred = sitk.ReadImage(str(out / (image.name[:-len("_0000.nii.gz")] + ".nii.gz")))
        ref = sitk.ReadImage(str(image))
        assert pred.GetSize() == ref.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}

    # fine-tuning from those weights with nnU-Net's own flag: the report names the file and says it must be public
    from nnunet_adpfl.common.initial_weights import file_sha256
    weights = fold / "checkpoint_final.pth"
    settings.write_text(json.dumps({**SETTINGS, "num_epochs": 1, "num_iterations_per_epoch": 2,
                                    "dp_trainable": "norm_bias"}))
    run(["nnUNetv2_train", "501", "3d_fullres", "1", "-tr", "nnUNetTrainerDPSGD", "-device", "cpu",
         "-pretrained_weights", str(weights)], env, tmp_path / "finetune.log")
    tuned = fold.parents[1] / "nnUNetTrainerDPSGD__nnUNetPlans__3d_fullres" / "fold_1"
    origin = json.loads((tuned / REPORT_NAME).read_text())["initial_weights"]
    assert origin["file_sha256"] == file_sha256(weights) and "must be public" in origin["requirement"]
    assert origin["state_sha256"] and json.loads((tuned / "initial_weights.json").read_text()) == origin
    assert origin["segmentation_layers"].startswith("transferred")  # nnU-Net alone would leave them random
