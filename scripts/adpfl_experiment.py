"""ADP-FL experiment (issue 4, item 6): NP-FL, DP-FL, ADP-FL and ADP-FL minus each mechanism on the three synthetic
tasks, 3 sites, epsilon 8, the same rounds for every run (nnunet_adpfl.workflows.fed_experiment). Resumable.

    python scripts/adpfl_experiment.py --work-dir work_dirs/adpfl_experiment --output work_dirs/adpfl_experiment/tables.md
"""
import argparse

from nnunet_adpfl.cli import install_sigterm_handler
from nnunet_adpfl.workflows.fed_experiment import RUNS, add_arguments, run_all

if __name__ == "__main__":
    install_sigterm_handler()  # a scheduler's SIGTERM stops the running federation too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, tasks=("skin", "kidney", "brain"), runs=tuple(RUNS))
    parser.set_defaults(work_dir="work_dirs/adpfl_experiment")
    run_all(parser.parse_args())
