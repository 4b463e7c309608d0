"""DP-Morph through the stock commands: nnUNetv2_train -tr nnUNetTrainerDPMorphAdaptive, nnUNetv2_predict (the
morphology applied as trained), the alignment analysis, and the postprocessing through
nnUNetv2_apply_postprocessing."""
import json
import pickle

import numpy as np
import SimpleITK as sitk

from nnunet_adpfl.evaluation import alignment
from nnunet_adpfl.morphology import morph
from nnunet_adpfl.morphology import postprocessing as morph_postprocessing
from nnunet_adpfl.training.morph_trainer import PLANS_KEY
from nnunet_adpfl.nnunet.pipeline import run
from nnunet_adpfl.privacy.report import REPORT_NAME

TRAINER = "nnUNetTrainerDPMorphAdaptive"
SETTINGS = {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "target_epsilon": 8,
            "log_alignment": True, "clipping_rule": "nsgd", "morph_classes": [1, 2], "morph_anisotropic": True}


def test_morph_trainer_train_predict_postprocess(kidney_preprocessed, nnunet_paths, tmp_path):
    root, env = kidney_preprocessed
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(SETTINGS))
    env = {**env, "nnUNet_adpfl_config": str(settings), "nnUNet_n_proc_DA": "2"}
    run(["nnUNetv2_train", "501", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], env, tmp_path / "train.log")
    model = root / "nnUNet_results" / "Dataset501_SynthKidney" / f"{TRAINER}__nnUNetPlans__3d_fullres"
    fold = model / "fold_0"
    report = json.loads((fold / REPORT_NAME).read_text())
    assert report["final"] and 0 < report["epsilon"] <= 8 and report["clipping"]["rule"] == "nsgd"
    cfg = json.loads((model / "plans.json").read_text())[PLANS_KEY]  # what the predictor builds from
    assert cfg == report["dp_morph"]
    assert cfg["operations"] == ["none", "adaptive", "adaptive", "none"] and not cfg["regions"]

    # the predictor's network carries the morphology as trained, even with no settings file now
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(device=__import__("torch").device("cpu"), use_mirroring=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
    refine = predictor.network.dp_morph
    assert isinstance(refine, morph.MorphRefine) and refine.operations == cfg["operations"]

    images = root / "nnUNet_raw" / "Dataset501_SynthKidney" / "imagesTs"
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "501", "-c", "3d_fullres", "-f", "0",
         "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"],
        {k: v for k, v in env.items() if k != "nnUNet_adpfl_config"}, tmp_path / "predict.log")
    assert len(list(out.glob("*.nii.gz"))) == len(list(images.glob("*_0000.nii.gz")))

    table = alignment.analyse([fold, fold], ["a", "b"], tmp_path / "alignment")
    assert (tmp_path / "alignment" / "cos_raw_clipped.png").stat().st_size > 0 and "| a |" in table

    # postprocessing chosen on the validation predictions, applied by nnU-Net's own command
    validation = fold / "validation"
    gt = root / "nnUNet_preprocessed" / "Dataset501_SynthKidney" / "gt_segmentations"
    dataset_json = json.loads((model / "dataset.json").read_text())
    result = morph_postprocessing.determine(validation, gt, dataset_json)
    assert set(result["mean_dice"]) == {"1", "2", "3"}
    refined = tmp_path / "refined"
    run(["nnUNetv2_apply_postprocessing", "-i", str(validation), "-o", str(refined), "-pp_pkl_file",
         str(validation / morph_postprocessing.PKL_NAME), "-plans_json", str(model / "plans.json"), "-dataset_json",
         str(model / "dataset.json"), "-np", "1"], env, tmp_path / "pp.log")
    fns, kwargs = pickle.loads((validation / morph_postprocessing.PKL_NAME).read_bytes())
    for case in validation.glob("*.nii.gz"):
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(case)))
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(refined / case.name)))
        assert np.array_equal(got, morph.morph_postprocess(raw, **kwargs[0]))
