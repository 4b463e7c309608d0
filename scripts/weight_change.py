"""How far a finished fed-compare run moved the model: ||theta_R - theta_0|| over the tensors that changed, absolute
and relative to their norm at round 0 (theta_0: public or random initial weights), from the signed global models.

    python scripts/weight_change.py --work-dir work_dirs/seeds_kidney --task kidney --runs "DP-FL from public weights"
"""
import argparse
from pathlib import Path

from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.federation.aggregator import load_federation
from nnunet_adpfl.workflows.fed_experiment import run_slug


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="fed-compare's --work-dir")
    p.add_argument("--task", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="run names as in the work dir's results.json")
    a = p.parse_args()
    for name in a.runs:
        fed = Path(a.work_dir) / a.task / run_slug(name)
        rounds = load_federation(fed)["rounds"]
        start, end = ff.stored_global(fed, 0), ff.stored_global(fed, rounds)
        moved = [k for k, v in start.items() if v.is_floating_point() and not end[k].equal(v)]
        change = sum((end[k].double() - start[k].double()).norm() ** 2 for k in moved) ** 0.5
        norm = sum(start[k].double().norm() ** 2 for k in moved) ** 0.5
        print(f"{name}: {len(moved)} tensors moved, ||theta_R - theta_0|| = {change:.4f} ({100 * change / norm:.1f}% "
              f"of their norm at round 0)")


if __name__ == "__main__":
    main()
