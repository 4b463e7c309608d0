import pytest
import torch

from nnunet_adpfl.privacy.clipping import ClippingRule, RULE_NAMES, make_rule

RULES = [ClippingRule("flat"), ClippingRule("autos", {"gamma": 0.01}), ClippingRule("nsgd", {"r": 0.01}),
         ClippingRule("psac", {"r": 0.1}), ClippingRule("psac", {"r": 1e-6}), ClippingRule("autos", {"gamma": 1e-9})]
NORMS = torch.tensor([0.0, 1e-30, 1e-12, 1e-6, 1e-3, 0.5, 1.0, 1.0 + 1e-7, 2.0, 1e3, 1e12, 1e30],
                     dtype=torch.float64)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: str(r.describe()))
@pytest.mark.parametrize("clip", [1e-3, 0.1, 1.0, 37.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_norm_never_exceeds_C(rule, clip, dtype):
    norms = torch.cat([NORMS, torch.rand(1000, dtype=torch.float64) * 10 * clip]).to(dtype)
    s = rule.scales(norms, clip)
    assert torch.isfinite(s).all() and (s >= 0).all()
    # relative slack of a few ulps for the float product s * n
    assert (s * norms <= clip * (1 + 4 * torch.finfo(dtype).eps)).all()


@pytest.mark.parametrize("rule", RULES, ids=lambda r: str(r.describe()))
def test_bound_holds_on_actual_vectors(rule):
    g = torch.randn(64, 500, dtype=torch.float64) * torch.logspace(-8, 8, 64, dtype=torch.float64)[:, None]
    g[0] = 0
    n = g.norm(dim=1)
    clipped = rule.scales(n, 1.0)[:, None] * g
    assert (clipped.norm(dim=1) <= 1.0 + 1e-12).all()


def test_rule_formulas():
    n = torch.tensor([0.0, 0.5, 3.0], dtype=torch.float64)
    C = 2.0
    torch.testing.assert_close(ClippingRule("flat").scales(n, C), torch.tensor([1.0, 1.0, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(ClippingRule("autos", {"gamma": 0.01}).scales(n, C), C / (n + 0.01))
    torch.testing.assert_close(ClippingRule("nsgd", {"r": 0.01}).scales(n, C), C / (n + 0.01))
    torch.testing.assert_close(ClippingRule("psac", {"r": 0.1}).scales(n, C), C / (n + 0.1 / (n + 0.1)))


def test_flat_rule_leaves_small_gradients_unchanged():
    n = torch.tensor([0.1, 0.99])
    assert torch.equal(ClippingRule("flat").scales(n, 1.0), torch.ones(2))


def test_make_rule_defaults_and_overrides():
    assert make_rule("autos", {}).params == {"gamma": 0.01}
    assert make_rule("nsgd", {}).params == {"r": 0.01}
    assert make_rule("psac", {}).params == {"r": 0.1}
    assert make_rule("psac", {"r": 0.5}).params == {"r": 0.5}
    assert set(RULE_NAMES) == {"flat", "autos", "nsgd", "psac"}
    with pytest.raises(ValueError, match="unknown clipping rule"):
        make_rule("median", {})
