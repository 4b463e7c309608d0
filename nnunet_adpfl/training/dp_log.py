"""What a DP trainer logs when its private training starts (or restarts with ``--c``): the mechanism, the steps
planned, taken and left, the trained and frozen parameters, where the weights came from, and warnings for folds
too small for their privacy budget and for steps without noise."""
from __future__ import annotations

from ..privacy.report import NO_NOISE_WARNING, without_noise
from ..privacy.small_fold import small_fold_warning
from .trainable import select_trainable

UNREACHED = "not reached by the loss, e.g. nnU-Net's deep-supervision head of weight 0"


def steps_note(planned: int, done: int, allowed: int) -> str:
    """'12 planned steps (3 taken before this start, 9 remaining, all within budget)'."""
    remaining = max(0, planned - done)
    budget = "all within budget" if allowed >= remaining else f"{allowed} of them within budget"
    taken = f"{done} taken before this start, {remaining} remaining, " if done else ""
    return f"{planned} planned steps ({taken}{budget})"


def frozen_note(network, dp_trainable: str, params) -> str:
    """Why the parameters the private step does not train are frozen: dp_trainable, or out of the loss's reach."""
    chosen = select_trainable(network, dp_trainable)
    by_choice = sum(1 for name, _ in network.named_parameters() if name not in chosen)
    unreached = sum(1 for name in chosen if name not in params)
    parts = ([f"{by_choice} tensors frozen by dp_trainable"] if by_choice else []) + \
        ([f"{unreached} tensors frozen: {UNREACHED}"] if unreached else [])
    return "; ".join(parts) or "no tensor frozen"


def start_note(initial_weights: dict, resumed_epoch: int, steps_done: int) -> str:
    if not resumed_epoch:
        return f"initial weights: {initial_weights['source']}"
    return (f"resumed from a checkpoint at epoch {resumed_epoch} ({steps_done} private steps accounted); first start "
            f"from: {initial_weights['source']}")


def fold_warning(trainer, sigma: float) -> str | None:
    """``small_fold_warning`` where sigma was calibrated to the budget (not set by hand)."""
    s = trainer.dp_settings
    if s["noise_multiplier"] is not None or s["target_epsilon"] is None:
        return None
    return small_fold_warning(sigma, trainer.num_training_cases, trainer.privacy["expected_batch_size"],
                              s["target_epsilon"], s["delta"], trainer._planned_steps(), s["accountant"])


def setup_lines(trainer, allowed: int) -> list[str]:
    """The start-of-training log: one line, and WARNING lines for a small fold and for steps without noise."""
    s, pv = trainer.dp_settings, trainer.privacy
    sigma, counts, batch = pv["noise_multiplier"], pv["parameters"], pv["expected_batch_size"]
    frozen = frozen_note(trainer.network, s["dp_trainable"], pv["params"])
    steps = steps_note(trainer._planned_steps(), trainer.accountant.steps, allowed)
    start = start_note(trainer.initial_weights, trainer.current_epoch, trainer.accountant.steps)
    line = (f"DP: rule {trainer.rule.describe()}, C={s['max_grad_norm']}, sigma={sigma:.4f}, q={pv['sample_rate']:.4g} "
            f"(expected batch {batch} of {trainer.num_training_cases} cases, Poisson, "
            f"{s['augmentation_multiplicity']} augmented patch(es) per case), {steps}, accountant {s['accountant']}, "
            f"engine {pv['per_case'].engine}{' (auto)' if pv['engine'] == 'auto' else ''}; trainable ({s['dp_trainable']}): {counts['trainable']:,} of {counts['total']:,} "
            f"parameters in {len(pv['params'])} tensors ({frozen}); noise std per coordinate "
            f"{sigma * s['max_grad_norm'] / batch:.3g} (sigma*C/B); momentum {s['momentum']}; {start}")
    warnings = [pv.get("small_fold_warning"), NO_NOISE_WARNING if without_noise(trainer.accountant, sigma) else None]
    return [line] + [f"WARNING: {w}" for w in warnings if w]
