"""Augmentation multiplicity (K patches per included case, clipped once) and dp_trainable (fewer trainable
parameters): the per-case contribution bound, K=1 equal to the single-patch path bit for bit, and the selections."""
import copy

import pytest
import torch

from nnunet_adpfl.privacy.clipping import ClippingRule
from nnunet_adpfl.common.config import SettingsError
from nnunet_adpfl.training.losses import PerCaseLoss
from nnunet_adpfl.privacy.noisy_step import clipped_sum
from nnunet_adpfl.privacy.per_case_grads import PerCaseGradients, trainable_params_reached_by_loss
from nnunet_adpfl.training.trainable import count_parameters, select_trainable
from tests.nets import build, ds_targets

RULES = [ClippingRule("flat"), ClippingRule("autos", {"gamma": 0.01}), ClippingRule("nsgd", {"r": 0.01}),
         ClippingRule("psac", {"r": 0.1})]


def _setup(batch, dtype=torch.float64):
    net = build(2, in_ch=1, out_ch=2, deep_supervision=False).to(dtype)
    x = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(2), dtype=dtype) * 3
    with torch.no_grad():
        y = ds_targets(net(x), 2).to(dtype)
    return net, x, y, PerCaseLoss(False, None, None)


def _params(net, loss, x, y):
    return trainable_params_reached_by_loss(net, loss.per_case, x[:1], y[:1])


def _flat(grads):
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], 1)


@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_k1_is_the_single_patch_path_bit_for_bit(engine):
    """K=1 against the per-case gradient as computed before multiplicity existed: loss of one case, its grad."""
    net, x, y, loss = _setup(4, torch.float32)
    params = _params(net, loss, x, y)
    pc = PerCaseGradients(net, loss.per_case, params, engine, chunk_size=2, multiplicity=1)
    got = torch.cat([_flat(g) for g, _ in pc.chunks(x, y)])
    if engine == "loop":
        ref = [torch.cat([g.flatten() for g in torch.autograd.grad(loss.per_case(net(x[i:i + 1]), y[i:i + 1])[0],
                                                                    list(params.values()))]) for i in range(4)]
    else:
        from torch.func import functional_call, grad, vmap

        def one(p, xi, yi):
            return loss.per_case(functional_call(net, p, (xi.unsqueeze(0),), tie_weights=False), yi.unsqueeze(0))[0]
        detached = {n: p.detach() for n, p in params.items()}
        out = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")
        ref = [torch.cat([g[n][j].flatten() for n in params]) for s in (0, 2) for g in [out(detached, x[s:s + 2],
                                                                                          y[s:s + 2])]
               for j in range(2)]
    assert torch.equal(got, torch.stack(ref))


@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_a_case_gradient_is_the_mean_over_its_k_patches(engine):
    net, x, y, loss = _setup(6)  # 2 cases x K=3 patches
    params = _params(net, loss, x, y)
    pc = PerCaseGradients(net, loss.per_case, params, engine, chunk_size=2, multiplicity=3)
    got = torch.cat([_flat(g) for g, _ in pc.chunks(x, y)])
    assert got.shape[0] == 2
    per_patch = []
    for i in range(6):
        m = copy.deepcopy(net)
        loss(m(x[i:i + 1]), y[i:i + 1]).backward()
        named = dict(m.named_parameters())
        per_patch.append(torch.cat([named[n].grad.flatten() for n in params]))
    ref = torch.stack(per_patch).reshape(2, 3, -1).mean(1)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)


def test_batch_must_hold_k_patches_per_case():
    net, x, y, loss = _setup(5)
    pc = PerCaseGradients(net, loss.per_case, _params(net, loss, x, y), "loop", multiplicity=2)
    with pytest.raises(ValueError, match="2 patches per case"):
        next(pc.chunks(x, y))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
@pytest.mark.parametrize("k", [1, 3])
def test_one_case_with_k_patches_moves_the_clipped_sum_by_at_most_c(rule, k):
    """Sensitivity: removing one case (all K of its patches) changes sum_i s_i g_i by <= C."""
    clip = 0.05
    net, x, y, loss = _setup(3 * k)
    params = _params(net, loss, x, y)
    full = clipped_sum(PerCaseGradients(net, loss.per_case, params, "loop", multiplicity=k), rule, clip, x, y)
    assert full.batch_size == 3 and float(full.norms.min()) > clip  # every case is clipped
    for drop in range(3):
        keep = [i for i in range(3 * k) if i // k != drop]
        part = clipped_sum(PerCaseGradients(net, loss.per_case, params, "loop", multiplicity=k), rule, clip,
                           x[keep], y[keep])
        diff = torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(full.clipped, part.clipped)))
        assert float(diff) <= clip * (1 + 1e-9)


def test_trainable_selections():
    net = build(3, in_ch=1, out_ch=3)
    names = dict(net.named_parameters())
    total = count_parameters(names.values())
    assert select_trainable(net, "all") == set(names)
    decoder = select_trainable(net, "decoder")
    assert decoder and all(n.startswith("decoder.") for n in decoder)
    assert not any(n.startswith("encoder.") for n in decoder)  # the decoder's reference to the encoder is not its own
    head = select_trainable(net, "head")
    assert head and all(".seg_layers." in n for n in head) and head < decoder
    nb = select_trainable(net, "norm_bias")
    assert all(n.endswith(".bias") or ".norm." in n for n in nb)
    assert any(".norm.weight" in n for n in nb) and not any(n.endswith("conv.weight") for n in nb)
    counts = {c: count_parameters(names[n] for n in select_trainable(net, c)) for c in ("decoder", "norm_bias", "head")}
    assert counts["head"] < counts["norm_bias"] < counts["decoder"] < total
    with pytest.raises(SettingsError, match="dp_trainable"):
        select_trainable(net, "encoder")
