"""Per-case gradients of every engine (loop, vmap, hooks) equal an independent per-case loop on real nnU-Net networks."""
import copy

import pytest
import torch
from torch import nn

from nnunet_adpfl.common.config import SettingsError
from nnunet_adpfl.training.dp_trainer import deep_supervision_weights, make_dp_safe
from nnunet_adpfl.training.losses import PerCaseLoss
from nnunet_adpfl.privacy.per_case_grads import PerCaseGradients, trainable_params_reached_by_loss
from tests.nets import build, ds_targets

CASES = [  # (dim, residual, deep_supervision, regions)
    (2, False, True, False),
    (3, False, True, False),
    (3, True, True, False),
    (3, False, False, False),
    (3, False, True, True),
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CI has no GPU; a GPU machine checks both


def setup(dim, residual, ds, regions, batch=3, dtype=torch.float64, device="cpu"):
    """float64: on CPU a float32 batch-of-one backward can itself be off by ~1e-2 (seen on case 1 here),
    so algorithmic equality is checked where round-off cannot hide a difference."""
    net = build(dim, in_ch=2, out_ch=3, residual=residual, deep_supervision=ds).to(device, dtype)
    shape = (16, 16) if dim == 2 else (8, 16, 16)
    x = torch.randn(batch, 2, *shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    with torch.no_grad():
        out = net(x)
    y = ds_targets(out, 3, regions=regions)
    y = [t.to(device, dtype) for t in y] if isinstance(y, list) else y.to(device, dtype)
    weights = deep_supervision_weights(len(out)) if ds else None
    loss = PerCaseLoss(regions, None, weights)
    return net, x, y, loss


def reference_grads(net, loss, params, x, y):
    """Independent per-case loop: a fresh copy of the model and .backward() on one case at a time."""
    out = []
    for i in range(x.shape[0]):
        m = copy.deepcopy(net)
        named = dict(m.named_parameters())
        yi = [t[i:i + 1] for t in y] if isinstance(y, list) else y[i:i + 1]
        loss(m(x[i:i + 1]), yi).backward()
        out.append(torch.cat([(named[n].grad if named[n].grad is not None else torch.zeros_like(p)).flatten()
                              for n, p in params.items()]))
    return torch.stack(out)


def engine_grads(engine, net, loss, params, x, y, chunk=2):
    pc = PerCaseGradients(net, loss.per_case, params, engine, chunk)
    rows = []
    for grads, _ in pc.chunks(x, y):
        rows.append(torch.cat([g.reshape(g.shape[0], -1) for g in grads], 1))
    return torch.cat(rows)


@pytest.mark.parametrize("dim,residual,ds,regions", CASES)
@pytest.mark.parametrize("engine", ["loop", "vmap", "hooks"])
@pytest.mark.parametrize("device", DEVICES)
def test_per_case_gradients_match_per_case_loop(engine, dim, residual, ds, regions, device):
    net, x, y, loss = setup(dim, residual, ds, regions, device=device)
    params = trainable_params_reached_by_loss(net, loss.per_case, x[:1], [t[:1] for t in y] if ds else y[:1])
    ref = reference_grads(net, loss, params, x, y)
    got = engine_grads(engine, net, loss, params, x, y)
    rel = (got - ref).norm(dim=1) / ref.norm(dim=1)
    assert (rel <= 1e-5).all(), rel


def test_vmap_chunking_does_not_change_result():
    net, x, y, loss = setup(3, False, True, False, batch=5)
    params = dict(net.named_parameters())
    a = engine_grads("vmap", net, loss, params, x, y, chunk=5)
    b = engine_grads("vmap", net, loss, params, x, y, chunk=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_zero_weight_deep_supervision_head_is_not_trained():
    net, x, y, loss = setup(3, False, True, False)
    params = trainable_params_reached_by_loss(net, loss.per_case, x[:1], [t[:1] for t in y])
    unreached = set(dict(net.named_parameters())) - set(params)
    # nnU-Net gives the lowest-resolution output loss weight 0: its head gets no gradient
    assert unreached == {"decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"}


def test_vmap_leaves_no_functorch_tensors_in_model():
    """functional_call(tie_weights=True) would leave functorch tensors behind and break nnU-Net's validation."""
    from torch._C._functorch import is_functorch_wrapped_tensor
    net, x, y, loss = setup(3, False, True, False)
    engine_grads("vmap", net, loss, dict(net.named_parameters()), x, y)
    for t in list(net.parameters()) + list(net.buffers()):
        assert type(t) in (nn.Parameter, torch.Tensor) and not is_functorch_wrapped_tensor(t)
    net.eval()
    net.decoder.deep_supervision = False
    with torch.no_grad():
        assert net(x).shape[1] == 3


def test_make_dp_safe_removes_inplace_and_refuses_batchnorm():
    net = build(3, dp_safe=False)
    assert any(getattr(m, "inplace", False) for m in net.modules())  # nnU-Net's plan default
    make_dp_safe(net)
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    with pytest.raises(SettingsError, match="BatchNorm"):
        make_dp_safe(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))


def test_opacus_grad_sample_module_is_wrong_on_nnunet_networks():
    """Why we do not use Opacus' GradSampleModule: nnU-Net registers its convs twice (conv and all_modules),
    so its hooks fire twice and the per-case gradients come out too large."""
    from opacus import GradSampleModule
    net, x, y, loss = setup(2, False, True, False, batch=2, dtype=torch.float32)
    params = dict(net.named_parameters())
    ref = reference_grads(net, loss, params, x, y)
    gsm = GradSampleModule(copy.deepcopy(net))
    loss(gsm(x), y).backward()  # mean over the batch -> per-sample grads are scaled by 1/B
    got = torch.cat([p.grad_sample.reshape(2, -1) * 2 if p.grad_sample is not None else torch.zeros(2, p.numel())
                     for p in gsm.parameters()], 1)
    assert got.shape == ref.shape
    rel = ((got - ref).norm(dim=1) / ref.norm(dim=1)).max()
    assert rel > 0.5, "Opacus now matches the reference; the engine choice could be revisited"
