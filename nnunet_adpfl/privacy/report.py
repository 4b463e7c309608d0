"""Privacy report (``privacy_report.json``) and the companion plot ``privacy_progress.png``."""
from __future__ import annotations

import math
import os
from datetime import datetime, timezone
from importlib import metadata

from .accounting import PrivacyAccountant

REPORT_NAME = "privacy_report.json"
PLOT_NAME = "privacy_progress.png"


def package_versions() -> dict:
    out = {}
    for name in ("nnunet-adpfl", "nnunetv2", "torch", "opacus"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


NO_NOISE_WARNING = ("noise multiplier 0: steps without noise, epsilon is infinite, no privacy guarantee "
                    "(report: guarantee_void_no_noise)")


def without_noise(accountant: PrivacyAccountant, noise_multiplier: float) -> bool:
    """Whether this run's steps, or steps accounted before, add no noise (sigma 0): no guarantee at all."""
    return noise_multiplier == 0 or any(sigma == 0 and q > 0 and steps > 0 for sigma, q, steps in accountant.history)


def privacy_report(*, accountant: PrivacyAccountant, noise_multiplier: float, sample_rate: float, clipping: dict,
                   max_grad_norm: float, num_cases: int, expected_batch_size: float, target_epsilon: float | None,
                   planned_steps: int, budget_exhausted: bool, trainer: str, final: bool,
                   deterministic_noise: bool, deterministic_sampling: bool = False,
                   extra: dict | None = None) -> dict:
    eps = accountant.epsilon()
    content = {
        "epsilon": eps if math.isfinite(eps) else None,  # null: infinite (guarantee_void_no_noise), valid JSON
        "delta": accountant.delta,
        "noise_multiplier": noise_multiplier,
        "sample_rate": sample_rate,
        "steps": accountant.steps,
        "accountant": accountant.mechanism,
        "clipping": clipping,
        "max_grad_norm": max_grad_norm,
        "num_cases": num_cases,
        "expected_batch_size": expected_batch_size,
        "target_epsilon": target_epsilon,
        "planned_steps": planned_steps,
        "budget_exhausted": budget_exhausted,
        "privacy_unit": "one training case (patient)",
        "sampling": "Poisson: each case included independently with probability sample_rate per step",
        "history": [list(h) for h in accountant.history],
        "guarantee_void_deterministic_noise": deterministic_noise,
        "guarantee_void_deterministic_sampling": deterministic_sampling,
        "guarantee_void_no_noise": without_noise(accountant, noise_multiplier) or not math.isfinite(eps),
        "trainer": trainer,
        "final": final,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
    }
    content.update(extra or {})
    return content


def plot_privacy_progress(logs: dict, output_folder: str) -> None:
    """epsilon per epoch, and gradient alignment if logged, next to nnU-Net's progress.png."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    has_alignment = "cos_raw_clipped" in logs
    fig, axes = plt.subplots(2 if has_alignment else 1, 1, figsize=(10, 8 if has_alignment else 4.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(range(len(logs["epsilon"])), logs["epsilon"], color="purple", label="epsilon spent")
    ax.set_xlabel("epoch")
    ax.set_ylabel("epsilon")
    ax.legend(loc="upper left")
    if has_alignment:
        ax = axes[1, 0]
        ax.plot(logs["cos_raw_clipped"], label="cos(raw mean, clipped mean)")
        ax.plot(logs["cos_raw_noisy"], label="cos(raw mean, noisy step)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("cosine")
        ax.set_ylim(-1.05, 1.05)
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(output_folder, PLOT_NAME))
    plt.close(fig)
