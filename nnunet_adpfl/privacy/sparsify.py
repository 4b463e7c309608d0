"""Sparsification for ADP-FL (DESIGN.md sections 1, 3 and 4).

Two different things, with different privacy status:

(a) **Private-step sparsification** (changes what the DP step computes, so it must be chosen from public
    information only). ``step_mask`` picks k = round(density * d) of the d trainable coordinates from
    (params' *shapes*, density, method, round index, seed, previous released global update) -- never from the
    current raw gradient, which would be a data-dependent selection outside the account. The step becomes

        g_bar = m * ( sum_i s_i * (m * g_i) + N(0, (sigma C)^2 I_d) ) / B_expected

    * ``mask_grads`` masks every per-case gradient BEFORE its norm is taken, so s_i is computed from
      ||m * g_i|| and ||s_i * (m * g_i)|| <= C holds for the masked vector (``MaskedPerCaseGradients`` wraps an
      engine so ``noisy_step.clipped_sum`` does this unchanged).
    * ``mask_noise_sum`` (or ``masked_add_noise``) multiplies the noisy step by the mask. Why this is "noise on
      k coordinates": the clipped sum S is already zero outside m, so m * (S + sigma C Z) = S + sigma C (m * Z).
      The coordinates of m * Z inside the mask are i.i.d. N(0, 1) -- exactly what drawing k normals and
      scattering them would give -- and the other d - k coordinates are the constant 0, which carries no
      information. The released vector is therefore the Gaussian mechanism on the k masked coordinates of a sum
      with per-case L2 sensitivity C and noise std sigma C: the same accountant step (same sigma, same q) as the
      dense step, with total noise norm ~ sigma C sqrt(k) instead of sigma C sqrt(d).
    * Multiplying by the public mask is post-processing, so it costs nothing. The optimizer (momentum, weight
      decay) may still move unmasked weights from earlier rounds' released gradients: also post-processing.

(b) **Upload sparsification** of the already-noised local update: free post-processing (section 1).
    ``topk_encode`` keeps the global top-k by magnitude (over all tensors) as ``N::idx`` (int64 flat indices,
    ascending) + ``N::val`` (values in the tensor's dtype); ``topk_decode`` is the aggregator's checked inverse
    (it runs on untrusted input: every malformed encoding raises ``ValueError``); ``ErrorFeedback`` keeps the
    unsent residual locally and adds it to the next round's update before top-k. The residual is computed from
    noised updates only, so keeping and later sending it is post-processing too.
    Size: 12 bytes per kept float32 coordinate (8 index + 4 value) against 4 per dense coordinate, so the upload
    shrinks by ~ 1 / (3 * density) for float32 (1 / (2 * density) for float64); for density > 1/3 (float32)
    the sparse encoding is larger than the dense tensor.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator

import torch

from ..common.tensors import tensors_to_bytes
from .noisy_step import add_noise

STEP_MASK_METHODS = ("topk_prev_global", "random")
IDX_SUFFIX, VAL_SUFFIX = "::idx", "::val"


# ---- helpers -----------------------------------------------------------------------------------------
def _check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not math.isfinite(density) \
            or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def _magnitude_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _public_generator(seed: int, round_index: int) -> torch.Generator:
    """CPU generator seeded from (seed, round): the same on every site and for every step of a round."""
    digest = hashlib.sha256(f"nnunet-adpfl/step-mask/{int(seed)}/{int(round_index)}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def released_global_update(global_r1: dict[str, torch.Tensor], global_r2: dict[str, torch.Tensor]) \
        -> dict[str, torch.Tensor]:
    """global_{r-1} - global_{r-2}: the previous released global update (both models are public)."""
    if set(global_r1) != set(global_r2):
        raise ValueError("the two global models have different tensor names")
    return {k: (global_r1[k].detach() - global_r2[k].detach().to(global_r1[k].device)) for k in global_r1}


# ---- (a) private-step sparsification -----------------------------------------------------------------
def step_mask(params_like: dict[str, torch.Tensor], density: float, method: str, round_index: int, seed: int,
              previous_global_update: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Boolean masks (same names/shapes/devices as ``params_like``) selecting k = max(1, round(density * d))
    coordinates in total over all tensors (Python's ``round``; d = total number of elements).

    * ``random``: a uniformly random k-subset from a generator seeded by (seed, round_index).
    * ``topk_prev_global``: the k largest |previous_global_update| entries, global over all tensors; ties
      (e.g. the zeros of a sparse previous update) are broken by the same seeded random order, so an all-zero
      or missing previous update (the first rounds) gives exactly the ``random`` mask.

    Deterministic in its inputs (computed on CPU); reads only the *shapes* of ``params_like`` and takes no
    private data -- in particular no gradient or batch.
    """
    density = _check_density(density)
    if method not in STEP_MASK_METHODS:
        raise ValueError(f"unknown step-mask method {method!r}; known: {STEP_MASK_METHODS}")
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"round_index must be a non-negative int, got {round_index!r}")
    names = sorted(params_like)  # layout independent of the dict's order
    sizes = [params_like[n].numel() for n in names]
    d = sum(sizes)
    if d == 0:
        raise ValueError("step_mask: no coordinates to select from")
    k = max(1, round(density * d))
    flat = torch.zeros(d, dtype=torch.bool)
    if k >= d:
        flat[:] = True
    else:
        perm = torch.randperm(d, generator=_public_generator(seed, round_index))
        if method == "topk_prev_global" and previous_global_update is not None:
            prev = previous_global_update
            if set(prev) != set(params_like):
                missing, extra = sorted(set(params_like) - set(prev)), sorted(set(prev) - set(params_like))
                raise ValueError(f"previous_global_update names differ: missing {missing[:5]}, extra {extra[:5]}")
            for n in names:
                if tuple(prev[n].shape) != tuple(params_like[n].shape):
                    raise ValueError(f"previous_global_update[{n!r}] has shape {tuple(prev[n].shape)}, "
                                     f"expected {tuple(params_like[n].shape)}")
            mdt = _magnitude_dtype([prev[n] for n in names])
            mags = torch.cat([prev[n].detach().reshape(-1).to("cpu", mdt).abs() for n in names])
            if not torch.isfinite(mags).all():
                raise ValueError("previous_global_update has NaN/Inf entries")
            # largest magnitudes first; among equal magnitudes, the seeded random order decides
            order = torch.sort(mags[perm], descending=True, stable=True).indices[:k]
            chosen = perm[order]
        else:
            chosen = perm[:k]
        flat[chosen] = True
    by_name, offset = {}, 0
    for n, size in zip(names, sizes):
        by_name[n] = flat[offset:offset + size].reshape(params_like[n].shape)
        offset += size
    return {n: by_name[n].to(p.device) for n, p in params_like.items()}  # the caller's order and devices


def mask_grads(grads: list[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-case gradients (leading case dimension) restricted to the masked coordinates, exact zeros elsewhere.
    Apply BEFORE ``per_case_norms`` / clipping so the clip bound holds on the masked vector."""
    if len(grads) != len(masks):
        raise ValueError(f"{len(grads)} gradient tensors but {len(masks)} masks")
    out = []
    for g, m in zip(grads, masks):
        if tuple(g.shape[1:]) != tuple(m.shape):
            raise ValueError(f"gradient shape {tuple(g.shape)} does not match mask shape {tuple(m.shape)}")
        m = m.to(device=g.device, dtype=torch.bool)
        out.append(torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device)))
    return out


class MaskedPerCaseGradients:
    """Wraps a ``PerCaseGradients`` engine so every chunk's per-case gradients are masked before anything else
    sees them: ``noisy_step.clipped_sum(MaskedPerCaseGradients(engine, masks), rule, C, x, y)`` then clips the
    masked vectors (and its ``raw`` alignment sums are the masked raw sums). ``masks`` is a dict keyed by the
    engine's parameter names or a list in ``engine.params`` order."""

    def __init__(self, engine, masks: dict[str, torch.Tensor] | list[torch.Tensor]):
        self.engine = engine
        self.params = engine.params
        if isinstance(masks, dict):
            names = list(getattr(engine, "names"))
            if set(masks) != set(names):
                raise ValueError("mask names do not match the engine's parameter names")
            masks = [masks[n] for n in names]
        if len(masks) != len(self.params):
            raise ValueError(f"{len(masks)} masks for {len(self.params)} parameter tensors")
        for p, m in zip(self.params, masks):
            if tuple(p.shape) != tuple(m.shape):
                raise ValueError(f"mask shape {tuple(m.shape)} does not match parameter shape {tuple(p.shape)}")
        self.masks = [m.to(device=p.device, dtype=torch.bool) for p, m in zip(self.params, masks)]

    def chunks(self, data, target) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        for grads, losses in self.engine.chunks(data, target):
            yield mask_grads(grads, self.masks), losses


def mask_noise_sum(noisy: list[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero a noisy step (or noisy sum) outside the masks, so the released noise lies on the k masked
    coordinates only (see the module docstring for why this equals drawing noise on k coordinates)."""
    if len(noisy) != len(masks):
        raise ValueError(f"{len(noisy)} tensors but {len(masks)} masks")
    out = []
    for t, m in zip(noisy, masks):
        if tuple(t.shape) != tuple(m.shape):
            raise ValueError(f"tensor shape {tuple(t.shape)} does not match mask shape {tuple(m.shape)}")
        out.append(torch.where(m.to(device=t.device, dtype=torch.bool), t,
                               torch.zeros((), dtype=t.dtype, device=t.device)))
    return out


def masked_add_noise(sums: list[torch.Tensor], masks: list[torch.Tensor], noise_std: float,
                     expected_batch_size: float, generator: torch.Generator) -> list[torch.Tensor]:
    """``noisy_step.add_noise`` followed by ``mask_noise_sum``: (sum + N(0, noise_std^2)) / B on the masked
    coordinates, exactly 0 elsewhere. ``sums`` must come from masked per-case gradients."""
    return mask_noise_sum(add_noise(sums, noise_std, expected_batch_size, generator), masks)


# ---- (b) upload sparsification (post-processing of the noised update) ---------------------------------
def topk_encode(update: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """safetensors-ready dict: for each tensor name N, ``N::idx`` (int64 flat indices into N, ascending) and
    ``N::val`` (the values there, N's dtype); the k = max(1, round(density * d)) largest-magnitude entries over
    all tensors together (a tensor with none kept gets empty idx/val). Tensors stay on their device."""
    density = _check_density(density)
    if not update:
        raise ValueError("topk_encode: empty update")
    for n, v in update.items():
        if IDX_SUFFIX in n or VAL_SUFFIX in n:
            raise ValueError(f"tensor name {n!r} contains a reserved suffix")
        if not v.is_floating_point():
            raise ValueError(f"tensor {n!r} is not floating point ({v.dtype})")
    names = list(update)
    device = update[names[0]].device
    mdt = _magnitude_dtype(update.values())
    mags = torch.cat([update[n].detach().reshape(-1).to(device, mdt).abs() for n in names])
    if not torch.isfinite(mags).all():
        raise ValueError("topk_encode: the update has NaN/Inf entries")
    d = mags.numel()
    if d == 0:
        raise ValueError("topk_encode: no coordinates")
    k = min(d, max(1, round(density * d)))
    selected = torch.zeros(d, dtype=torch.bool, device=device)
    selected[torch.topk(mags, k, sorted=False).indices] = True
    out, offset = {}, 0
    for n in names:
        v = update[n].detach()
        size = v.numel()
        idx = torch.nonzero(selected[offset:offset + size], as_tuple=False).reshape(-1).to(v.device, torch.int64)
        out[n + IDX_SUFFIX] = idx
        out[n + VAL_SUFFIX] = v.reshape(-1)[idx].contiguous()
        offset += size
    return out


def _parse_dtype(s) -> torch.dtype:
    if isinstance(s, torch.dtype):
        return s
    if isinstance(s, str):
        dt = getattr(torch, s.removeprefix("torch."), None)
        if isinstance(dt, torch.dtype):
            return dt
    raise ValueError(f"not a torch dtype: {s!r}")


def topk_decode(encoded: dict[str, torch.Tensor], spec: dict[str, tuple], max_total: int | None = None) \
        -> dict[str, torch.Tensor]:
    """Dense tensors (zeros where nothing was sent) from a ``topk_encode`` encoding, checked against
    ``spec = {name: (shape, dtype_str)}`` (as ``fed_files.tensor_spec`` writes it). Runs on untrusted input:
    raises ValueError on unknown or malformed keys, a missing idx/val, non-1-D or non-int64 indices,
    out-of-range, duplicate or unsorted indices, idx/val length mismatch, a value dtype other than the spec's, NaN/Inf
    values, or (when ``max_total`` is given) more than ``max_total`` coordinates in total."""
    if not isinstance(encoded, dict):
        raise ValueError("encoding is not a dict of tensors")
    parsed: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in encoded.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"bad entry {key!r} in the encoding")
        if key.endswith(IDX_SUFFIX):
            name, part = key[:-len(IDX_SUFFIX)], "idx"
        elif key.endswith(VAL_SUFFIX):
            name, part = key[:-len(VAL_SUFFIX)], "val"
        else:
            raise ValueError(f"unknown key {key!r} (expected NAME::idx or NAME::val)")
        if name not in spec:
            raise ValueError(f"unknown tensor name {name!r} in the encoding")
        parsed.setdefault(name, {})[part] = t
    missing = sorted(n for n in spec if set(parsed.get(n, {})) != {"idx", "val"})
    if missing:
        raise ValueError(f"missing idx/val for {missing[:5]} ({len(missing)} tensors)")
    total = sum(parsed[n]["idx"].numel() for n in spec)
    if max_total is not None and total > max_total:
        raise ValueError(f"{total} coordinates sent, at most {max_total} allowed")
    out = {}
    for name, (shape, dtype_str) in spec.items():
        shape, dtype = tuple(int(s) for s in shape), _parse_dtype(dtype_str)
        idx, val = parsed[name]["idx"], parsed[name]["val"]
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise ValueError(f"{name}{IDX_SUFFIX}: indices must be a 1-D int64 tensor, got {idx.dtype} "
                             f"{tuple(idx.shape)}")
        if val.dim() != 1:
            raise ValueError(f"{name}{VAL_SUFFIX}: values must be 1-D, got shape {tuple(val.shape)}")
        if val.dtype != dtype:
            raise ValueError(f"{name}{VAL_SUFFIX}: dtype {val.dtype}, expected {dtype}")
        if idx.numel() != val.numel():
            raise ValueError(f"{name}: {idx.numel()} indices but {val.numel()} values")
        numel = math.prod(shape)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= numel:
                raise ValueError(f"{name}{IDX_SUFFIX}: index out of range [0, {numel}) (min {lo}, max {hi})")
            if not bool((idx[1:] > idx[:-1]).all()):  # O(n); topk_encode writes them ascending
                raise ValueError(f"{name}{IDX_SUFFIX}: indices must be strictly increasing (duplicates or unsorted)")
            if val.is_floating_point() and not torch.isfinite(val).all():
                raise ValueError(f"{name}{VAL_SUFFIX}: NaN/Inf values")
        dense = torch.zeros(numel, dtype=dtype, device=val.device)
        dense[idx.to(val.device)] = val
        out[name] = dense.reshape(shape)
    return out


def encoded_nbytes(encoded: dict[str, torch.Tensor]) -> int:
    """Bytes of the safetensors serialisation of a tensor dict (encoded or dense)."""
    return len(tensors_to_bytes(encoded))


def _spec_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}


class ErrorFeedback:
    """Top-k upload compression with error feedback: the part of (update + carried residual) that was not sent
    is kept and added to the next round's update. Invariant: dense_sent + new residual == update + old residual
    (exactly: the residual is the accumulated vector with the sent coordinates zeroed)."""

    def __init__(self):
        self.residual: dict[str, torch.Tensor] | None = None

    def compress(self, update: dict[str, torch.Tensor], density: float) -> tuple[dict, dict]:
        """(encoded, dense_sent): adds the carried residual, top-k encodes, keeps the new residual."""
        if self.residual is None:
            acc = {k: v.detach().clone() for k, v in update.items()}
        else:
            if set(self.residual) != set(update):
                raise ValueError("update tensor names differ from the carried residual's")
            for k, v in update.items():
                if self.residual[k].shape != v.shape:
                    raise ValueError(f"{k}: update shape {tuple(v.shape)} differs from the residual's "
                                     f"{tuple(self.residual[k].shape)}")
            acc = {k: v.detach() + self.residual[k].to(v.device, v.dtype) for k, v in update.items()}
        encoded = topk_encode(acc, density)
        sent = topk_decode(encoded, _spec_of(acc))
        sent = {k: sent[k].to(acc[k].device) for k in acc}
        self.residual = {k: acc[k] - sent[k] for k in acc}
        return encoded, sent

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The residual tensors by name (empty before the first round); safetensors-ready."""
        return {} if self.residual is None else {k: v.detach().clone() for k, v in self.residual.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residual = {k: v.detach().clone() for k, v in state.items()} if state else None
