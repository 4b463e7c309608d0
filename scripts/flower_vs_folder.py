"""Seconds and bytes per round, the Flower transport next to the shared folder, in one run (docs/FLOWER.md).

Same data, plan, trainer and settings (deterministic DP-FL) for both; the shared-folder federation runs first, then
the same federation over Flower (SuperLink with TLS + node authentication on loopback). The sites load data with one
nnU-Net worker (as `simulate` does), so the two final models are not bit-identical here ("same_final_weights" is
informational; tests/test_flower_federation.py checks the equality in deterministic mode). Seconds per round: mean time between consecutive global models after
round 1 (round 1 also holds the start-up). Bytes per round: shared folder = update files written + every global
read by every site; Flower = payload bytes the relay pushed and pulled (globals, updates, federation.json, plans).

    OMP_NUM_THREADS=1 nnUNet_compile=f python scripts/flower_vs_folder.py --work-dir work_dirs/flower_bench
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path

import torch

from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.federation.aggregator import create_federation
from nnunet_adpfl.workflows.flower_simulate import train_federated_flower
from nnunet_adpfl.workflows.stages import (Layout, bytes_exchanged, new_run, stage_data, stage_plan,
                                           train_federated)

SITES = ["A", "B", "C"]
CONFIG = "2d"


def seconds_per_round(fed: Path, rounds: int) -> float:
    t = [datetime.fromisoformat(ff.read_json(ff.global_paths(fed, r)[1])["created"]).timestamp()
         for r in range(1, rounds + 1)]
    return (t[-1] - t[0]) / (rounds - 1)


def final_global(fed: Path, rounds: int) -> dict:
    tensor_path, manifest_path = ff.global_paths(fed, rounds)
    return ff.read_verified_tensors(tensor_path, ff.read_json(manifest_path), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="work_dirs/flower_bench")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iterations", type=int, default=3)
    a = p.parse_args()
    work = Path(a.work_dir).resolve()
    planning = Layout(work, SITES, run="planning")
    pooled = stage_data(planning, "skin", num_cases=18, scale=0.25, seed=0)
    if not (planning.fed / ff.FEDERATION_FILE).exists():
        create_federation(planning.fed, planning.keys, SITES, 1, 1, "npfl", configuration=CONFIG)
    stage_plan(planning, pooled, CONFIG)
    settings = {"num_val_iterations_per_epoch": 1, "target_epsilon": 8, "seed": 1, "noise_seed": 2}
    stamp = time.strftime("%Y%m%d_%H%M%S")
    result = {"rounds": a.rounds, "iterations_per_round": a.iterations, "sites": len(SITES)}
    for transport in ("folder", "flower"):
        lay = Layout(work, SITES, run=f"bench_{transport}_{stamp}")
        new_run(lay, planning.fed, "dpfl", a.rounds, 1, a.iterations, CONFIG, seed=0)
        if transport == "folder":
            wall = train_federated(lay, "nnUNetTrainerDPFL", CONFIG, settings, a.rounds)
            up, down = bytes_exchanged(lay.fed)
            total = up + down * len(SITES)
        else:
            wall = train_federated_flower(lay, "nnUNetTrainerDPFL", CONFIG, settings, a.rounds)
            stats = ff.read_json(lay.fed / "relay_stats.json")
            total = stats["bytes_pushed"] + stats["bytes_pulled"]
            result["flower_messages"] = stats["messages"]
        result[transport] = {"wall_s": round(wall, 1), "seconds_per_round": round(seconds_per_round(lay.fed, a.rounds), 1),
                             "bytes_per_round": round(total / a.rounds), "fed": str(lay.fed)}
        print(transport, json.dumps(result[transport]), flush=True)
    g_folder = final_global(Path(result["folder"]["fed"]), a.rounds)
    g_flower = final_global(Path(result["flower"]["fed"]), a.rounds)
    result["same_final_weights"] = all(torch.equal(g_folder[k], g_flower[k]) for k in g_folder)
    (work / "flower_vs_folder.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
