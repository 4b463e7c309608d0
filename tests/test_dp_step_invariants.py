"""The private step through the trainers' own ``train_step`` (DP-SGD and ADP-FL), on a trainer object holding only
what the step uses: a 5-coordinate parameter and an engine with given per-case gradients. Seconds, deterministic.
Each test catches a realistic bug of issue 36 (noise sigma instead of sigma*C, unsplit ADP-FL noise, skipped empty
batches)."""
import math

import pytest
import torch

import nnunet_adpfl.training.adpfl_trainer as adpfl_module
import nnunet_adpfl.training.dp_trainer as dp_module
from nnunet_adpfl.privacy.accounting import PrivacyAccountant
from nnunet_adpfl.privacy.adaptive import QuantileClipTracker, split_noise
from nnunet_adpfl.privacy.clipping import ClippingRule
from nnunet_adpfl.privacy.noisy_step import make_noise_generator
from nnunet_adpfl.training.adpfl_trainer import FederatedADPTrainer
from nnunet_adpfl.training.dp_trainer import nnUNetTrainerDP

CLIP, SIGMA, SAMPLE_RATE, EXPECTED_BATCH = 0.25, 1.7, 0.3, 3.0


class _RowsEngine:
    """Per-case gradients = the rows of the batch's data (one chunk)."""

    def __init__(self, param):
        self.params = [param]

    def chunks(self, data, target):
        yield [data.clone()], torch.zeros(data.shape[0])


def bare_step_trainer(cls=nnUNetTrainerDP, **privacy):
    t = object.__new__(cls)
    param = torch.nn.Parameter(torch.zeros(5))
    t.device = torch.device("cpu")
    t.dp_settings = {"log_alignment": False, "max_grad_norm": CLIP}
    t.rule = ClippingRule("flat")
    t.accountant = PrivacyAccountant("rdp", 1e-5)
    t.optimizer = torch.optim.SGD([param], lr=1.0)
    t.ema = None
    t.privacy = {"params": {"w": param}, "noise_multiplier": SIGMA, "sample_rate": SAMPLE_RATE,
                 "expected_batch_size": EXPECTED_BATCH, "steps_left": 10, "alignment": [], "per_case": _RowsEngine(param),
                 "generator": make_noise_generator(t.device, 0), **privacy}
    return t, param


def spy_on(module, monkeypatch):
    calls = []
    real = module.add_noise

    def spy(sums, noise_std, expected_batch_size, generator):
        calls.append((noise_std, expected_batch_size, [s.clone() for s in sums]))
        return real(sums, noise_std, expected_batch_size, generator)

    monkeypatch.setattr(module, "add_noise", spy)
    return calls


def case_batch(rows):
    rows = torch.tensor(rows, dtype=torch.float32)
    return {"data": rows, "target": torch.zeros(len(rows), 1), "keys": [f"case_{i}" for i in range(len(rows))]}


def test_dp_step_noise_std_is_sigma_times_C_on_the_sum_of_clipped_cases(monkeypatch):
    t, param = bare_step_trainer()
    calls = spy_on(dp_module, monkeypatch)
    t.train_step(case_batch([[3.0, 4, 0, 0, 0], [0, 0, 0.1, 0, 0]]))
    (std, denominator, (summed,)), = calls
    assert std == pytest.approx(SIGMA * CLIP) and denominator == EXPECTED_BATCH
    torch.testing.assert_close(summed, torch.tensor([0.15, 0.2, 0.1, 0, 0]))  # case 1 clipped to C, case 2 kept
    assert t.accountant.history == [(SIGMA, SAMPLE_RATE, 1)]


def test_an_empty_draw_still_adds_noise_and_spends_a_step(monkeypatch):
    t, param = bare_step_trainer()
    calls = spy_on(dp_module, monkeypatch)
    out = t.train_step({"data": None, "target": None, "keys": []})
    (std, denominator, (summed,)), = calls
    assert std == pytest.approx(SIGMA * CLIP) and denominator == EXPECTED_BATCH
    assert torch.count_nonzero(summed) == 0 and torch.count_nonzero(param.detach()) == 5  # pure noise, applied
    assert t.accountant.steps == 1 and t.privacy["steps_left"] == 9 and math.isnan(float(out["loss"]))


def test_adpfl_step_splits_the_noise_between_gradient_and_count(monkeypatch):
    tracker = QuantileClipTracker(clip=CLIP, sigma_count=4.0, expected_batch_size=EXPECTED_BATCH)
    t, param = bare_step_trainer(FederatedADPTrainer, clip_tracker=tracker, masks=None)
    calls = spy_on(adpfl_module, monkeypatch)
    t.train_step(case_batch([[3.0, 4, 0, 0, 0], [0, 0, 0.1, 0, 0]]))
    (std, denominator, _), = calls
    sigma_grad = split_noise(SIGMA, 4.0)
    assert sigma_grad > SIGMA * 1.01  # the split is not a rounding error
    assert std == pytest.approx(sigma_grad * CLIP) and denominator == EXPECTED_BATCH
    assert t.accountant.history == [(SIGMA, SAMPLE_RATE, 1)]  # one Gaussian mechanism with the round's sigma
    assert tracker.steps == 1 and tracker.clip != CLIP  # the noisy count was released and used
