"""The private gradient (DESIGN.md section 1):

    g_bar = ( sum_i s_i * g_i + N(0, (sigma * C)^2 I) ) / B_expected

with s_i from a clipping rule (||s_i g_i|| <= C) and B_expected = q * N, a data-independent denominator
(dividing by the realised Poisson batch size would leak it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .clipping import ClippingRule
from .per_case_grads import PerCaseGradients, Target


def per_case_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """Flat L2 norm over all parameters, one per case; grads[k] has shape (m, ...)."""
    return torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads))


@dataclass
class ClippedSum:
    clipped: list[torch.Tensor]        # sum_i s_i g_i
    raw: list[torch.Tensor] | None     # sum_i g_i (alignment diagnostics only)
    norms: torch.Tensor                # per-case norms: stay inside the step, never logged
    losses: torch.Tensor
    batch_size: int


def clipped_sum(engine: PerCaseGradients, rule: ClippingRule, clip: float, data: torch.Tensor | None,
                target: Target | None, keep_raw: bool = False) -> ClippedSum:
    """Sum of clipped per-case gradients, computed chunk by chunk (memory bounded by the chunk size)."""
    clipped = [torch.zeros_like(p) for p in engine.params]
    raw = [torch.zeros_like(p) for p in engine.params] if keep_raw else None
    norms, losses = [], []
    if data is not None and data.shape[0] > 0:
        for grads, loss in engine.chunks(data, target):
            n = per_case_norms(grads)
            s = rule.scales(n, clip)
            for acc, g in zip(clipped, grads):
                acc.add_(torch.tensordot(s.to(g.dtype), g, dims=1))
            if keep_raw:
                for acc, g in zip(raw, grads):
                    acc.add_(g.sum(0))
            norms.append(n.detach())
            losses.append(loss)
    empty = torch.zeros(0, device=clipped[0].device if clipped else "cpu")
    all_norms = torch.cat(norms) if norms else empty
    return ClippedSum(clipped, raw, all_norms, torch.cat(losses) if losses else empty, len(all_norms))


def make_noise_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """Noise generator seeded from the OS unless a (test-only) seed is given."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return gen


def add_noise(sums: list[torch.Tensor], noise_std: float, expected_batch_size: float,
              generator: torch.Generator) -> list[torch.Tensor]:
    """(sum + N(0, noise_std^2)) / expected_batch_size, elementwise; noise_std = sigma * C."""
    out = []
    for s in sums:
        noise = torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype)
        out.append((s + noise_std * noise) / expected_batch_size)
    return out


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    dot = sum((x * y).sum() for x, y in zip(a, b))
    na = torch.sqrt(sum(x.pow(2).sum() for x in a))
    nb = torch.sqrt(sum(y.pow(2).sum() for y in b))
    denom = na * nb
    return float(dot / denom) if denom > 0 else float("nan")
