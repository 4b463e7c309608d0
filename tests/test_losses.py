"""Our vmap-safe per-case loss equals nnU-Net's loss on single cases and never couples cases."""
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_adpfl.training.losses import PerCaseLoss


def nnunet_ce_loss(ignore_label=None, batch_dice=False):
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)


def nnunet_bce_loss(use_ignore=False):
    return DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           use_ignore_label=use_ignore, dice_class=MemoryEfficientSoftDiceLoss)


def labels(shape, n, seed, ignore=None):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n, shape, generator=g).float()
    if ignore is not None:
        y[torch.rand(shape, generator=g) < 0.2] = ignore
    return y


@pytest.mark.parametrize("spatial", [(12, 10), (6, 8, 10)])
@pytest.mark.parametrize("ignore", [None, 4])
def test_softmax_loss_matches_nnunet_per_case(spatial, ignore):
    x = torch.randn(3, 4, *spatial)
    y = labels((3, 1, *spatial), 4, 1, ignore)
    ours = PerCaseLoss(False, ignore, None)
    ref = nnunet_ce_loss(ignore)
    per_case = ours.per_case(x, y)
    for i in range(3):
        torch.testing.assert_close(per_case[i], ref(x[i:i + 1], y[i:i + 1]), rtol=1e-5, atol=1e-6)
    if ignore is None:  # without an ignore label nnU-Net's batch loss (batch_dice=False) is the mean
        torch.testing.assert_close(ours(x, y), ref(x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_ignore", [False, True])
def test_region_loss_matches_nnunet_per_case(use_ignore):
    x = torch.randn(2, 3, 8, 8, 8)
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(2, 3 + use_ignore, 8, 8, 8, generator=g) > 0.6).float()
    ours = PerCaseLoss(True, 99 if use_ignore else None, None).per_case(x, y)
    ref = nnunet_bce_loss(use_ignore)
    for i in range(2):
        torch.testing.assert_close(ours[i], ref(x[i:i + 1], y[i:i + 1]), rtol=1e-5, atol=1e-6)


def test_deep_supervision_weights_match_nnunet_wrapper():
    weights = [0.6, 0.4, 0.0]
    xs = [torch.randn(2, 3, s, s, dtype=torch.float64) for s in (16, 8, 4)]
    ys = [labels((2, 1, s, s), 3, s) for s in (16, 8, 4)]
    ours = PerCaseLoss(False, None, weights)
    ref = DeepSupervisionWrapper(nnunet_ce_loss(), weights)
    torch.testing.assert_close(ours(xs, ys), ref(xs, ys))


def test_case_loss_does_not_depend_on_other_cases():
    x = torch.randn(3, 3, 8, 8)
    y = labels((3, 1, 8, 8), 3, 0)
    loss = PerCaseLoss(False, None, None)
    before = loss.per_case(x, y)
    x2, y2 = x.clone(), y.clone()
    x2[1:] = torch.randn_like(x2[1:]) * 5
    y2[1:] = 0
    assert torch.equal(loss.per_case(x2, y2)[0], before[0])
    # nnU-Net's batch Dice would couple them: the trap this loss avoids
    bd = nnunet_ce_loss(batch_dice=True)
    assert not torch.allclose(bd(x, y) * 3, bd(x[:1], y[:1]) + bd(x[1:2], y[1:2]) + bd(x[2:], y[2:]))


def test_loss_runs_under_vmap_where_nnunet_loss_fails():
    from torch.func import grad, vmap
    x = torch.randn(2, 3, 6, 6)
    y = labels((2, 1, 6, 6), 3, 0)
    ours = PerCaseLoss(False, None, None)
    g = vmap(grad(lambda xi, yi: ours.per_case(xi[None], yi[None])[0]))(x, y)
    assert g.shape == x.shape
    with pytest.raises(Exception):  # in-place scatter_ in nnU-Net's Dice one-hot is rejected by vmap
        vmap(grad(lambda xi, yi: nnunet_ce_loss()(xi[None], yi[None])))(x, y)
