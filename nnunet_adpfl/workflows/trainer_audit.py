"""``nnunet-adpfl audit-trainer``: the one-run privacy audit (Steinke, Nasr, Jagielski 2023) through a chosen nnU-Net
DP trainer, on a preprocessed dataset, with the settings file used for training.

The trainer runs unchanged (its data loader, per-case gradients, clipping rule, noise, sigma calibrated to the
settings' target epsilon, optimizer and accountant) on the dataset's real cases, plus m white-box canaries: canary
i is a per-case gradient of norm ``canary_scale * C`` on one trainable coordinate of its own (a gradient-space
Dirac canary, the paper's strongest white-box setting). A secret seeded coin includes each canary; an included
canary enters a step with the trainer's own Poisson rate q and passes through the trainer's clipping rule before
its contribution joins the step's clipped sum, so it is one more case with the accounted sensitivity. Score of a
canary: how far its coordinate moved against its gradient, theta_0[j] - theta_T[j]. The top-k scores are guessed
IN, the bottom-k OUT, and :mod:`..privacy.audit_bound` converts the right guesses into a lower bound.

The canaries are inserted after the per-case gradient engine: this audits the sampling rate, clipping, noise scale,
optimizer and accounting of the trainer as configured; input-level defects (a loss that couples cases) are
checked by the tests against a per-case loop, not by this audit. ``--break`` deliberately breaks the run (noise off
or / 10, canaries unclipped) to show that the audit detects it.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..common.atomic import write_json_atomic
from ..common.config import ENV_VAR
from ..privacy.audit import BREAKS, NOISE_FACTOR, PLOT_NAME, REPORT_NAME, plot_scores
from ..privacy.audit_bound import count_correct, epsilon_lower_bound, top_bottom_guesses
from ..training.dp_trainer import nnUNetTrainerDP
from ..training.fed_trainers import FederatedDPTrainer
from .compare import trainer_class


class CanaryAuditMixin:
    """Adds the audit's canaries to a DP trainer's private step. Set ``audit_canaries``, ``audit_seed``,
    ``audit_scale`` and ``audit_broken`` before training."""
    audit_canaries = 0
    audit_seed = 0
    audit_scale = 10.0
    audit_broken = "none"

    def _setup_privacy(self):
        super()._setup_privacy()
        params = list(self.privacy["params"].values())
        sizes = [p.numel() for p in params]
        if self.audit_canaries > sum(sizes):
            raise ValueError(f"{self.audit_canaries} canaries need as many trainable coordinates; the trainer trains "
                             f"{sum(sizes):,}")
        coins, coords, sampling = np.random.SeedSequence(self.audit_seed).spawn(3)
        self.audit_included = np.random.default_rng(coins).random(self.audit_canaries) < 0.5
        flat = np.random.default_rng(coords).choice(sum(sizes), self.audit_canaries, replace=False)
        offsets = np.cumsum([0] + sizes)
        tensor = np.searchsorted(offsets, flat, side="right") - 1
        self.audit_coordinates = [(int(t), int(f - offsets[t])) for t, f in zip(tensor, flat)]
        self.audit_sampling = np.random.default_rng(sampling)
        self.audit_theta0 = self._audit_values()
        self.audit_draws = 0

    def _audit_values(self) -> np.ndarray:
        params = list(self.privacy["params"].values())
        with torch.no_grad():
            return np.array([float(params[t].reshape(-1)[j]) for t, j in self.audit_coordinates])

    def _clipped_sums(self, data, target, clip: float):
        sums = super()._clipped_sums(data, target, clip)
        drawn = self.audit_sampling.random(self.audit_canaries) < self.privacy["sample_rate"]
        chosen = np.flatnonzero(drawn & self.audit_included)
        self.audit_draws += len(chosen)
        if len(chosen):
            norm = self.audit_scale * clip
            factor = 1.0 if self.audit_broken == "no_clip" else \
                float(self.rule.scales(torch.tensor([norm], dtype=torch.float64), clip)[0])
            for i in chosen:
                t, j = self.audit_coordinates[i]
                sums.clipped[t].view(-1)[j] += factor * norm
        return sums

    def _noisy_gradient(self, sums, noise_std: float):
        return super()._noisy_gradient(sums, noise_std * NOISE_FACTOR[self.audit_broken])

    def audit_scores(self) -> np.ndarray:
        """theta_0 - theta_T on each canary's coordinate: large when its gradient was applied."""
        return self.audit_theta0 - self._audit_values()


def _build_trainer(name: str, dataset: str, configuration: str, fold: int, plans: str, device: torch.device):
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.paths import nnUNet_preprocessed

    cls = trainer_class(name)
    if not issubclass(cls, nnUNetTrainerDP):
        raise SystemExit(f"error: {name} is not a DP trainer of nnunet-adpfl: nothing to audit")
    if issubclass(cls, FederatedDPTrainer):
        raise SystemExit(f"error: {name} is a federated trainer; audit its mechanism with 'nnunet-adpfl audit "
                         "--rule adpfl' or audit the single-site trainer with the same settings")
    try:
        folder = Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:  # nnU-Net's "Could not find a dataset with the ID ..." / not an id
        raise SystemExit(f"error: {str(e).splitlines()[0]}") from None
    plans_file = folder / f"{plans}.json"
    if not plans_file.exists():
        raise SystemExit(f"error: {plans_file} not found: plan and preprocess the dataset first")
    plans_dict = {**json.loads(plans_file.read_text()), "continue_training": False}  # as nnUNetv2_train passes it
    audit_cls = type(f"{name}Audit", (CanaryAuditMixin, cls), {})
    return audit_cls(plans=plans_dict, configuration=configuration, fold=fold,
                     dataset_json=json.loads((folder / "dataset.json").read_text()), device=device)


def run_trainer_audit(trainer_name: str, dataset: str, configuration: str, fold: int = 0, canaries: int = 500,
                      guesses: int | None = None, confidence: float = 0.95, seed: int = 0, canary_scale: float = 10.0,
                      broken: str = "none", plans: str = "nnUNetPlans", device: str = "cpu") -> dict:
    """Train once with canaries; returns the report (also written, with a plot, to the trainer's output folder)."""
    if broken not in BREAKS:
        raise ValueError(f"unknown break {broken!r}; use one of {BREAKS}")
    if canaries < 2:
        raise ValueError("canaries must be >= 2")
    k = canaries // 10 if guesses is None else guesses
    if not 1 <= k <= canaries // 2:
        raise ValueError(f"guesses per side must be in [1, {canaries // 2}], got {k}")
    started = time.perf_counter()
    trainer = _build_trainer(trainer_name, dataset, configuration, fold, plans, torch.device(device))
    trainer.audit_canaries, trainer.audit_seed, trainer.audit_scale, trainer.audit_broken = \
        canaries, seed, canary_scale, broken
    shutil.rmtree(trainer.output_folder, ignore_errors=True)  # one fresh run: an audit does not resume
    trainer.run_training()
    scores, included = trainer.audit_scores(), trainer.audit_included
    made, right = count_correct(top_bottom_guesses(scores, k, k), included)
    s = trainer.dp_settings
    report = {
        "trainer": trainer_name, "dataset": dataset, "configuration": configuration, "fold": fold,
        "settings_file": os.environ.get(ENV_VAR),
        "accounted_epsilon": trainer.accountant.epsilon(), "target_epsilon": s["target_epsilon"],
        "empirical_epsilon_lower_bound": epsilon_lower_bound(canaries, made, right, s["delta"], confidence),
        "confidence": confidence, "delta": s["delta"], "canaries": canaries,
        "canaries_included": int(included.sum()), "canary_draws": trainer.audit_draws,
        "guesses_made": made, "guesses_right": right,
        "mechanism": "as accounted" if broken == "none" else f"BROKEN ({broken}): the accounted epsilon is what the "
                                                             "account claims, not what the run spends",
        "broken": broken, "steps": trainer.accountant.steps, "sample_rate": trainer.privacy["sample_rate"],
        "noise_multiplier": trainer.privacy["noise_multiplier"], "max_grad_norm": s["max_grad_norm"],
        "clipping": trainer.rule.describe(), "trainable_parameters": trainer.privacy["parameters"],
        "canary": f"gradient-space Dirac, norm {canary_scale} x C on one trainable coordinate each",
        "seconds": round(time.perf_counter() - started, 1),
        "bound": "Steinke, Nasr, Jagielski 2023: Binomial tail + 2 m delta correction (their Appendix D)",
    }
    out = Path(trainer.output_folder)
    write_json_atomic(out / REPORT_NAME, report)
    plot_scores(scores, included, {**report, "settings": {"rule": trainer_name, "broken": broken}}, out / PLOT_NAME)
    return report


def format_table(report: dict) -> str:
    rows = [("trainer", report["trainer"]), ("break", report["broken"]),
            ("accounted epsilon", f"{report['accounted_epsilon']:.3f}"),
            (f"empirical epsilon lower bound ({report['confidence']:.0%})",
             f"{report['empirical_epsilon_lower_bound']:.3f}"),
            ("canaries (included)", f"{report['canaries']} ({report['canaries_included']})"),
            ("guesses made / right", f"{report['guesses_made']} / {report['guesses_right']}"),
            ("steps, q, sigma", f"{report['steps']}, {report['sample_rate']:.3g}, {report['noise_multiplier']:.3f}"),
            ("seconds", f"{report['seconds']}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def add_cli(sub) -> None:
    p = sub.add_parser("audit-trainer", help="empirical epsilon lower bound from canaries, through an nnU-Net DP "
                                             "trainer on a preprocessed dataset (settings: $nnUNet_adpfl_config)")
    p.add_argument("dataset", help="dataset name or id, as for nnUNetv2_train")
    p.add_argument("configuration", help="e.g. 3d_fullres")
    p.add_argument("-tr", "--trainer", required=True, help="a single-site DP trainer, e.g. nnUNetTrainerDPSGD")
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--canaries", type=int, default=500, help="at most the number of trainable coordinates")
    p.add_argument("--guesses", type=int, default=None, help="guesses per side (default canaries // 10)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="seed of the coins, canary coordinates and canary sampling")
    p.add_argument("--canary-scale", type=float, default=10.0, help="canary gradient norm in units of C")
    p.add_argument("--break", dest="broken", choices=BREAKS, default="none",
                   help="deliberately broken run (for checking the audit)")
    p.add_argument("-device", default="cpu")
    p.set_defaults(func=_cmd)


def _cmd(a) -> int:
    try:
        report = run_trainer_audit(a.trainer, a.dataset, a.configuration, a.fold, a.canaries, a.guesses,
                                   a.confidence, a.seed, a.canary_scale, a.broken, a.plans, a.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    return 0
