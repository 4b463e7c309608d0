"""ADP-FL's start-of-training checks on a trainer object holding only what they read (no federation, no nnU-Net):
a finished site started again takes no step."""
import types

import pytest

from nnunet_adpfl.common.config import load_settings
from nnunet_adpfl.privacy.accounting import PrivacyAccountant
from nnunet_adpfl.training.adpfl_trainer import FederatedADPTrainer

ROUNDS, EPOCHS_PER_ROUND, ITERATIONS, SAMPLE_RATE = 3, 2, 5, 0.1


def bare_adpfl_trainer(**settings) -> FederatedADPTrainer:
    t = object.__new__(FederatedADPTrainer)
    t.dp_settings = load_settings("", settings)
    t.client = types.SimpleNamespace(cfg={"rounds": ROUNDS})
    t.epochs_per_round, t.num_iterations_per_epoch = EPOCHS_PER_ROUND, ITERATIONS
    t.num_epochs, t.current_epoch = ROUNDS * EPOCHS_PER_ROUND, 0
    t.accountant = PrivacyAccountant("rdp", 1e-5)
    t.privacy = {"expected_batch_size": 2.0}
    return t


@pytest.mark.parametrize("settings", [{"adpfl_noise_schedule": "linear"}, {"target_epsilon": None,
                                                                          "noise_multiplier": 1.0}])
def test_a_finished_site_started_again_has_no_step_left(settings):
    t = bare_adpfl_trainer(**settings)
    t._noise_multiplier(SAMPLE_RATE)
    for sigma in t._schedule:
        t.accountant.step(sigma, SAMPLE_RATE, EPOCHS_PER_ROUND * ITERATIONS)
    t.current_epoch = t.num_epochs  # resumed from checkpoint_final: one past the last round
    sigma = t._noise_multiplier(SAMPLE_RATE)
    assert sigma == t._schedule[-1]
    assert t._budget_steps(SAMPLE_RATE, sigma, remaining=0) == 0
