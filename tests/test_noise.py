"""The noisy step adds N(0, (sigma*C)^2) to the sum of clipped per-case gradients and divides by the expected
batch size: checked statistically on the output of the real step functions."""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from nnunet_adpfl.privacy.clipping import ClippingRule
from nnunet_adpfl.training.losses import PerCaseLoss
from nnunet_adpfl.privacy.noisy_step import add_noise, clipped_sum, cosine, make_noise_generator
from nnunet_adpfl.privacy.per_case_grads import PerCaseGradients
from tests.nets import build, ds_targets


@pytest.mark.parametrize("sigma,clip,batch", [(1.0, 1.0, 2.0), (0.7, 3.0, 5.0), (2.5, 0.1, 1.0)])
def test_noise_std_and_mean(sigma, clip, batch):
    d = 200_000
    base = torch.linspace(-1, 1, d)
    gen = make_noise_generator(torch.device("cpu"), seed=1)
    out = add_noise([base.clone()], sigma * clip, batch, gen)[0]
    noise = (out * batch - base).double().numpy()
    expected_std = sigma * clip
    # chi-square confidence interval for the variance (99.99%)
    lo, hi = stats.chi2.ppf([5e-5, 1 - 5e-5], d - 1)
    var = noise.var(ddof=1)
    assert (d - 1) * var / hi <= expected_std ** 2 <= (d - 1) * var / lo, (var, expected_std ** 2)
    assert abs(noise.mean()) < 5 * expected_std / math.sqrt(d)
    assert stats.kstest(noise / expected_std, "norm").pvalue > 1e-4


def test_noise_is_independent_across_calls_and_coordinates():
    gen = make_noise_generator(torch.device("cpu"), seed=3)
    a = add_noise([torch.zeros(50_000)], 1.0, 1.0, gen)[0]
    b = add_noise([torch.zeros(50_000)], 1.0, 1.0, gen)[0]
    assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < 0.03
    assert abs(np.corrcoef(a[:-1].numpy(), a[1:].numpy())[0, 1]) < 0.03


def test_unseeded_generators_differ():
    a = add_noise([torch.zeros(100)], 1.0, 1.0, make_noise_generator(torch.device("cpu"), None))[0]
    b = add_noise([torch.zeros(100)], 1.0, 1.0, make_noise_generator(torch.device("cpu"), None))[0]
    assert not torch.equal(a, b)


def _engine():
    net = build(2, in_ch=1, out_ch=2, deep_supervision=False).double()
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64) * 3
    y = ds_targets(net(x), 2).double()
    loss = PerCaseLoss(False, None, None)
    return PerCaseGradients(net, loss.per_case, dict(net.named_parameters()), "loop"), x, y


@pytest.mark.parametrize("rule", [ClippingRule("flat"), ClippingRule("autos", {"gamma": 0.01}),
                                  ClippingRule("nsgd", {"r": 0.01}), ClippingRule("psac", {"r": 0.1})],
                         ids=lambda r: r.name)
def test_clipped_sum_is_sum_of_scaled_per_case_gradients(rule):
    engine, x, y = _engine()
    clip = 0.05  # smaller than the raw norms: clipping is active
    s = clipped_sum(engine, rule, clip, x, y, keep_raw=True)
    rows = [torch.cat([g.flatten() for g in grads]) for grads, _ in engine.chunks(x, y)]
    norms = torch.stack([r.norm() for r in rows])
    assert (norms > clip).all()
    torch.testing.assert_close(s.norms, norms)
    expected = sum(sc * r for sc, r in zip(rule.scales(norms, clip), rows))
    torch.testing.assert_close(torch.cat([g.flatten() for g in s.clipped]), expected)
    torch.testing.assert_close(torch.cat([g.flatten() for g in s.raw]), sum(rows))
    assert s.batch_size == 4
    # each case contributes at most C: the sum's norm is at most B * C
    assert torch.cat([g.flatten() for g in s.clipped]).norm() <= 4 * clip * (1 + 1e-9)


def test_empty_batch_gives_pure_noise():
    engine, _, _ = _engine()
    s = clipped_sum(engine, ClippingRule("flat"), 1.0, None, None)
    assert s.batch_size == 0 and all(torch.count_nonzero(g) == 0 for g in s.clipped)
    out = add_noise(s.clipped, 2.0, 4.0, make_noise_generator(torch.device("cpu"), 0))
    flat = torch.cat([g.flatten() for g in out])
    assert 0.4 < flat.std().item() < 0.6  # 2.0 / 4


def test_cosine():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, [torch.tensor([0.0, 1.0]), torch.tensor([0.0])]) == pytest.approx(0.0)
    assert math.isnan(cosine(a, [torch.zeros(2), torch.zeros(1)]))


class _FixedGradients:
    """An engine whose per-case gradients are given: (m, 3) and (m, 2) tensors, one chunk."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows
        self.params = [torch.zeros(3, dtype=rows.dtype), torch.zeros(2, dtype=rows.dtype)]

    def chunks(self, data, target):
        yield [self.rows[:, :3], self.rows[:, 3:]], torch.zeros(len(self.rows), dtype=self.rows.dtype)


@pytest.mark.parametrize("rule", [ClippingRule("flat"), ClippingRule("autos", {"gamma": 0.01}),
                                  ClippingRule("nsgd", {"r": 0.01}), ClippingRule("psac", {"r": 0.1})],
                         ids=lambda r: r.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_non_finite_case_contributes_exactly_zero_and_counts_as_clipped(rule, dtype):
    good = torch.tensor([[3.0, 0, 0, 4, 0], [0, 0.1, 0, 0, 0]], dtype=dtype)
    bad = torch.tensor([[math.inf, 1, 1, 1, 1], [math.nan, 1, 1, 1, 1], [-math.inf, math.nan, 0, 0, 0]],
                       dtype=dtype)
    rows = torch.cat([good[:1], bad[:2], good[1:], bad[2:]])
    clip = 0.5
    with pytest.warns(RuntimeWarning, match=r"^3 case\(s\) of this step had a non-finite gradient"):
        s = clipped_sum(_FixedGradients(rows), rule, clip, torch.zeros(5, 1), torch.zeros(5, 1))
    expected = (rule.scales(good.norm(dim=1), clip)[:, None] * good).sum(0)
    torch.testing.assert_close(torch.cat(s.clipped), expected)  # finite, and only the good cases
    assert s.non_finite == 3 and s.batch_size == 5
    assert torch.equal(s.norms <= clip, torch.tensor([False, False, False, True, False]))  # bad ones: clipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clipped_sum(_FixedGradients(good), rule, clip, torch.zeros(2, 1), torch.zeros(2, 1)).non_finite == 0
