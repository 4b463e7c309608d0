"""Morphological postprocessing for models trained without DP-Morph, in nnU-Net's postprocessing format.

``determine`` tries opening, closing and both on each label of the validation predictions and keeps, per label,
the operation that improves that label's mean Dice most (none if none improves it), like nnU-Net's own
determine_postprocessing. It writes ``postprocessing.pkl`` (nnU-Net's pickle: functions + kwargs) and
``postprocessing_morph.json``; apply it with the stock command:

    nnUNetv2_apply_postprocessing -i predictions -o refined -pp_pkl_file <folder>/postprocessing.pkl \\
        -plans_json <model>/plans.json -dataset_json <model>/dataset.json
"""
from __future__ import annotations

import json
import math
import pickle
import time
from pathlib import Path


from ..evaluation.evaluation import IGNORE
from ..evaluation.metrics import dice, nanmean
from .morph import morph_postprocess

CANDIDATES = ("open", "close", "both")
PKL_NAME = "postprocessing.pkl"
JSON_NAME = "postprocessing_morph.json"


def foreground_labels(dataset_json: dict) -> list[int]:
    """Integer labels of the label maps (region-based datasets: every integer any region uses); the ignore label
    is none."""
    values = set()
    for name, v in dataset_json["labels"].items():
        if name == IGNORE:
            continue
        values.update(v if isinstance(v, (list, tuple)) else [v])
    return sorted(int(v) for v in values if int(v) != 0)


def determine(folder_predictions: str | Path, folder_ref: str | Path, dataset_json: dict, kernel: int = 3,
              min_improvement: float = 0.0) -> dict:
    """Choose an operation per label on (validation) predictions against references; write the pickle + JSON into
    ``folder_predictions`` and return the JSON content."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    folder_predictions, folder_ref = Path(folder_predictions), Path(folder_ref)
    ending = dataset_json["file_ending"]
    preds = sorted(folder_predictions.glob(f"*{ending}"))
    if not preds:
        raise FileNotFoundError(f"no predictions (*{ending}) in {folder_predictions}")
    missing = [p.name for p in preds if not (folder_ref / p.name).is_file()]
    if missing:
        raise FileNotFoundError(f"no reference for {missing[:3]}{'...' if len(missing) > 3 else ''} in {folder_ref}")
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(preds[0]), verbose=False)()
    labels = foreground_labels(dataset_json)
    ignore_label = dataset_json["labels"].get(IGNORE)
    scores = {label: {op: [] for op in ("none",) + CANDIDATES} for label in labels}
    start = time.time()
    for i, pred_file in enumerate(preds):
        pred = reader.read_seg(str(pred_file))[0][0]
        ref = reader.read_seg(str(folder_ref / pred_file.name))[0][0]
        ignored = ref == ignore_label if ignore_label is not None else None  # counts in no score, as in nnU-Net
        for label in labels:
            scores[label]["none"].append(dice(ref, pred, [label], ignored)[label])
            for op in CANDIDATES:
                refined = morph_postprocess(pred, {label: op}, kernel)
                scores[label][op].append(dice(ref, refined, [label], ignored)[label])
        print(f"[morph-postprocessing] {i + 1}/{len(preds)} cases ({time.time() - start:.0f} s)", flush=True)
    chosen, table = {}, {}
    for label in labels:
        means = {op: nanmean(v) for op, v in scores[label].items()}
        table[str(label)] = means
        best = max(CANDIDATES, key=lambda op: -1 if math.isnan(means[op]) else means[op])
        if not math.isnan(means["none"]) and means[best] > means["none"] + min_improvement:
            chosen[label] = best
    with open(folder_predictions / PKL_NAME, "wb") as f:
        pickle.dump(([morph_postprocess], [{"operations": chosen, "kernel": kernel}]), f)
    result = {"kernel": kernel, "chosen": {str(k): v for k, v in chosen.items()}, "mean_dice": table,
              "num_cases": len(preds)}
    (folder_predictions / JSON_NAME).write_text(json.dumps(result, indent=2))
    return result


def add_cli(sub) -> None:
    p = sub.add_parser("morph-postprocessing", help="choose a morphological operation per label from validation "
                       "predictions; writes nnU-Net's postprocessing.pkl")
    p.add_argument("-i", required=True, help="folder of predictions (e.g. fold_0/validation)")
    p.add_argument("-ref", required=True, help="folder of reference segmentations (e.g. gt_segmentations)")
    p.add_argument("-dataset_json", required=True)
    p.add_argument("--kernel", type=int, default=3)
    p.set_defaults(func=_cmd)


def _cmd(a) -> int:
    result = determine(a.i, a.ref, json.loads(Path(a.dataset_json).read_text()), a.kernel)
    print(json.dumps(result, indent=2))
    print(f"written: {Path(a.i) / PKL_NAME}")
    return 0
