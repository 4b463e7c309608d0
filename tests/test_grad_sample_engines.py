"""The 'hooks' engine beyond the shared per-case-loop check (tests/test_per_case_grads.py): augmentation
multiplicity, chunking, non-finite cases, 'auto', and bf16 autocast with the clipping bound in fp32."""
import pytest
import torch
from torch import nn

from nnunet_adpfl.privacy.clipping import ClippingRule
from nnunet_adpfl.privacy.grad_sample import _producer
from nnunet_adpfl.privacy.noisy_step import clipped_sum
from nnunet_adpfl.common.config import SettingsError, load_settings
from nnunet_adpfl.privacy.per_case_grads import (PerCaseGradients, balanced_chunks, choose_autocast,
                                                 trainable_params_reached_by_loss)
from nnunet_adpfl.privacy import grad_sample
from tests.test_per_case_grads import CASES, engine_grads, reference_grads, setup

real_ghost_sq_norm = grad_sample.ghost_sq_norm


def _params(net, loss, x, y):
    return trainable_params_reached_by_loss(net, loss.per_case, x[:1], [t[:1] for t in y])


def test_hooks_multiplicity_matches_loop():
    net, x, y, loss = setup(3, False, True, False, batch=6)
    params = _params(net, loss, x, y)
    rows = {}
    for engine in ("loop", "hooks"):
        pc = PerCaseGradients(net, loss.per_case, params, engine, chunk_size=1, multiplicity=3)
        chunks = list(pc.chunks(x, y))
        rows[engine] = (torch.cat([torch.cat([g.flatten(1) for g in grads], 1) for grads, _ in chunks]),
                        torch.cat([losses for _, losses in chunks]))
    assert rows["hooks"][0].shape[0] == 2  # 6 patches = 2 cases of 3
    torch.testing.assert_close(rows["hooks"][0], rows["loop"][0], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(rows["hooks"][1], rows["loop"][1].to(rows["hooks"][1].dtype))


def test_chunks_are_balanced_and_cover_every_case_once():
    assert balanced_chunks(4, 3) == [(0, 2), (2, 4)]  # not 3 + a lone case
    assert [b - a for a, b in balanced_chunks(32, 3)] == [3] * 10 + [2]
    assert [b - a for a, b in balanced_chunks(5, 2)] == [2, 2, 1]
    assert balanced_chunks(6, 8) == [(0, 6)] and balanced_chunks(3, 1) == [(0, 1), (1, 2), (2, 3)]
    assert balanced_chunks(0, 3) == []
    for n in range(1, 40):
        for size in range(1, 12):
            bounds = balanced_chunks(n, size)
            sizes = [b - a for a, b in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == n and all(bounds[i][1] == bounds[i + 1][0]
                                                                    for i in range(len(bounds) - 1))
            assert max(sizes) <= size and max(sizes) - min(sizes) <= 1 and len(bounds) == -(-n // size)


def test_hooks_chunking_does_not_change_result():
    net, x, y, loss = setup(2, False, True, False, batch=5)
    params = _params(net, loss, x, y)
    a = engine_grads("hooks", net, loss, params, x, y, chunk=5)
    b = engine_grads("hooks", net, loss, params, x, y, chunk=2)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_non_finite_case_leaves_the_others_alone_and_contributes_zero():
    net, x, y, loss = setup(3, False, True, False, batch=3)
    params = _params(net, loss, x, y)
    clean = engine_grads("hooks", net, loss, params, x, y, chunk=3)
    x_bad = x.clone()
    x_bad[1, 0, 0, 0, 0] = float("inf")
    bad = engine_grads("hooks", net, loss, params, x_bad, y, chunk=3)
    assert not torch.isfinite(bad[1]).all()
    torch.testing.assert_close(bad[[0, 2]], clean[[0, 2]], rtol=0, atol=0)  # one batched pass, cases untouched
    pc = PerCaseGradients(net, loss.per_case, params, "hooks", chunk_size=3)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        sums = clipped_sum(pc, ClippingRule("flat"), 1e9, x_bad, y)
    assert sums.non_finite == 1
    flat = torch.cat([g.flatten() for g in sums.clipped])
    torch.testing.assert_close(flat, clean[[0, 2]].sum(0))


def test_auto_is_ghost_on_cpu_for_nnunet_layers_and_loop_for_others():
    net, x, y, loss = setup(3, True, True, False)
    assert PerCaseGradients(net, loss.per_case, _params(net, loss, x, y), "auto").engine == "ghost"
    other = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2))
    params = dict(other.named_parameters())
    per_case = lambda out, t: out.flatten(1).sum(1)  # noqa: E731
    assert PerCaseGradients(other, per_case, params, "auto").engine == "loop"
    with pytest.raises(ValueError, match=r"no rule for: 1 \(GroupNorm\)"):
        PerCaseGradients(other, per_case, params, "hooks")
    with pytest.raises(ValueError, match="unknown per-case gradient engine 'fast'"):
        PerCaseGradients(other, per_case, params, "fast")


def test_a_hook_on_a_partial_view_is_refused():
    base = torch.randn(2, 3, requires_grad=True) * 2
    assert _producer(base) is base.grad_fn
    with pytest.raises(ValueError, match="partial view"):
        _producer(base[:, :2])


def test_autocast_is_refused_with_vmap():
    net, x, y, loss = setup(2, False, True, False, dtype=torch.float32)
    with pytest.raises(ValueError, match="autocast"):
        PerCaseGradients(net, loss.per_case, _params(net, loss, x, y), "vmap", autocast=torch.bfloat16)


@pytest.mark.parametrize("engine", ["loop", "hooks", "ghost"])
def test_bf16_autocast_keeps_gradients_norms_and_the_clip_bound_in_fp32(engine):
    net, x, y, loss = setup(3, False, True, False, batch=3, dtype=torch.float32)
    params = _params(net, loss, x, y)
    seen = []
    hook = net.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    pc = PerCaseGradients(net, loss.per_case, params, engine, chunk_size=3, autocast=torch.bfloat16)
    chunks = [grads for grads, _ in pc.chunks(x, y)]
    hook.remove()
    assert seen and all(seen)  # the per-case forward ran under autocast
    assert all(g.dtype == torch.float32 for grads in chunks for g in grads)
    got = torch.cat([torch.cat([g.flatten(1) for g in grads], 1) for grads in chunks])
    ref = engine_grads("loop", net, loss, params, x, y)
    assert (torch.nn.functional.cosine_similarity(got, ref, dim=1) > 0.9).all()  # bf16 rounding, same gradient
    clip = 0.5 * float(ref.norm(dim=1).min())  # every case is clipped
    for i in range(x.shape[0]):
        one = clipped_sum(pc, ClippingRule("flat"), clip, x[i:i + 1], [t[i:i + 1] for t in y])
        assert all(g.dtype == torch.float32 for g in one.clipped) and one.norms.dtype == torch.float32
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in one.clipped))
        assert norm <= clip * (1 + 4 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("ghost", ["all", "cost"])
def test_ghost_engine_keeps_each_case_within_the_clip_bound_in_fp32(dim, ghost, monkeypatch):
    """The ghost norm is computed apart from the gradient it scales (Gram matrices vs one batched weight gradient),
    so in fp32 a norm below the gradient's norm would let a case through above C. Each case alone, clipped to half
    its norm: its contribution stays within C up to fp32 rounding, and its ghost norm matches the hooks engine's."""
    if ghost == "cost":  # a mixed choice, as in the float64 test above
        monkeypatch.setattr(grad_sample, "ghost_is_cheaper", lambda m, shape, k: m.in_channels != m.out_channels)
    net, x, y, loss = setup(dim, True, True, False, batch=3, dtype=torch.float32)
    params = _params(net, loss, x, y)
    hooks = engine_grads("hooks", net, loss, params, x, y, chunk=3)
    ghosted = PerCaseGradients(net, loss.per_case, params, "ghost", chunk_size=1, ghost=ghost)
    for i in range(x.shape[0]):
        clip = 0.5 * float(hooks[i].norm())
        one = clipped_sum(ghosted, ClippingRule("flat"), clip, x[i:i + 1], [t[i:i + 1] for t in y])
        assert one.norms.dtype == torch.float32
        torch.testing.assert_close(one.norms[0], hooks[i].norm(), rtol=1e-5, atol=0)
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in one.clipped))
        assert clip * (1 - 1e-3) <= norm <= clip * (1 + 4 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("rule", [ClippingRule("flat"), ClippingRule("autos", {"gamma": 0.01})])
def test_ghost_engine_clips_a_crafted_case_whose_gradient_cancels(rule):
    """A case whose per-position weight gradients cancel (constant input, output gradient of alternating sign): in
    fp32 its Gram product could round to 0 and let the case into the sum unclipped (100 C measured). The ghost
    norm is an upper bound (float64 with its rounding bound), so the case stays within C."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(64, 64, 1, bias=False))
    params = dict(net.named_parameters())

    def linear_loss(out, y):  # d loss_i / d out_i = y_i: the output gradient is chosen
        return (out * y).flatten(1).sum(1)

    ghosted = PerCaseGradients(net, linear_loss, params, "ghost", chunk_size=1, ghost="all")
    hooks = PerCaseGradients(net, linear_loss, params, "hooks", chunk_size=1)
    a, g = torch.randn(64), torch.randn(64)
    sign = torch.tensor([(-1.0) ** t for t in range(16)]).view(4, 4)
    x = a.view(1, 64, 1, 1).expand(1, 64, 4, 4).contiguous()
    worst = 0.0
    for trial in range(60):
        y = (g.view(1, 64, 1, 1) * sign * 10 ** (1 + trial / 20) + 1e-3 * torch.randn(1, 64, 4, 4)).contiguous()
        clip = 0.01 * float(next(hooks.chunks(x, y))[0][0].double().norm())
        one = clipped_sum(ghosted, rule, clip, x, y)
        worst = max(worst, float(torch.sqrt(sum(t.double().pow(2).sum() for t in one.clipped))) / clip)
    assert worst <= 1 + 1e-5


def test_dp_autocast_setting_chooses_bf16_on_cuda_only_and_never_with_vmap():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_autocast("off", cpu, "hooks") is None and choose_autocast("bf16", cpu, "loop") is torch.bfloat16
    assert choose_autocast("auto", cpu, "hooks") is None  # fp32 on CPU, as nnU-Net's CPU step
    assert choose_autocast("auto", cuda, "vmap") is None
    if torch.cuda.is_available():
        assert choose_autocast("auto", cuda, "hooks") is (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    with pytest.raises(ValueError, match="vmap"):
        choose_autocast("bf16", cpu, "vmap")
    with pytest.raises(ValueError, match="unknown autocast"):
        choose_autocast("fp16", cpu, "hooks")
    net, x, y, loss = setup(2, False, True, False, dtype=torch.float32)
    assert PerCaseGradients(net, loss.per_case, _params(net, loss, x, y), "hooks", autocast="bf16").autocast \
        is torch.bfloat16
    assert load_settings(overrides={"noise_multiplier": 1.0})["dp_autocast"] == "auto"
    with pytest.raises(SettingsError, match="dp_autocast"):
        load_settings(overrides={"noise_multiplier": 1.0, "dp_autocast": "fp16"})


def _reference_clipped(net, loss, params, x, y, k=1):
    """float64 per-case loop: per-case gradients (a case = its k patches, mean loss), norms, flat-clipped sum."""
    per_patch = reference_grads(net, loss, params, x, y)
    ref = per_patch.reshape(x.shape[0] // k, k, -1).mean(1)
    norms = ref.norm(dim=1)
    clip = float(norms.median())  # some cases clipped, some not
    return norms, (ClippingRule("flat").scales(norms, clip)[:, None] * ref).sum(0), clip


GHOST_SLACK = 1e-6  # a ghost norm is an upper bound: the Gram product plus its worst-case float64 rounding error


def assert_upper_bound(ghost_norms, norms):
    assert bool((ghost_norms >= norms * (1 - 1e-12)).all())
    torch.testing.assert_close(ghost_norms, norms, rtol=GHOST_SLACK, atol=0)


@pytest.mark.parametrize("ghost,dim,residual,ds,regions",
                         [("all", *case) for case in CASES]
                         + [("cost", 2, False, True, False), ("cost", 3, True, True, False)])
def test_ghost_engine_norms_and_clipped_sum_match_the_per_case_loop(ghost, dim, residual, ds, regions, monkeypatch):
    """'all': every conv weight by ghost norm; 'cost' with a mixed choice (the test nets are too small for the time
    rule to pick any): ghost norms for the convs that change the channel count, per-case gradients for the rest."""
    if ghost == "cost":
        monkeypatch.setattr(grad_sample, "ghost_is_cheaper", lambda m, shape, k: m.in_channels != m.out_channels)
    net, x, y, loss = setup(dim, residual, ds, regions)
    params = trainable_params_reached_by_loss(net, loss.per_case, x[:1], [t[:1] for t in y] if ds else y[:1])
    norms, ref_sum, clip = _reference_clipped(net, loss, params, x, y)
    ghosted = []
    monkeypatch.setattr(grad_sample, "ghost_sq_norm", lambda m, *a: ghosted.append(m) or real_ghost_sq_norm(m, *a))
    pc = PerCaseGradients(net, loss.per_case, params, "ghost", chunk_size=2, ghost=ghost)
    sums = clipped_sum(pc, ClippingRule("flat"), clip, x, y)
    assert_upper_bound(sums.norms, norms)
    got = torch.cat([g.flatten() for g in sums.clipped])
    assert float((got - ref_sum).norm() / ref_sum.norm()) <= GHOST_SLACK
    trained = {id(p) for p in params.values()}
    convs = {m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d))
             and id(m.weight) in trained}
    if ghost == "all":  # every trained conv and transposed conv weight went through the ghost norm, in both chunks
        assert len(ghosted) == 2 * len(convs) and set(ghosted) == convs
    else:
        assert set(ghosted) == {m for m in convs if m.in_channels != m.out_channels} != convs


def test_ghost_time_rule_picks_low_resolution_wide_convs_only():
    x8, x64 = torch.zeros(1, 256, 8, 8), torch.zeros(1, 32, 64, 64)
    wide, early = nn.Conv2d(256, 256, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
    up = nn.ConvTranspose2d(256, 128, 2, 2)
    assert grad_sample.ghost_is_cheaper(wide, grad_sample._ghost_shape(wide, x8, wide(x8)), 1)  # 64 x 2560 < 2304 x 256
    assert not grad_sample.ghost_is_cheaper(wide, grad_sample._ghost_shape(wide, x8, wide(x8)), 16)  # K = 16 patches
    assert not grad_sample.ghost_is_cheaper(early, grad_sample._ghost_shape(early, x64, early(x64)), 1)
    assert not grad_sample.ghost_is_cheaper(up, grad_sample._ghost_shape(up, x8, up(x8)), 1)


def test_ghost_engine_with_multiplicity_and_a_non_finite_case():
    net, x, y, loss = setup(2, False, True, False, batch=6)
    params = _params(net, loss, x, y)
    norms, ref_sum, clip = _reference_clipped(net, loss, params, x, y, k=3)
    pc = PerCaseGradients(net, loss.per_case, params, "ghost", chunk_size=1, multiplicity=3, ghost="all")
    sums = clipped_sum(pc, ClippingRule("flat"), clip, x, y)
    assert_upper_bound(sums.norms, norms)
    assert float((torch.cat([g.flatten() for g in sums.clipped]) - ref_sum).norm() / ref_sum.norm()) <= GHOST_SLACK
    x_bad = x.clone()
    x_bad[4, 0, 0, 0] = float("nan")  # a patch of the second case
    pc = PerCaseGradients(net, loss.per_case, params, "ghost", chunk_size=2, multiplicity=3, ghost="all")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        bad = clipped_sum(pc, ClippingRule("flat"), 1e9, x_bad, y)
    first = reference_grads(net, loss, params, x[:3], [t[:3] for t in y]).mean(0)
    assert bad.non_finite == 1 and torch.isinf(bad.norms[1])
    torch.testing.assert_close(torch.cat([g.flatten() for g in bad.clipped]), first)


def test_instance_norm_rule_reuses_the_statistics_its_forward_saved():
    net, x, y, loss = setup(2, False, True, False)
    norm = next(m for m in net.modules() if isinstance(m, nn.InstanceNorm2d))
    seen = []
    hook = norm.register_forward_hook(lambda m, i, o: seen.append(
        grad_sample._saved_norm_stats(m, grad_sample._producer(o), i[0])))
    net(x)
    hook.remove()
    mean, rstd = seen[0]  # found (not None): the hooks engine does not recompute them
    with torch.no_grad():
        captured = []
        h = norm.register_forward_hook(lambda m, i, o: captured.append(i[0]))
        net(x)
        h.remove()
        norm_input = captured[0].flatten(2)
    var, ref_mean = torch.var_mean(norm_input, -1, unbiased=False)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(rstd, torch.rsqrt(var + norm.eps))
    assert grad_sample._saved_norm_stats(norm, None, norm_input[..., None]) is None  # another node: recomputed


@pytest.mark.parametrize("engine", ["hooks", "ghost"])
def test_a_step_keeps_no_activation_alive(engine):
    """Every step's layer outputs are freed after it: a hook that held its own layer's output made a cycle through
    autograd that Python's GC never frees (the site grew by the batch's activations every step, then OOM)."""
    import gc
    import weakref
    net, x, y, loss = setup(2, False, True, False, batch=4)
    params = _params(net, loss, x, y)
    outputs = []
    probe = [m for m in net.modules() if isinstance(m, nn.Conv2d)][0].register_forward_hook(
        lambda m, i, o: outputs.append(weakref.ref(o)))
    pc = PerCaseGradients(net, loss.per_case, params, engine, chunk_size=2)
    clipped_sum(pc, ClippingRule("flat"), 1.0, x, y)
    probe.remove()
    gc.collect()
    assert len(outputs) == 2 and all(ref() is None for ref in outputs)
