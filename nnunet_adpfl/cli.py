"""``nnunet-adpfl`` command line."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from .nnunet.paths import trainers_path


def _cmd_trainers_path(args) -> int:
    print(trainers_path())
    return 0


def _cmd_calibrate(args) -> int:
    from .privacy.accounting import PrivacyAccountant, calibrate_noise_multiplier

    q = args.batch_size / args.cases
    steps = args.epochs * args.iterations
    if args.delta >= 1 / args.cases:
        print(f"error: delta {args.delta} must be < 1/N = {1 / args.cases:.3g}", file=sys.stderr)
        return 2
    sigma = calibrate_noise_multiplier(args.epsilon, args.delta, q, steps, args.accountant)
    acc = PrivacyAccountant(args.accountant, args.delta)
    acc.step(sigma, q, steps)
    print(f"noise_multiplier {sigma:.4f} for epsilon {acc.epsilon():.3f} (target {args.epsilon}), delta {args.delta}, "
          f"sample rate {q:.4g}, {steps} steps, accountant {args.accountant}")
    return 0


# The modules whose add_cli defines each command, in the order of the help listing, with the commands' help lines.
# Most of them import torch and nnU-Net (tens of seconds on a loaded machine): a command's module is imported only
# when that command is parsed (tests/test_cli_imports.py checks the help lines against the modules).
COMMAND_MODULES: tuple[tuple[str, dict[str, str]], ...] = (
    ("nnunet_adpfl.data.synthetic", {"make-dataset": "write a synthetic multi-site nnU-Net raw dataset"}),
    ("nnunet_adpfl.workflows.demo", {
        "demo": "synthetic data -> plan -> train standard and DP nnU-Net -> predict -> table"}),
    ("nnunet_adpfl.federation.commands", {
        "federation": "create a federation folder",
        "fingerprint": "at a site: share the aggregate fingerprint of dataset -d",
        "plan": "coordinator: one nnU-Net plan from the sites' aggregate fingerprints",
        "install-plan": "at a site: install the federation plan before nnUNetv2_preprocess",
        "aggregate": "coordinator: run the aggregator (restartable)"}),
    ("nnunet_adpfl.federation.flower_commands", {
        "flower": "the network transport (Flower): credentials, app, proxy, connection, supernode"}),
    ("nnunet_adpfl.workflows.simulate", {
        "simulate": "a whole federation on this machine (aggregator + sites as processes)"}),
    ("nnunet_adpfl.workflows.fed_experiment", {
        "fed-compare": "NP-FL vs DP-FL vs ADP-FL (and ablations) as simulated federations on synthetic data, with a "
                       "result table"}),
    ("nnunet_adpfl.morphology.postprocessing", {
        "morph-postprocessing": "choose a morphological operation per label from validation predictions; writes "
                                "nnU-Net's postprocessing.pkl"}),
    ("nnunet_adpfl.evaluation.alignment", {
        "alignment": "gradient-alignment plots and table from several runs' fold folders"}),
    ("nnunet_adpfl.workflows.compare", {
        "compare-table": "method x dataset table of mean Dice from several compare reports",
        "compare": "standard nnU-Net vs local, NP-FL, DP-FL, ADP-FL (and trainers by name): train, predict a held-out "
                   "test set, report with metrics and plots"}),
    ("nnunet_adpfl.workflows.pretrain", {
        "pretrain-public": "standard nnU-Net on a public cohort with a federation's plan: the initial weights for "
                           "private fine-tuning"}),
    ("nnunet_adpfl.workflows.recipe", {
        "recipe": "what the DP trainers choose for N cases (or settings for a grid): noise, SNR"}),
    ("nnunet_adpfl.privacy.audit", {
        "audit": "empirical epsilon lower bound from canaries (one-run audit) next to the accounted epsilon"}),
    ("nnunet_adpfl.workflows.trainer_audit", {
        "audit-trainer": "empirical epsilon lower bound from canaries, through an nnU-Net DP trainer on a preprocessed "
                         "dataset (settings: $nnUNet_adpfl_config)"}),
)


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The CLI's parser. ``command``: the command whose module is imported and whose arguments are defined; the
    other commands are listed by name and help line only. '*' (default): every command's arguments (imports every
    module, torch and nnU-Net included); None: names and help lines only (no heavy import)."""
    parser = argparse.ArgumentParser(prog="nnunet-adpfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("trainers-path", help="print the folder for nnUNet_extTrainer")
    p.set_defaults(func=_cmd_trainers_path)

    p = sub.add_parser("calibrate", help="noise multiplier for a target epsilon (to plan a DP run)")
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--cases", type=int, required=True, help="number of training cases N")
    p.add_argument("--batch-size", type=int, default=2, help="expected batch size")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--iterations", type=int, default=250, help="steps per epoch")
    p.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    p.set_defaults(func=_cmd_calibrate)

    for module, helps in COMMAND_MODULES:
        if command == "*" or command in helps:
            importlib.import_module(module).add_cli(sub)
        else:
            for name, help_line in helps.items():
                sub.add_parser(name, help=help_line, add_help=False)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The command ``argv`` names: its first word that is no option (the top level has no option with a value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds, so running commands stop their child processes


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def install_sigterm_handler() -> None:
    """SIGTERM unwinds this process. Forked children (nnU-Net's in-process multiprocessing pools) get the
    default action back: a Python handler can miss a SIGTERM that arrives just before a blocking lock wait, and
    then ``Pool.terminate()`` waits for that worker forever."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_default_sigterm)
        _fork_hook_registered = True


_fork_hook_registered = False


def main(argv: list[str] | None = None) -> int:
    install_sigterm_handler()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_of(argv)).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
