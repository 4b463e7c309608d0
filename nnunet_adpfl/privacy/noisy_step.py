"""The private gradient (DESIGN.md section 1):

    g_bar = ( sum_i s_i * g_i + N(0, (sigma * C)^2 I) ) / B_expected

with s_i from a clipping rule (||s_i g_i|| <= C) and B_expected = q * N, a data-independent denominator
(dividing by the realised Poisson batch size would leak it).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from .clipping import ClippingRule
from .grad_sample import per_case_sq_norms
from .per_case_grads import PerCaseGradients, Target


def per_case_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """Flat L2 norm over all parameters, one per case; grads[k] has shape (m, ...)."""
    return torch.sqrt(sum(per_case_sq_norms(g) for g in grads))


@dataclass
class ClippedSum:
    clipped: list[torch.Tensor]        # sum_i s_i g_i
    raw: list[torch.Tensor] | None     # sum_i g_i (alignment diagnostics only)
    norms: torch.Tensor                # per-case norms (inf for a non-finite case): stay inside the step, never logged
    losses: torch.Tensor
    batch_size: int
    non_finite: int = 0                # cases whose gradient was not finite (they contributed zero)


def drop_non_finite(grads: list[torch.Tensor], norms: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Zero the gradient of every case whose norm is not finite (an inf or NaN entry, or a norm that overflows)
    and set its norm to inf: such a case then contributes exactly zero under every rule, and counts as clipped.
    Without this, scale 0 x inf = NaN (or a NaN scale) would turn the whole step's sum into NaN."""
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return grads, norms
    safe = [torch.where(finite.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros((), dtype=g.dtype, device=g.device))
            for g in grads]
    return safe, torch.where(finite, norms, torch.full_like(norms, torch.inf))


def clipped_sum(engine: PerCaseGradients, rule: ClippingRule, clip: float, data: torch.Tensor | None,
                target: Target | None, keep_raw: bool = False) -> ClippedSum:
    """Sum of clipped per-case gradients, computed chunk by chunk (memory bounded by the chunk size); the 'ghost'
    engine clips with book-keeping (``PerCaseGradients.clipped_chunks``) unless the raw sum is wanted."""
    clipped = [torch.zeros_like(p) for p in engine.params]
    raw = [torch.zeros_like(p) for p in engine.params] if keep_raw else None
    norms, losses = [], []
    if data is not None and data.shape[0] > 0 and getattr(engine, "book_keeping", False) and not keep_raw:
        for part, n, loss in engine.clipped_chunks(data, target, lambda n: rule.scales(n, clip)):
            for acc, g in zip(clipped, part):
                acc.add_(g)
            norms.append(n.detach())
            losses.append(loss)
    elif data is not None and data.shape[0] > 0:
        for grads, loss in engine.chunks(data, target):
            grads, n = drop_non_finite(grads, per_case_norms(grads))
            s = torch.where(torch.isfinite(n), rule.scales(n, clip), torch.zeros_like(n))
            for acc, g in zip(clipped, grads):
                acc.add_(torch.tensordot(s.to(g.dtype), g, dims=1))
            if keep_raw:
                for acc, g in zip(raw, grads):
                    acc.add_(g.sum(0))
            norms.append(n.detach())
            losses.append(loss)
    empty = torch.zeros(0, device=clipped[0].device if clipped else "cpu")
    all_norms = torch.cat(norms) if norms else empty
    non_finite = int((~torch.isfinite(all_norms)).sum())
    if non_finite:  # a count only, never which case
        warnings.warn(f"{non_finite} case(s) of this step had a non-finite gradient: each contributes zero to the "
                      "step (counted as clipped)", RuntimeWarning, stacklevel=2)
    return ClippedSum(clipped, raw, all_norms, torch.cat(losses) if losses else empty, len(all_norms), non_finite)


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
        out.append(noise.mul_(noise_std).add_(s).div_(expected_batch_size))  # (s + std * noise) / B, in place
    return out


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    dot = sum((x * y).sum() for x, y in zip(a, b))
    na = torch.sqrt(sum(x.pow(2).sum() for x in a))
    nb = torch.sqrt(sum(y.pow(2).sum() for y in b))
    denom = na * nb
    return float(dot / denom) if denom > 0 else float("nan")
