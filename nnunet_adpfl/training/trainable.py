"""Which parameters the private step trains (setting ``dp_trainable``), decided before training from the
architecture alone (public). Fewer trainable coordinates d means less total noise: its norm grows as sqrt(d)
while each case's clipped signal stays <= C. Frozen parameters get no gradient, no noise and are not uploaded.

Names are those of ``module.named_parameters()`` (each shared tensor once, under its first name; nnU-Net's
decoder holds the encoder again as ``decoder.encoder``, which therefore never appears).
"""
from __future__ import annotations

from torch import nn

from ..common.config import SettingsError

CHOICES = ("all", "decoder", "norm_bias", "head")
_NORMS = (nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Affine parameters of normalisation layers."""
    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, _NORMS):
            names |= {f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False)}
    return names


def select_trainable(model: nn.Module, choice: str) -> set[str]:
    """Parameter names trained under ``choice``: all; decoder (encoder frozen); norm_bias (normalisation affine
    parameters and every bias); head (the segmentation layers)."""
    names = [n for n, _ in model.named_parameters()]
    if choice == "all":
        chosen = set(names)
    elif choice == "decoder":
        chosen = {n for n in names if n.startswith("decoder.")}
    elif choice == "norm_bias":
        norms = norm_parameter_names(model)
        chosen = {n for n in names if n in norms or n.endswith(".bias")}
    elif choice == "head":
        chosen = {n for n in names if ".seg_layers." in n or n.startswith("seg_layers.")}
    else:
        raise SettingsError(f"dp_trainable must be one of {CHOICES}, got {choice!r}")
    if not chosen:
        raise SettingsError(f"dp_trainable={choice!r} selects no parameter of {type(model).__name__}")
    return chosen


def make_dp_safe(network: nn.Module) -> nn.Module:
    """Turn off in-place activations (they break per-case gradient hooks) and refuse batch statistics."""
    for name, module in network.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise SettingsError(f"module {name!r} is {type(module).__name__}: batch statistics couple the cases of "
                                "a batch and break per-case privacy; use a plan with InstanceNorm")
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            raise SettingsError(f"module {name!r} is {type(module).__name__} with track_running_stats=True: its "
                                "running statistics are unnoised averages over the training cases and would ship "
                                "in every checkpoint; use track_running_stats=False (nnU-Net's default)")
        if getattr(module, "inplace", False):
            module.inplace = False
    return network


def count_parameters(params) -> int:
    return sum(p.numel() for p in params)
