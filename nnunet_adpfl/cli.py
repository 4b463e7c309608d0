"""``nnunet-adpfl`` command line."""
from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    from .data import synthetic
    from .evaluation import alignment
    from .federation import commands as fed_cli
    from .federation import flower_commands
    from .morphology import postprocessing as morph_postprocessing
    from .privacy import audit
    from .workflows import compare, demo, fed_experiment, pretrain, recipe, simulate, trainer_audit

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

    synthetic.add_cli(sub)
    demo.add_cli(sub)
    fed_cli.add_cli(sub)
    flower_commands.add_cli(sub)
    simulate.add_cli(sub)
    fed_experiment.add_cli(sub)
    morph_postprocessing.add_cli(sub)
    alignment.add_cli(sub)
    compare.add_cli(sub)
    pretrain.add_cli(sub)
    recipe.add_cli(sub)
    audit.add_cli(sub)
    trainer_audit.add_cli(sub)
    return parser


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
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
