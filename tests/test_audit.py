"""One-run privacy audit (issue 17): the bound's statistics, and audits of the real and of broken mechanisms."""
import functools
import json
import math

import numpy as np
import pytest
from scipy import stats

from nnunet_adpfl.privacy import audit
from nnunet_adpfl.privacy.audit import AuditSettings, run_audit
from nnunet_adpfl.privacy.audit_bound import count_correct, epsilon_lower_bound, p_value, top_bottom_guesses


# ---- the bound -------------------------------------------------------------------------------------
def paper_p_value(m, r, v, eps, delta):
    """Steinke et al. 2023, Appendix D, written out as a plain loop (independent of the vectorised code)."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, total / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize("m,r,v,eps,delta", [(1000, 200, 150, 0.5, 1e-5), (1000, 200, 200, 3.0, 1e-5),
                                             (100, 40, 30, 1.0, 1e-3), (50, 10, 0, 0.2, 1e-4)])
def test_p_value_matches_the_paper(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("r", [10, 50, 200])
def test_all_right_pure_dp_bound_is_the_closed_form(r):
    # delta = 0, v = r: p-value = p^r, so the bound is log(p / (1 - p)) with p = (1 - confidence)^(1/r)
    p = 0.05 ** (1 / r)
    assert epsilon_lower_bound(1000, r, r, 0.0, 0.95) == pytest.approx(math.log(p / (1 - p)), abs=1e-3)


def test_half_right_gives_zero_and_few_guesses_cannot_prove_much():
    assert epsilon_lower_bound(1000, 200, 100, 1e-5, 0.95) == 0.0
    assert epsilon_lower_bound(1000, 4, 4, 1e-5, 0.95) == 0.0          # 4/4 right happens with p = 1/16 > 0.05
    assert p_value(1000, 10, 10, 0.0, 0.0) == pytest.approx(2.0 ** -10)


def test_bound_is_monotone():
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5, 0.95) for v in range(100, 201, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:])) and bounds[-1] > 4
    assert epsilon_lower_bound(1000, 200, 180, 1e-5, 0.99) < epsilon_lower_bound(1000, 200, 180, 1e-5, 0.95)
    assert epsilon_lower_bound(1000, 200, 180, 1e-3, 0.95) < epsilon_lower_bound(1000, 200, 180, 0.0, 0.95)


@pytest.mark.parametrize("args", [(10, 5, 6, 1e-5, 0.95), (10, 11, 5, 1e-5, 0.95), (10, 5, 5, 1e-5, 1.0),
                                  (10, 5, 5, 1e-5, 0.0), (10, 5, 5, -1e-5, 0.95), (10, 5.0, 5, 1e-5, 0.95)])
def test_bound_refuses_bad_input(args):
    with pytest.raises(ValueError):
        epsilon_lower_bound(*args)


def test_guesses_and_count():
    scores = np.array([0.9, -1.0, 0.1, 2.0, -0.5, 0.0])
    guesses = top_bottom_guesses(scores, 2, 2)
    assert guesses.tolist() == [1, -1, 0, 1, -1, 0]
    included = np.array([True, False, True, False, True, True])
    assert count_correct(guesses, included) == (4, 2)
    with pytest.raises(ValueError):
        top_bottom_guesses(scores, 4, 3)
    with pytest.raises(ValueError):
        top_bottom_guesses(np.array([0.0, math.nan]), 1, 1)


# ---- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(canaries=1), dict(confidence=1.0), dict(confidence=0), dict(rule="sgd"),
                                 dict(broken="half"), dict(delta=1e-2), dict(rule="adpfl", steps=7),
                                 dict(guesses=501), dict(sample_rate=0), dict(epsilon=-1)])
def test_settings_refuse_bad_input(bad):
    with pytest.raises(ValueError):
        AuditSettings(**bad)


# ---- audits (default settings: 1000 canaries, 20 steps, q = 0.25, target epsilon 1) -----------------
@functools.lru_cache(maxsize=None)
def audited(**kw) -> dict:
    return run_audit(AuditSettings(**kw))[0]


def test_real_mechanism_stays_below_the_accounted_epsilon():
    r = audited()
    assert 0.9 <= r["accounted_epsilon"] <= 1.0
    assert r["guesses_made"] == 200 and r["cohort_train_accuracy"] > 0.9  # the model does learn
    assert r["empirical_epsilon_lower_bound"] < r["accounted_epsilon"]


def test_no_noise_is_caught():
    r = audited(broken="no_noise")
    assert r["guesses_right"] >= 195
    assert r["empirical_epsilon_lower_bound"] > 2 * r["accounted_epsilon"]


def test_no_clip_is_caught():
    assert AuditSettings().canary_scale >= 10 * AuditSettings().clip  # canary gradients far above C
    r = audited(broken="no_clip")
    assert r["empirical_epsilon_lower_bound"] > 1.5 * r["accounted_epsilon"]


def test_noise_under_scaled_tenfold_is_caught():
    r = audited(broken="weak_noise")
    assert r["empirical_epsilon_lower_bound"] > 1.5 * r["accounted_epsilon"]


def test_adpfl_real_below_and_without_noise_caught():
    real, broken = audited(rule="adpfl"), audited(rule="adpfl", broken="no_noise")
    assert len(real["noise_multipliers"]) == 5 and real["noise_multipliers"][0] > real["noise_multipliers"][-1]
    assert real["empirical_epsilon_lower_bound"] < real["accounted_epsilon"] <= 1.0
    assert broken["empirical_epsilon_lower_bound"] > 2 * broken["accounted_epsilon"]


def test_cli_writes_report_and_plot(tmp_path, capsys):
    from nnunet_adpfl.cli import main

    out = tmp_path / "audit"
    argv = ["audit", "--rule", "psac", "--canaries", "200", "--steps", "8", "--seed", "3", "-o", str(out)]
    assert main(argv) == 0
    report = json.loads((out / audit.REPORT_NAME).read_text())
    assert (out / audit.PLOT_NAME).stat().st_size > 0
    assert report["settings"]["rule"] == "psac" and report["canaries"] == 200 and report["guesses_made"] == 40
    assert report["empirical_epsilon_lower_bound"] < report["accounted_epsilon"]
    assert "empirical epsilon lower bound (95%)" in capsys.readouterr().out
    again = run_audit(AuditSettings(**report["settings"]))[0]  # seeded: the same audit again
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in report.items() if k != "seconds"}
    assert main(["audit", "--canaries", "1", "-o", str(out)]) == 2
