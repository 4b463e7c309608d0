"""Per-case clipping rules (DESIGN.md section 2).

A rule maps per-case gradient norms n_i to scale factors s_i with ||s_i * g_i|| = s_i * n_i <= C for
every n_i >= 0, so one Gaussian noise N(0, (sigma * C)^2) fits all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def flat_scale(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """DP-SGD (Abadi et al.): s = min(1, C / n); s = 1 for n = 0."""
    return torch.clamp(clip / norms.clamp_min(torch.finfo(norms.dtype).tiny), max=1.0)


def autos_scale(norms: torch.Tensor, clip: float, gamma: float) -> torch.Tensor:
    """Automatic clipping (Bu et al.): s = C / (n + gamma)."""
    return clip / (norms + gamma)


def nsgd_scale(norms: torch.Tensor, clip: float, r: float) -> torch.Tensor:
    """Normalised SGD (Yang et al.): s = C / (n + r)."""
    return clip / (norms + r)


def psac_scale(norms: torch.Tensor, clip: float, r: float) -> torch.Tensor:
    """Per-sample adaptive clipping (Xia et al.): s = C / (n + r / (n + r))."""
    return clip / (norms + r / (norms + r))


@dataclass(frozen=True)
class ClippingRule:
    """A clipping rule with its hyperparameters; ``scales(norms, C)`` gives the factors s_i."""
    name: str
    params: dict = field(default_factory=dict)

    def scales(self, norms: torch.Tensor, clip: float) -> torch.Tensor:
        return _RULES[self.name](norms, clip, **self.params)

    def describe(self) -> dict:
        return {"rule": self.name, **self.params}


_RULES = {"flat": flat_scale, "autos": autos_scale, "nsgd": nsgd_scale, "psac": psac_scale}
RULE_NAMES = tuple(_RULES)


def make_rule(name: str, settings: dict) -> ClippingRule:
    """Build a rule from the settings file's ``gamma`` / ``r`` (rule defaults where unset)."""
    if name == "flat":
        return ClippingRule("flat")
    if name == "autos":
        return ClippingRule("autos", {"gamma": settings.get("gamma") or 0.01})
    if name == "nsgd":
        return ClippingRule("nsgd", {"r": settings.get("r") or 0.01})
    if name == "psac":
        return ClippingRule("psac", {"r": settings.get("r") or 0.1})
    raise ValueError(f"unknown clipping rule {name!r}; known: {RULE_NAMES}")
