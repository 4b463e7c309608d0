"""Inject realistic privacy bugs one at a time and report which ones the test suite catches (issue 36).

Each mutation is a text substitution in one source file, applied to a temporary copy of the repository (the
checkout is never touched); the tests that guard that invariant then run in the copy, whose package shadows the
installed one. A mutation is caught when one of those tests fails (pytest exit status 1; a
collection error does not count). The unmutated copy must pass the same tests first.
Minutes on a CPU (several tests build an nnU-Net trainer); not part of the default suite:

    python scripts/mutation_check.py            # all mutations
    python scripts/mutation_check.py --only noise_sigma_not_sigma_C skip_empty_batches
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP = "tests/test_dp_step_invariants.py"
TRAINER = "tests/test_dp_trainer_invariants.py"
GHOST = "tests/test_grad_sample_engines.py::test_ghost_engine_norms_and_clipped_sum_match_the_per_case_loop"
GHOST_FP32 = "tests/test_grad_sample_engines.py::test_ghost_engine_keeps_each_case_within_the_clip_bound_in_fp32"
GHOST_CANCEL = "tests/test_grad_sample_engines.py::test_ghost_engine_clips_a_crafted_case_whose_gradient_cancels"


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("non_finite_case", "a case with an inf/NaN gradient is clipped like any other (0 x inf = NaN sum)",
             "nnunet_adpfl/privacy/noisy_step.py",
             "grads, n = drop_non_finite(grads, per_case_norms(grads))", "n = per_case_norms(grads)",
             ("tests/test_noise.py",)),
    Mutation("noise_sigma_not_sigma_C", "noise std sigma instead of sigma * C",
             "nnunet_adpfl/training/dp_trainer.py",
             "self._gradient_noise_multiplier() * clip)", "self._gradient_noise_multiplier())",
             (STEP,)),
    Mutation("loader_at_plan_batch", "the loader samples at the plan's batch / N, the accountant at expected_batch_size / N",
             "nnunet_adpfl/training/dp_trainer.py",
             "sample_rate=self._sample_rate(),", "sample_rate=self.batch_size / self.num_training_cases,",
             (f"{TRAINER}::test_loader_samples_at_the_accountants_rate_with_an_expected_batch_unlike_the_plans",)),
    Mutation("adpfl_unsplit_noise", "ADP-FL adds the count noise without splitting the gradient noise",
             "nnunet_adpfl/training/adpfl_trainer.py",
             "return tracker.gradient_noise_multiplier(sigma) if tracker is not None else sigma", "return sigma",
             (STEP,)),
    Mutation("restore_oldest_account", "resuming restores the oldest logged accountant state, not the newest",
             "nnunet_adpfl/training/dp_trainer.py",
             "PrivacyAccountant.from_state_dict(states[-1])", "PrivacyAccountant.from_state_dict(states[0])",
             (f"{TRAINER}::test_checkpoints_carry_no_unnoised_value_and_restore_the_newest_account",)),
    Mutation("skip_empty_batches", "an empty Poisson draw is skipped: no noise, no step accounted",
             "nnunet_adpfl/training/dp_trainer.py",
             "        pv, s = self.privacy, self.dp_settings\n",
             "        pv, s = self.privacy, self.dp_settings\n"
             "        if batch[\"data\"] is None:\n            return {\"loss\": np.array(float(\"nan\"))}\n",
             (STEP,)),
    Mutation("multiplicity_ignored", "the per-case engine ignores augmentation multiplicity (sensitivity K * C)",
             "nnunet_adpfl/training/dp_trainer.py",
             's["max_physical_batch_size"], s["augmentation_multiplicity"]),', 's["max_physical_batch_size"], 1),',
             (f"{TRAINER}::test_k_augmented_patches_of_a_case_are_clipped_together",)),
    Mutation("unnoised_loss_in_checkpoint", "the mean training loss of the private batches goes into the checkpoint",
             "nnunet_adpfl/training/dp_trainer.py",
             'self.logger.log("train_losses", math.nan, self.current_epoch)',
             'self.logger.log("train_losses", float(np.nanmean([float(o["loss"]) for o in train_outputs])), '
             'self.current_epoch)',
             (f"{TRAINER}::test_checkpoints_carry_no_unnoised_value_and_restore_the_newest_account",)),
    Mutation("unordered_workers", "nnU-Net's NonDetMultiThreadedAugmenter (draws reordered and dropped by finishing "
             "time)", "nnunet_adpfl/privacy/sampling.py",
             "    return MultiThreadedAugmenter(_OneTorchThread(loader), None, num_processes, num_cached_per_queue=2, "
             "seeds=None,\n                                  pin_memory=pin_memory)",
             "    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter\n"
             "    return NonDetMultiThreadedAugmenter(loader, None, num_processes, 6, None, pin_memory, 0.002)",
             ("tests/test_privacy_invariants.py",)),
    Mutation("resume_from_best", "a DP run continues from checkpoint_best.pth",
             "nnunet_adpfl/privacy/resume.py",
             "if checkpoint is not None and Path(checkpoint).name == UNCOVERED_CHECKPOINT:", "if False:",
             (f"{TRAINER}::test_resume_from_checkpoint_best_is_refused_and_a_fresh_start_reports_the_earlier_account",)),
    Mutation("validation_on_training_cases", "fold 'all' validates on its training cases (unnoised Dice in every "
             "checkpoint)", "nnunet_adpfl/training/held_out.py",
             "return list(tr_keys), []", "return list(tr_keys), list(tr_keys)",
             ("tests/test_held_out_validation.py::test_fold_all_releases_no_validation_value_of_its_training_cases",)),
    Mutation("sampling_seed_unflagged", "the site `seed` setting (predictable Poisson draws) is not flagged",
             "nnunet_adpfl/training/dp_trainer.py",
             'deterministic_sampling=s["seed"] is not None,', "deterministic_sampling=False,",
             (f"{TRAINER}::test_the_sampling_seed_voids_the_guarantee_in_the_report",)),
    Mutation("instance_norm_running_stats", "InstanceNorm with running statistics (unnoised averages) is accepted",
             "nnunet_adpfl/training/trainable.py",
             "_InstanceNorm) and module.track_running_stats:", "_InstanceNorm) and False:",
             ("tests/test_privacy_invariants.py",)),
    Mutation("ghost_norm_dropped", "book-keeping: the ghost-norm layers are left out of the per-case norms (cases "
             "clipped by a norm smaller than their gradient's)",
             "nnunet_adpfl/privacy/grad_sample.py",
             "sq = sq + ghost_sq_norm(module, a, g, multiplicity)", "sq = sq",
             (GHOST,)),
    Mutation("ghost_sum_unscaled", "book-keeping: the ghost layers' share of the sum is the unclipped batch gradient",
             "nnunet_adpfl/privacy/grad_sample.py",
             "g.to(GHOST_DTYPE) * patch_scale.view(shape)", "g.to(GHOST_DTYPE)",
             (GHOST,)),
    Mutation("ghost_norm_cancels", "book-keeping: the ghost norm is the Gram product summed in fp32 without its "
             "rounding bound (a crafted case whose gradient cancels gets a norm near 0 and enters the sum unclipped)",
             "nnunet_adpfl/privacy/grad_sample.py",
             "return (gram_a * gram_g).flatten(1).sum(1).clamp_min(0) + gamma * magnitude",
             "return (gram_a.float() * gram_g.float()).flatten(1).sum(1).to(GHOST_DTYPE)",
             (GHOST_CANCEL,)),
    Mutation("cascade_accepted", "a 3d_cascade_fullres stage trains under DP (its input comes from models outside "
             "the account)", "nnunet_adpfl/training/dp_trainer.py",
             "        if self.is_cascaded:", "        if False:",
             ("tests/test_dp_trainer.py::test_a_cascade_stage_is_refused",)),
    Mutation("ghost_norm_low_precision", "book-keeping: the output-gradient Gram matrix in bf16 (ghost norms off by "
             "rounding, a case's contribution above C)",
             "nnunet_adpfl/privacy/grad_sample.py",
             "gram_g = torch.bmm(cg, cg.transpose(1, 2))",
             "gram_g = torch.bmm(cg.bfloat16(), cg.transpose(1, 2).bfloat16()).to(cg.dtype)",
             (GHOST_FP32,)),
]


def copy_repo(target: Path) -> None:
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "work_dirs",
                                                                 "demo_output", ".pytest_cache"))


def run_tests(root: Path, tests: tuple[str, ...], log: Path) -> int:
    env = {**os.environ, "nnUNet_compile": "f", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    with open(log, "w") as out:
        return subprocess.run(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def check_shadowing(root: Path) -> None:
    """The copy's package, not the installed checkout, must be the one the tests import."""
    out = subprocess.run([sys.executable, "-c", "import nnunet_adpfl; print(nnunet_adpfl.__file__)"], cwd=root,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"the tests would import {out}, not the mutated copy in {root}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=[m.name for m in MUTATIONS], help="run only these mutations")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies and test logs")
    args = p.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    work = Path(tempfile.mkdtemp(prefix="mutation_check_"))
    rows, escaped = [], 0
    try:
        clean = work / "clean"
        copy_repo(clean)
        check_shadowing(clean)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        if run_tests(clean, tests, work / "clean.log"):
            print((work / "clean.log").read_text()[-3000:])
            raise SystemExit("the unmutated copy fails the tests: fix that first")
        for m in chosen:
            root = work / m.name
            copy_repo(root)
            source = root / m.path
            text = source.read_text()
            if text.count(m.old) != 1:
                rows.append((m, "STALE (the text to mutate is not in the source exactly once)", 0.0))
                escaped += 1
                continue
            source.write_text(text.replace(m.old, m.new))
            start = time.time()
            rc = run_tests(root, m.tests, work / f"{m.name}.log")
            # pytest: 1 = some test failed; anything else but 0 (collection or usage error) proves nothing
            result = {0: "NOT CAUGHT", 1: "caught"}.get(rc, f"ERROR (pytest exit {rc}, see --keep logs)")
            escaped += rc != 1
            rows.append((m, result, time.time() - start))
            if not args.keep:
                shutil.rmtree(root)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("| mutation | bug injected | tests run | result | seconds |\n|---|---|---|---|---|")
    for m, result, seconds in rows:
        print(f"| `{m.name}` | {m.bug} | {', '.join(f'`{t}`' for t in m.tests)} | {result} | {seconds:.0f} |")
    if args.keep:
        print(f"copies and logs: {work}")
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
