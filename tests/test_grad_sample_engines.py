"""The 'hooks' engine beyond the shared per-case-loop check (tests/test_per_case_grads.py): augmentation
multiplicity, chunking, non-finite cases, 'auto', and bf16 autocast with the clipping bound in fp32."""
import pytest
import torch
from torch import nn

from nnunet_adpfl.privacy.clipping import ClippingRule
from nnunet_adpfl.privacy.grad_sample import _producer
from nnunet_adpfl.privacy.noisy_step import clipped_sum
from nnunet_adpfl.common.config import SettingsError, load_settings
from nnunet_adpfl.privacy.per_case_grads import PerCaseGradients, choose_autocast, trainable_params_reached_by_loss
from tests.test_per_case_grads import engine_grads, setup


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


def test_auto_is_hooks_on_cpu_for_nnunet_layers_and_loop_for_others():
    net, x, y, loss = setup(3, True, True, False)
    assert PerCaseGradients(net, loss.per_case, _params(net, loss, x, y), "auto").engine == "hooks"
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


@pytest.mark.parametrize("engine", ["loop", "hooks"])
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
