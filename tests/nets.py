"""Small networks built the way nnU-Net builds them from a plan (same classes and kwargs)."""
from __future__ import annotations

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_adpfl.training.dp_trainer import make_dp_safe


def arch_kwargs(dim: int, n_stages: int = 3, features=(4, 8, 16), residual: bool = False) -> tuple[str, dict, list]:
    conv = f"torch.nn.modules.conv.Conv{dim}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    kwargs = {
        "n_stages": n_stages,
        "features_per_stage": list(features[:n_stages]),
        "conv_op": conv,
        "kernel_sizes": [[3] * dim] * n_stages,
        "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": norm,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if residual:
        kwargs["n_blocks_per_stage"] = [1] + [2] * (n_stages - 1)
        cls = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    else:
        kwargs["n_conv_per_stage"] = [2] * n_stages
        cls = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    return cls, kwargs, ["conv_op", "norm_op", "dropout_op", "nonlin"]


def build(dim: int, in_ch: int = 1, out_ch: int = 3, residual: bool = False, deep_supervision: bool = True,
          dp_safe: bool = True, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls, kwargs, req = arch_kwargs(dim, residual=residual)
    net = get_network_from_plans(cls, kwargs, req, in_ch, out_ch, allow_init=True, deep_supervision=deep_supervision)
    return make_dp_safe(net) if dp_safe else net


def ds_targets(outputs, num_classes: int, seed: int = 0, regions: bool = False):
    g = torch.Generator().manual_seed(seed)
    outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    if regions:
        ts = [(torch.rand(o.shape, generator=g) > 0.5).float() for o in outs]
    else:
        ts = [torch.randint(0, num_classes, (o.shape[0], 1, *o.shape[2:]), generator=g).float() for o in outs]
    return ts if isinstance(outputs, (list, tuple)) else ts[0]
