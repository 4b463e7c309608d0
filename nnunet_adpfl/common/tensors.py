"""A model's state as a flat dict of tensors, and its safetensors bytes (the one serialisation the project uses)."""
from __future__ import annotations

import torch
from safetensors.torch import save as st_save


def unique_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state with every tensor once: nnU-Net registers shared modules under several names
    (``conv`` / ``all_modules.0``, ``encoder`` / ``decoder.encoder``); only the first name of each is kept, so
    an update or a sparse encoding never treats two names of one tensor differently."""
    seen, out = set(), {}
    for name, value in module.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            out[name] = value.detach()
    return out


def load_unique_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load a ``unique_state`` dict; every key it lacks must be another name of a loaded tensor."""
    expected = unique_state(module)
    if set(tensors) != set(expected):
        raise ValueError(f"state keys differ from the model's: missing {sorted(set(expected) - set(tensors))[:3]}, "
                         f"unexpected {sorted(set(tensors) - set(expected))[:3]}")
    module.load_state_dict(tensors, strict=False)


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
