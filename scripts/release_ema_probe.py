"""What 'federation init --release-ema D' would have released, for runs fed-compare already finished: the EMA of
each run's global models (rounds 1..R) for several decays, predicted on the task's test set next to the last global.
No training: the EMA is post-processing of the released globals, so it can be applied after the fact.

    python scripts/release_ema_probe.py --work-dir work_dirs/finetune_kidney --task kidney \
        --runs "DP-FL from public weights" "DP-FL from public weights #2" --decays 0.5 0.8
"""
import argparse
import json
from pathlib import Path

import torch

from nnunet_adpfl.common.tensors import load_unique_state
from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.federation.aggregator import build_network, load_federation, plans_files
from nnunet_adpfl.federation.released import ema_of_globals
from nnunet_adpfl.nnunet.pipeline import run
from nnunet_adpfl.workflows.fed_experiment import run_slug
from nnunet_adpfl.workflows.stages import CONFIGURATION, Layout, evaluate_folder


def probe(work: Path, task: str, name: str, trainer: str, decays: list[float]) -> dict:
    config = CONFIGURATION[task]
    lay = Layout(work / task, ["A", "B", "C"], run_slug(name))
    rounds = load_federation(lay.fed)["rounds"]
    pooled = next((work / task / "pooled_raw").glob("Dataset*"))
    plans, dataset_json = (ff.read_json(p) for p in plans_files(lay.fed))
    fold = Path(lay.site_env("A")["nnUNet_results"]) / pooled.name / f"{trainer}__nnUNetPlans__{config}" / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False, map_location="cpu")  # our own file
    dice = {}
    for decay in decays:
        net = build_network(plans, dataset_json, config)
        load_unique_state(net, ema_of_globals((ff.stored_global(lay.fed, r) for r in range(1, rounds + 1)), decay))
        name_chk = f"checkpoint_release_ema_{decay}.pth"
        torch.save({**checkpoint, "network_weights": net.state_dict()}, fold / name_chk)
        out = lay.results / "predictions_release_ema" / str(decay)
        run(["nnUNetv2_predict", "-i", str(pooled / "imagesTs"), "-o", str(out), "-d", str(lay.dataset_id), "-c",
             config, "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1", "-chk", name_chk],
            lay.site_env("A"), lay.logs / f"predict_release_ema_{decay}.log")
        dice[decay] = evaluate_folder(pooled, out)
    return dice


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="fed-compare's --work-dir")
    p.add_argument("--task", required=True, choices=sorted(CONFIGURATION))
    p.add_argument("--runs", nargs="+", required=True, help="run names as in the work dir's results.json")
    p.add_argument("--decays", nargs="+", type=float, default=[0.5, 0.8])
    a = p.parse_args()
    work = Path(a.work_dir).resolve()
    results = json.loads((work / a.task / "results.json").read_text())
    print("| run | released model | " + " | ".join(results[a.runs[0]]["global_test_dice"]) + " | mean |")
    for name in a.runs:
        rows = {"last global": results[name]["global_test_dice"],
                **{f"EMA, decay {d}": v for d, v in probe(work, a.task, name, results[name]["trainer"], a.decays).items()}}
        for label, dice in rows.items():
            values = list(dice.values())
            print(f"| {name} | {label} | " + " | ".join(f"{v:.3f}" for v in values) +
                  f" | {sum(values) / len(values):.3f} |", flush=True)


if __name__ == "__main__":
    main()
