"""ADP-FL sparsification: the private-step mask comes from public information only and keeps the clip bound;
the noisy step is zero outside the mask with unchanged noise inside; top-k upload encoding round-trips, shrinks
the upload as expected and is checked on decode; error feedback keeps the cumulative sent sum on track."""
import inspect
import math

import pytest
import torch

from nnunet_adpfl.privacy.clipping import ClippingRule
from nnunet_adpfl.privacy.noisy_step import add_noise, clipped_sum, make_noise_generator, per_case_norms
from nnunet_adpfl.privacy.sparsify import (ErrorFeedback, MaskedPerCaseGradients, encoded_nbytes, mask_grads,
                                   mask_noise_sum, masked_add_noise, released_global_update, step_mask,
                                   topk_decode, topk_encode)

RULES = [ClippingRule("flat"), ClippingRule("autos", {"gamma": 0.01}), ClippingRule("nsgd", {"r": 0.01}),
         ClippingRule("psac", {"r": 0.1}), ClippingRule("psac", {"r": 1e-6})]


def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {"enc.w": torch.randn(8, 4, 3, 3, generator=g, dtype=dtype), "enc.b": torch.randn(8, generator=g,
            dtype=dtype), "dec.w": torch.randn(3, 8, generator=g, dtype=dtype), "dec.b": torch.zeros(3, dtype=dtype)}


def _d(tensors):
    return sum(t.numel() for t in tensors.values())


def _flat(tensors, names=None):
    names = names or list(tensors)
    return torch.cat([tensors[n].reshape(-1) for n in names])


# ---- (a) private-step mask ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["random", "topk_prev_global"])
@pytest.mark.parametrize("density", [0.001, 0.05, 0.1, 0.37, 0.5, 1.0])
def test_step_mask_selects_exactly_round_density_d(method, density):
    params = _params()
    prev = {k: torch.randn_like(v) for k, v in params.items()}
    masks = step_mask(params, density, method, 3, 11, prev)
    assert list(masks) == list(params)
    for k, m in masks.items():
        assert m.dtype == torch.bool and m.shape == params[k].shape
    d = _d(params)
    assert sum(int(m.sum()) for m in masks.values()) == max(1, round(density * d))


def test_topk_prev_global_picks_largest_previous_update_entries_across_tensors():
    params = _params()
    g = torch.Generator().manual_seed(5)
    prev = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    prev["dec.b"][1] = 100.0  # the largest entry sits in the smallest tensor: selection is global
    density = 0.1
    masks = step_mask(params, density, "topk_prev_global", 7, 1, prev)
    names = list(params)
    flat_m, flat_u = _flat(masks, names), _flat(prev, names).abs()
    k = round(density * flat_u.numel())
    assert bool(masks["dec.b"][1])
    assert set(torch.nonzero(flat_m).reshape(-1).tolist()) == set(torch.topk(flat_u, k).indices.tolist())
    assert flat_u[flat_m].min() >= flat_u[~flat_m].max()


def test_random_mask_reproducible_per_round_and_differs_across_rounds():
    params = _params()
    a = step_mask(params, 0.2, "random", 4, 123, None)
    b = step_mask(params, 0.2, "random", 4, 123, None)
    c = step_mask(params, 0.2, "random", 5, 123, None)
    e = step_mask(params, 0.2, "random", 4, 124, None)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], e[k]) for k in a)
    # the layout does not depend on the dict's order
    reordered = step_mask(dict(reversed(list(params.items()))), 0.2, "random", 4, 123, None)
    assert all(torch.equal(a[k], reordered[k]) for k in a)


def test_topk_prev_global_falls_back_to_random_without_previous_update():
    params = _params()
    random_mask = step_mask(params, 0.15, "random", 1, 9, None)
    no_prev = step_mask(params, 0.15, "topk_prev_global", 1, 9, None)
    zero_prev = step_mask(params, 0.15, "topk_prev_global", 1, 9, {k: torch.zeros_like(v) for k, v in params.items()})
    for k in params:
        assert torch.equal(no_prev[k], random_mask[k]) and torch.equal(zero_prev[k], random_mask[k])


def test_step_mask_uses_public_inputs_only():
    # no batch or gradient argument at all
    assert list(inspect.signature(step_mask).parameters) == \
        ["params_like", "density", "method", "round_index", "seed", "previous_global_update"]
    params = _params()
    prev = {k: torch.randn_like(v) for k, v in params.items()}
    # only the shapes of params_like are read: other values (e.g. after private local steps) give the same mask
    other_values = {k: torch.randn_like(v) * 1e3 for k, v in params.items()}
    for method in ("random", "topk_prev_global"):
        m1 = step_mask(params, 0.1, method, 2, 0, prev)
        m2 = step_mask(other_values, 0.1, method, 2, 0, prev)
        assert all(torch.equal(m1[k], m2[k]) for k in m1)


def test_step_mask_rejects_bad_inputs():
    params = _params()
    for density in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="density"):
            step_mask(params, density, "random", 0, 0, None)
    with pytest.raises(ValueError, match="method"):
        step_mask(params, 0.1, "topk_current_gradient", 0, 0, None)
    with pytest.raises(ValueError, match="names"):
        step_mask(params, 0.1, "topk_prev_global", 0, 0, {"enc.w": params["enc.w"]})
    bad = {k: torch.zeros_like(v) for k, v in params.items()}
    bad["dec.b"] = torch.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        step_mask(params, 0.1, "topk_prev_global", 0, 0, bad)


def _fake_per_case_grads(params, scales, seed):
    """Per-case gradients (leading case dim) with case norms spread over `scales` (0 and huge included)."""
    g = torch.Generator().manual_seed(seed)
    m = len(scales)
    s = torch.tensor(scales, dtype=torch.float64)
    return [torch.randn((m, *p.shape), generator=g, dtype=torch.float64) * s.view(-1, *[1] * p.dim())
            for p in params.values()]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: str(r.describe()))
@pytest.mark.parametrize("clip", [1e-3, 1.0, 37.0])
def test_masked_clipped_per_case_gradients_keep_clip_bound(rule, clip):
    params = _params(torch.float64)
    prev = {k: torch.randn_like(v) for k, v in params.items()}
    scales = [0.0, 1e-30, 1e-6, 0.01, 1.0, 10.0, 1e6, 1e30]
    masks_seen = []
    for batch_seed in (1, 2):  # two different private batches
        masks = step_mask(params, 0.1, "topk_prev_global", 3, 0, prev)  # identical public inputs
        masks_seen.append(masks)
        grads = _fake_per_case_grads(params, scales, batch_seed)
        masked = mask_grads(grads, list(masks.values()))
        for g, m in zip(masked, masks.values()):
            assert (g[:, ~m] == 0).all()
        norms = per_case_norms(masked)
        s = rule.scales(norms, clip)
        clipped_norms = per_case_norms([s.view(-1, *[1] * (g.dim() - 1)) * g for g in masked])
        assert torch.isfinite(clipped_norms).all()
        assert (clipped_norms <= clip * (1 + 1e-12)).all(), clipped_norms
        assert clipped_norms[0] == 0  # a zero gradient stays zero
    assert all(torch.equal(masks_seen[0][k], masks_seen[1][k]) for k in params)


def test_masked_engine_with_clipped_sum():
    """clipped_sum on a masked engine clips the masked per-case vectors: sums are zero outside the mask and the
    per-case norms are those of the masked gradients."""
    params = {k: v.requires_grad_() for k, v in _params(torch.float64).items()}
    x = torch.randn(5, 4 * 3 * 3, dtype=torch.float64)

    class Engine:  # same interface as per_case_grads.PerCaseGradients, with a closed-form per-case gradient
        def __init__(self, named):
            self.names, self.params = list(named), list(named.values())

        def chunks(self, data, target):
            for i in range(data.shape[0]):
                grads = [torch.outer(torch.ones(8, dtype=data.dtype), data[i]).reshape(1, 8, 4, 3, 3) * (i + 1),
                         torch.full((1, 8), float(i), dtype=data.dtype), torch.ones(1, 3, 8, dtype=data.dtype),
                         torch.ones(1, 3, dtype=data.dtype) * 1e9]
                yield grads, torch.zeros(1, dtype=data.dtype)

    masks = step_mask(params, 0.2, "random", 0, 0, None)
    engine = Engine(params)
    wrapped = MaskedPerCaseGradients(engine, masks)
    sums = clipped_sum(wrapped, ClippingRule("flat"), 0.5, x, None, keep_raw=True)
    expected_norms = torch.stack([per_case_norms(mask_grads(g, list(masks.values())))[0]
                                  for g, _ in engine.chunks(x, None)])
    torch.testing.assert_close(sums.norms, expected_norms)
    for s, r, m in zip(sums.clipped, sums.raw, masks.values()):
        assert (s[~m] == 0).all() and (r[~m] == 0).all()
    assert _flat(dict(enumerate(sums.clipped))).norm() <= 5 * 0.5 * (1 + 1e-12)


def test_masked_noisy_step_zero_outside_and_noise_std_unchanged_inside():
    d1, d2 = 60_000, 40_000
    params = {"a": torch.zeros(d1), "b": torch.zeros(200, 200)}
    masks = list(step_mask(params, 0.1, "random", 0, 0, None).values())
    sigma, clip, batch = 1.3, 0.7, 4.0
    sums = [torch.zeros(d1), torch.zeros(200, 200)]
    out = masked_add_noise(sums, masks, sigma * clip, batch, make_noise_generator(torch.device("cpu"), 2))
    dense = add_noise(sums, sigma * clip, batch, make_noise_generator(torch.device("cpu"), 2))
    for o, dn, m in zip(out, dense, masks):
        assert (o[~m] == 0).all()                 # exactly zero outside the mask
        assert torch.equal(o[m], dn[m])           # inside: the very same noise as the dense step
    inside = torch.cat([o[m] for o, m in zip(out, masks)]).double()
    k = inside.numel()
    assert k == round(0.1 * (d1 + d2))
    expected = sigma * clip / batch
    assert abs(inside.std().item() / expected - 1) < 5 * math.sqrt(0.5 / k)  # ~ 5 standard errors
    assert abs(inside.mean().item()) < 5 * expected / math.sqrt(k)
    # noise norm ~ sigma C sqrt(k) / B instead of sigma C sqrt(d) / B
    total = torch.cat([o.reshape(-1) for o in out]).norm().item()
    assert abs(total / (expected * math.sqrt(k)) - 1) < 0.05
    # mask_noise_sum on its own does the same thing
    assert all(torch.equal(a, b) for a, b in zip(mask_noise_sum(dense, masks), out))


def test_released_global_update():
    a, b = _params(), {k: v * 0.5 for k, v in _params().items()}
    u = released_global_update(a, b)
    assert all(torch.equal(u[k], a[k] - b[k]) for k in a)


# ---- (b) upload top-k ------------------------------------------------------------------------------------
def _update(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(20, 30, generator=g, dtype=dtype), "b1": torch.randn(20, generator=g, dtype=dtype) * 5,
            "w2": torch.randn(4, 5, 6, generator=g, dtype=dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0001, 0.05, 0.3, 1.0])
def test_topk_round_trip(dtype, density):
    u = _update(dtype)
    enc = topk_encode(u, density)
    assert set(enc) == {f"{n}::{p}" for n in u for p in ("idx", "val")}
    d = _d(u)
    k = max(1, round(density * d))
    assert sum(enc[f"{n}::idx"].numel() for n in u) == k
    for n in u:
        assert enc[f"{n}::idx"].dtype == torch.int64 and enc[f"{n}::val"].dtype == dtype
    dec = topk_decode(enc, {n: (tuple(v.shape), str(v.dtype)) for n, v in u.items()})
    kept = {n: dec[n] != 0 for n in u}
    assert sum(int(m.sum()) for m in kept.values()) == k  # random data: no exact zeros among the kept
    for n in u:
        assert dec[n].dtype == dtype and dec[n].shape == u[n].shape
        assert torch.equal(dec[n][kept[n]], u[n][kept[n]])
        assert (dec[n][~kept[n]] == 0).all()
    # the kept entries are the global top-k by magnitude
    mags = _flat(u).abs().double()
    flat_kept = _flat(kept)
    if k < d:
        assert mags[flat_kept].min() >= mags[~flat_kept].max()
    # it survives safetensors serialisation
    from safetensors.torch import load
    from nnunet_adpfl.common.tensors import tensors_to_bytes
    again = topk_decode(load(tensors_to_bytes(enc)), {n: (list(v.shape), str(v.dtype)) for n, v in u.items()})
    assert all(torch.equal(again[n], dec[n]) for n in u)


@pytest.mark.parametrize("density", [0.01, 0.03, 0.1])
def test_upload_size_shrinks_by_one_over_three_density(density):
    """Exact expectation: the payload is 12 bytes per kept float32 coordinate (int64 index + float32 value)
    against 4 bytes per dense coordinate, so dense/encoded = 4d / 12k = 1 / (3 * density) up to the rounding of
    k and the safetensors headers (a few hundred bytes; < 10% here)."""
    g = torch.Generator().manual_seed(1)
    u = {"conv.weight": torch.randn(128, 64, 3, 3, generator=g), "conv.bias": torch.randn(128, generator=g),
         "head.weight": torch.randn(10, 128, generator=g)}  # d = 75136
    d = _d(u)
    k = max(1, round(density * d))
    enc = topk_encode(u, density)
    payload = sum(t.numel() * t.element_size() for t in enc.values())
    assert payload == 12 * k
    dense_bytes, enc_bytes = encoded_nbytes(u), encoded_nbytes(enc)
    assert dense_bytes - 4 * d < 1024 and enc_bytes - 12 * k < 1024  # header overhead only
    expected = 1 / (3 * density)
    assert abs((4 * d) / payload / expected - 1) < 1e-3  # payload ratio: exact up to the rounding of k
    ratio = dense_bytes / enc_bytes
    assert abs(ratio / expected - 1) < 0.1, (ratio, expected)


def _spec(u):
    return {n: (tuple(v.shape), str(v.dtype)) for n, v in u.items()}


def test_topk_decode_rejects_malformed_encodings():
    u = _update()
    spec = _spec(u)
    enc = topk_encode(u, 0.1)
    topk_decode(enc, spec)  # the well-formed one passes

    def bad(mutate, match):
        e = {k: v.clone() for k, v in enc.items()}
        mutate(e)
        with pytest.raises(ValueError, match=match):
            topk_decode(e, spec)

    bad(lambda e: e.update({"intruder::idx": torch.zeros(1, dtype=torch.int64),
                            "intruder::val": torch.zeros(1)}), "unknown tensor name")
    bad(lambda e: e.update({"w1::extra": torch.zeros(1)}), "unknown key")
    bad(lambda e: e.pop("w2::val"), "missing")
    bad(lambda e: e.update({"w1::idx": torch.cat([e["w1::idx"][:-1], torch.tensor([600])])}), "out of range")
    bad(lambda e: e.update({"w1::idx": torch.cat([e["w1::idx"][:-1], torch.tensor([-1])])}), "out of range")
    bad(lambda e: e.update({"w1::idx": torch.cat([e["w1::idx"][:-1], e["w1::idx"][:1]])}), "duplicate")
    bad(lambda e: e.update({"w1::idx": e["w1::idx"].flip(0)}), "strictly increasing")
    bad(lambda e: e.update({"w1::val": e["w1::val"][:-1]}), "indices but")
    bad(lambda e: e.update({"w1::val": e["w1::val"].double()}), "dtype")
    bad(lambda e: e.update({"w1::idx": e["w1::idx"].to(torch.int32)}), "int64")
    bad(lambda e: e.update({"w1::idx": e["w1::idx"].reshape(1, -1)}), "1-D")
    bad(lambda e: e["w1::val"].__setitem__(0, float("nan")), "NaN")
    with pytest.raises(ValueError, match="at most"):
        topk_decode(enc, spec, max_total=10)


def test_topk_encode_rejects_bad_inputs():
    with pytest.raises(ValueError, match="density"):
        topk_encode(_update(), 0)
    with pytest.raises(ValueError, match="NaN"):
        topk_encode({"a": torch.tensor([1.0, float("inf")])}, 0.5)
    with pytest.raises(ValueError, match="floating"):
        topk_encode({"a": torch.arange(4)}, 0.5)


def _cumulative_error(feedback: bool, rounds: int, density: float):
    u = _update(torch.float64, seed=3)
    ef = ErrorFeedback()
    sent_sum = {k: torch.zeros_like(v) for k, v in u.items()}
    errors, residual_norms = [], []
    for r in range(1, rounds + 1):
        if feedback:
            enc, sent = ef.compress(u, density)
            # conservation: what was sent plus what is kept equals everything so far
            total_sent = {k: sent_sum[k] + sent[k] for k in u}
            torch.testing.assert_close(_flat(total_sent) + _flat(ef.residual), r * _flat(u), rtol=0, atol=1e-9)
            residual_norms.append(_flat(ef.residual).norm().item())
        else:
            sent = topk_decode(topk_encode(u, density), _spec(u))
        for k in u:
            sent_sum[k] += sent[k]
        errors.append((_flat(sent_sum) - r * _flat(u)).norm().item() / (r * _flat(u).norm().item()))
    return errors, residual_norms


def test_error_feedback_tracks_the_cumulative_sum():
    rounds, density = 120, 0.05
    with_ef, residuals = _cumulative_error(True, rounds, density)
    without, _ = _cumulative_error(False, rounds, density)
    norm_u = _flat(_update(torch.float64, seed=3)).norm().item()
    # with feedback the residual stays bounded (does not grow with the rounds) ...
    assert max(residuals[rounds // 2:]) <= 1.5 * max(residuals[:rounds // 2])
    assert max(residuals) < 1 / density * norm_u
    # ... so the relative cumulative error goes to 0; without it, it stays at ||u - topk(u)|| / ||u||
    assert with_ef[-1] < 0.1 and with_ef[-1] < with_ef[9] / 3
    assert without[-1] > 0.5 and abs(without[-1] - without[0]) < 1e-12


def test_error_feedback_state_dict_round_trip():
    u = _update()
    a = ErrorFeedback()
    assert a.state_dict() == {}
    a.compress(u, 0.1)
    state = a.state_dict()
    assert set(state) == set(u)
    from safetensors.torch import load
    from nnunet_adpfl.common.tensors import tensors_to_bytes
    b = ErrorFeedback()
    b.load_state_dict(load(tensors_to_bytes(state)))  # a site can checkpoint it as safetensors
    u2 = _update(seed=1)
    enc_a, sent_a = a.compress(u2, 0.1)
    enc_b, sent_b = b.compress(u2, 0.1)
    assert all(torch.equal(sent_a[k], sent_b[k]) for k in u)
    assert all(torch.equal(a.residual[k], b.residual[k]) for k in u)
    c = ErrorFeedback()
    c.load_state_dict({})
    assert c.residual is None
    with pytest.raises(ValueError, match="names"):
        a.compress({"other": torch.zeros(3)}, 0.1)
