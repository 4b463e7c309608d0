"""A DP trainer validates only on held-out cases (review26 C2 and S1).

nnU-Net validates every epoch and after training, and every checkpoint (``checkpoint_final.pth``, which a site may
share, included) carries the validation loss and pseudo Dice (``logging``, ``_best_ema``): unnoised values outside
the privacy account, acceptable only for cases the run does not train on. So a DP trainer
- on fold ``all`` (nnU-Net's validation cases = its training cases) trains without validation: NaN in the logger,
  no ``checkpoint_best.pth``, no final validation (no ``validation/``);
- refuses a ``splits_final.json`` fold whose val list shares a case with its train list, or whose train list
  holds a case twice (nnU-Net keeps both: the case would count twice in every Poisson draw, sensitivity 2C).
"""
from __future__ import annotations

import math
from collections import Counter

from ..common.config import SettingsError

NO_VALIDATION = "none: fold 'all' has no held-out case (validating would measure the training cases unnoised)"


def held_out_split(fold, tr_keys: list, val_keys: list) -> tuple[list, list]:
    """nnU-Net's (train, val) of ``fold``, checked; fold 'all' -> no validation case."""
    twice = sorted(k for k, n in Counter(tr_keys).items() if n > 1)
    if twice:
        raise SettingsError(f"fold {fold}: training case(s) {twice} listed more than once in splits_final.json: "
                            "list each case once (a repeated case counts twice against the privacy budget)")
    if fold == "all":
        return list(tr_keys), []
    shared = sorted(set(tr_keys) & set(val_keys))
    if shared:
        raise SettingsError(f"fold {fold}: validation case(s) {shared} are also training cases in splits_final.json "
                            "(their unnoised Dice would go into every checkpoint): use a fold with held-out "
                            "validation cases, or fold 'all' (trains without validation)")
    return tr_keys, val_keys


class HeldOutValidationMixin:
    """nnU-Net's validation, on held-out cases only (listed before nnUNetTrainer in the bases)."""

    def do_split(self):
        return held_out_split(self.fold, *super().do_split())

    def validation_note(self) -> str:
        """What the run validates on (privacy report)."""
        return NO_VALIDATION if self.fold == "all" else "the fold's held-out validation cases"

    def skip_validation_epoch(self) -> None:
        """An epoch without validation: NaN logged; ``_best_ema`` NaN, so nnU-Net never writes checkpoint_best.pth."""
        lm = self.label_manager
        classes = len(lm.foreground_regions if lm.has_regions else lm.foreground_labels)
        self.logger.log("mean_fg_dice", math.nan, self.current_epoch)
        self.logger.log("dice_per_class_or_region", [math.nan] * classes, self.current_epoch)
        self.logger.log("val_losses", math.nan, self.current_epoch)
        self._best_ema = math.nan  # NaN > NaN is False

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.fold == "all":
            self.print_to_log_file(f"final validation skipped: {NO_VALIDATION}")
            return
        super().perform_actual_validation(save_probabilities)
