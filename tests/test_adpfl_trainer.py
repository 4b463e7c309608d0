"""ADP-FL's start-of-training checks on a trainer object holding only what they read (no federation, no nnU-Net):
a count noise too small for the schedule is refused at the start, and a finished site started again takes no step."""
import types

import pytest

from nnunet_adpfl.common.config import SettingsError, load_settings
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


def test_a_count_noise_too_small_for_the_noise_is_refused_when_the_tracker_is_built():
    t = bare_adpfl_trainer(target_epsilon=None, noise_multiplier=2.0, adpfl_count_noise=0.5)
    t._noise_multiplier(SAMPLE_RATE)
    with pytest.raises(SettingsError, match="adpfl_count_noise.*2 \\* sigma_count > sigma"):
        t._new_clip_tracker()
    fine = bare_adpfl_trainer(target_epsilon=None, noise_multiplier=2.0, adpfl_count_noise=1.5)
    fine._noise_multiplier(SAMPLE_RATE)
    assert fine._new_clip_tracker().gradient_noise_multiplier(2.0) > 2.0


def test_the_count_noise_is_checked_against_the_largest_round_sigma():
    t = bare_adpfl_trainer(adpfl_noise_schedule="linear", adpfl_schedule_end_ratio=0.5)
    t._noise_multiplier(SAMPLE_RATE)
    t.dp_settings = {**t.dp_settings, "adpfl_count_noise": 0.4 * max(t._schedule)}  # enough for the last round only
    assert 2 * t.dp_settings["adpfl_count_noise"] > min(t._schedule)
    with pytest.raises(SettingsError, match="adpfl_count_noise"):
        t._new_clip_tracker()


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
