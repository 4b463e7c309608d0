"""Per-case gradients from one batched forward/backward (the ``hooks`` engine).

Forward hooks record each parameterised layer's input a and put a hook on the autograd node of its output; one
``autograd.grad`` of the summed per-case losses with respect to the input (data gradients only: the batched weight
gradients are never computed) passes every layer's output gradient g to that hook. Each case's parameter gradient
is then a function of that case's (a, g):
- ConvNd: the weight-gradient convolution with the batch folded into the groups (one call for all cases); a
  pointwise (1x1) conv: a batched matrix product;
- ConvTransposeNd: the same, with the roles of a and g exchanged (a transposed conv is the adjoint of a conv);
- InstanceNormNd (affine): sum over space of x_hat * g and of g, x_hat normalised per case and channel.
A module called several times in one forward gets the sum of its calls' contributions (nnU-Net registers a conv
twice, as ``conv`` and inside ``all_modules``; it still runs once, and hooks are attached once per module object).
Nothing couples cases: the losses are per case and InstanceNorm normalises each case on its own, so d(sum of
losses)/d(output of case i) = d(loss_i)/d(output of case i).

Book-keeping (the ``ghost`` engine, ``HookedGradSample.clipped``; Bu et al., fastDP): a conv weight whose ghost norm
costs less than its per-case gradient (T (D + p) < D p: T output positions of a case, D = c_in x kernel volume,
p = c_out; ``ghost_is_cheaper``) never gets per-case gradients. Its per-case squared norm is the ghost norm
||G_i A_i^T||^2 = <A_i^T A_i, G_i^T G_i> (A_i the case's unfolded input D x T, G_i its output gradient p x T), and
after clipping its share of the clipped sum is one batched weight gradient with each case's output gradient scaled
by that case's clipping factor. Every other parameter gets explicit per-case gradients as above.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """(b, c, ...) -> (1, b * c, ...): the batch folded into the channels (one group per case)."""
    return t.reshape(1, t.shape[0] * t.shape[1], *t.shape[2:])


def _conv_weight_per_case(inp: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, module) -> torch.Tensor:
    """Per-case d/dW of a convolution with input ``inp`` (b, c_in, ...) and output gradient ``grad_out``."""
    b, dim = inp.shape[0], inp.ndim - 2
    size = (b * weight.shape[0], *weight.shape[1:])
    w = _CONV_WEIGHT[dim](_grouped(inp), size, _grouped(grad_out), module.stride, module.padding, module.dilation,
                          module.groups * b)
    return w.reshape(b, *weight.shape)


def _pointwise(module) -> bool:
    """A 1x1(x1) conv with stride 1, no padding, one group: its per-case weight gradient is a batched matmul."""
    return (module.groups == 1 and all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride)
            and all(p == 0 for p in module.padding))


def _conv(module, a: torch.Tensor, g: torch.Tensor) -> dict:
    if _pointwise(module):  # the grouped weight-gradient convolution is slow on CPU for these
        w = torch.bmm(g.flatten(2), a.flatten(2).transpose(1, 2)).reshape(a.shape[0], *module.weight.shape)
    else:
        w = _conv_weight_per_case(a, g, module.weight, module)
    out = {module.weight: w}
    if module.bias is not None:
        out[module.bias] = g.sum(tuple(range(2, g.ndim)))
    return out


def _conv_transposed(module, a: torch.Tensor, g: torch.Tensor) -> dict:
    # conv_transpose(a, W) is the adjoint of conv(., W): <conv_transpose(a, W), g> = <a, conv(g, W)>
    out = {module.weight: _conv_weight_per_case(g, a, module.weight, module)}
    if module.bias is not None:
        out[module.bias] = g.sum(tuple(range(2, g.ndim)))
    return out


def _instance_norm(module, a: torch.Tensor, g: torch.Tensor, stats=None) -> dict:
    """sum_s x_hat * g = (sum_s a * g - mean * sum_s g) / sqrt(var + eps), per case and channel (x_hat never built).
    ``stats``: (mean, 1 / sqrt(var + eps)) per case and channel as the forward computed them, else computed here."""
    if module.track_running_stats and not module.training:
        raise ValueError("the 'hooks' engine needs InstanceNorm in training mode or without running statistics")
    a, g = a.flatten(2), g.flatten(2)
    if stats is None:
        var, mean = torch.var_mean(a, -1, unbiased=False)
        rstd = torch.rsqrt(var + module.eps)
    else:
        mean, rstd = (t.to(a.dtype) for t in stats)
    g_sum = g.sum(-1)
    a_dot_g = torch.linalg.vecdot(a, g)  # 4-10x faster than the equivalent einsum on CPU
    return {module.weight: (a_dot_g - mean * g_sum) * rstd, module.bias: g_sum}


def _saved_norm_stats(module, node, a: torch.Tensor):
    """The per-case, per-channel mean and 1 / sqrt(var + eps) that an InstanceNorm's forward saved for its backward
    (aten's native batch norm on the (1, b * c, ...) view), or None where the node is another one."""
    if not isinstance(module, _INSTANCE_NORMS) or type(node).__name__ != "NativeBatchNormBackward0" \
            or node._saved_eps != module.eps or not node._saved_training:
        return None
    mean, rstd = node._saved_result1, node._saved_result2
    if mean.shape != (a.shape[0] * a.shape[1],) or rstd.shape != mean.shape:
        return None
    return mean.detach().view(a.shape[0], a.shape[1]), rstd.detach().view(a.shape[0], a.shape[1])


# ---- book-keeping (ghost norm) ---------------------------------------------------------------------------------

def _ghost_shape(module, a: torch.Tensor, g: torch.Tensor) -> tuple[int, int, int] | None:
    """(T, D, p) of a conv / transposed conv weight that the ghost norm can handle, else None."""
    if _rule(module) not in (_conv, _conv_transposed) or module.groups != 1 or any(d != 1 for d in module.dilation):
        return None
    k = math.prod(module.kernel_size)
    if isinstance(module, _CONVS):
        return math.prod(g.shape[2:]), a.shape[1] * k, g.shape[1]
    if isinstance(module, _TRANSPOSED) and tuple(module.kernel_size) == tuple(module.stride) \
            and all(p == 0 for p in module.padding) and all(p == 0 for p in module.output_padding):
        return math.prod(a.shape[2:]), a.shape[1], g.shape[1] * k  # non-overlapping: a pointwise map per position
    return None


def ghost_is_cheaper(module, shape: tuple[int, int, int], multiplicity: int) -> bool:
    """Time rule (fastDP's complexities): the two Gram matrices of a case, its K patches side by side, cost
    (K T)^2 (D + p) against T D p for its gradient, so ghost where K T (D + p) < D p. Never for a transposed conv:
    its explicit per-case gradient (kernel = stride) was faster in every layer measured (docs/BENCHMARKS.md)."""
    t, d, p = shape
    return not isinstance(module, _TRANSPOSED) and multiplicity * t * (d + p) < d * p


def _unfold(module, a: torch.Tensor) -> torch.Tensor:
    """(b, c, ...) -> (b, c x kernel volume, T): the input patches a conv's weight sees at each output position."""
    pads = [p for p in reversed(module.padding) for _ in range(2)]
    x = F.pad(a, pads) if any(pads) else a
    for d, (k, st) in enumerate(zip(module.kernel_size, module.stride)):
        x = x.unfold(2 + d, k, st)
    n = len(module.kernel_size)
    x = x.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    return x.reshape(a.shape[0], a.shape[1] * math.prod(module.kernel_size), -1)


def _space_to_depth(module, g: torch.Tensor) -> torch.Tensor:
    """Output gradient of a transposed conv with kernel = stride: (b, c_out x kernel volume, input positions)."""
    k, n = module.kernel_size, len(module.kernel_size)
    spatial = [s // kk for s, kk in zip(g.shape[2:], k)]
    x = g.reshape(g.shape[0], g.shape[1], *[v for pair in zip(spatial, k) for v in pair])
    x = x.permute(0, 1, *range(3, 3 + 2 * n, 2), *range(2, 2 + 2 * n, 2))
    return x.reshape(g.shape[0], g.shape[1] * math.prod(k), -1)


def _per_case_columns(x: torch.Tensor, multiplicity: int) -> torch.Tensor:
    """(m K, r, T) -> (m, K T, r): a case's K patches side by side along the positions."""
    x = x.reshape(x.shape[0] // multiplicity, multiplicity, x.shape[1], x.shape[2])
    return x.permute(0, 1, 3, 2).reshape(x.shape[0], multiplicity * x.shape[3], x.shape[2])


GHOST_DTYPE = torch.float64  # ghost norms and ghost layers' weight gradients: the norm must bound what is summed


def ghost_sq_norm(module, a: torch.Tensor, g: torch.Tensor, multiplicity: int) -> torch.Tensor:
    """Per-case upper bound on ||d loss_i / d weight||^2 from the layer's input a and output gradient g, without
    the gradient: the Gram product <A^T A, G^T G> in float64 plus a bound on its rounding error. The product can
    cancel (a crafted case's gradient much smaller than its terms), and an underestimate would let the case into
    the sum unclipped; the error is at most gamma_n (sum_t |a_t| |g_t|)^2 over the case's positions t."""
    if isinstance(module, _CONVS):
        cols_a, cols_g = _unfold(module, a), g.flatten(2)
    else:
        cols_a, cols_g = a.flatten(2), _space_to_depth(module, g)
    ca = _per_case_columns(cols_a.to(GHOST_DTYPE), multiplicity)
    cg = _per_case_columns(cols_g.to(GHOST_DTYPE), multiplicity)
    gram_a = torch.bmm(ca, ca.transpose(1, 2))
    gram_g = torch.bmm(cg, cg.transpose(1, 2))
    terms = ca.shape[1] ** 2 + ca.shape[2] + cg.shape[2] + 2  # the products summed, and each Gram entry's length
    unit = torch.finfo(GHOST_DTYPE).eps
    gamma = 1.01 * terms * unit / (1 - terms * unit)
    magnitude = (ca.norm(dim=2) * cg.norm(dim=2)).sum(1) ** 2
    return (gram_a * gram_g).flatten(1).sum(1).clamp_min(0) + gamma * magnitude


def per_case_sq_norms(g: torch.Tensor) -> torch.Tensor:
    """Per-case squared L2 norms of per-case gradients (m, ...), without a squared copy of them."""
    flat = g.reshape(g.shape[0], -1)
    return torch.linalg.vecdot(flat, flat)


def weighted_weight_grad(module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The batched weight gradient of the layer for input a and output gradient g (already scaled per case)."""
    wgrad = _CONV_WEIGHT[a.ndim - 2]
    if isinstance(module, _CONVS):
        return wgrad(a, module.weight.shape, g, module.stride, module.padding, module.dilation, module.groups)
    return wgrad(g, module.weight.shape, a, module.stride, module.padding, module.dilation, module.groups)


def _rule(module) -> Callable | None:
    if isinstance(module, _CONVS) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return _conv
    if isinstance(module, _TRANSPOSED) and module.padding_mode == "zeros":
        return _conv_transposed
    if isinstance(module, _INSTANCE_NORMS) and module.affine:
        return _instance_norm
    return None


def _producer(output: torch.Tensor):
    """The autograd node that computes ``output``'s gradient. A hook on that node, not on the tensor: nnU-Net's
    residual blocks modify a norm's output in place (out += residual), after which a tensor hook never fires. An
    InstanceNorm output is a reshaped view of the batch-norm result; an in-place change of a view replaces the
    view's node, so its base's node is used (same elements, same order)."""
    base = output._base
    if base is None:
        return output.grad_fn
    if base.is_contiguous() and output.is_contiguous() and base.numel() == output.numel() \
            and base.storage_offset() == output.storage_offset():
        return base.grad_fn
    raise ValueError("the 'hooks' engine cannot follow a layer output that is a partial view")


def unsupported_layers(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """Layers owning a trained parameter that the hooks engine has no per-case rule for (empty: supported)."""
    wanted = {id(p) for p in params}
    covered, bad = set(), []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
        if not own:
            continue
        if _rule(module) is None:
            bad.append(f"{name or 'model'} ({type(module).__name__})")
        covered.update(id(p) for p in own)
    if covered != wanted:
        bad.append("parameters outside the model's modules")
    return bad


class HookedGradSample:
    """Per-case gradients of ``per_case_loss`` for ``params`` from one batched pass (``__call__``), or the clipped
    sum with book-keeping (``clipped``); see the module docstring. ``ghost``: which conv weights skip per-case
    gradients in ``clipped``: 'cost' (where ``ghost_is_cheaper``), 'all' (every one the ghost norm handles: tests)
    or 'none'."""

    def __init__(self, model: nn.Module, per_case_loss, params: list[nn.Parameter], ghost: str = "cost"):
        bad = unsupported_layers(model, params)
        if bad:
            raise ValueError("the 'hooks' per-case gradient engine has no rule for: " + ", ".join(bad))
        if ghost not in ("cost", "all", "none"):
            raise ValueError(f"ghost must be 'cost', 'all' or 'none', got {ghost!r}")
        self.model = model
        self.per_case_loss = per_case_loss
        self.params = params
        self.ghost = ghost
        wanted = {id(p) for p in params}
        self.layers = [m for m in dict.fromkeys(model.modules())
                       if any(id(p) in wanted for p in m.parameters(recurse=False))]

    def __call__(self, x: torch.Tensor, y, multiplicity: int, autocast: torch.dtype | None = None):
        """(grads, losses): grads[k] of shape (m, *params[k].shape) in the parameter's dtype, losses (m,).
        Each layer's per-case gradients are computed in the hook as soon as its output gradient exists, so
        output gradients are freed as in a standard backward."""
        sums, _, losses = self._pass(x, y, multiplicity, autocast, ghost_weights=False)
        return self._per_case(sums, x.shape[0], multiplicity), losses

    def clipped(self, x: torch.Tensor, y, multiplicity: int, scales_of, autocast: torch.dtype | None = None):
        """(clipped, norms, losses): clipped[k] = sum_i s_i g_i[k] for params[k] with s = scales_of(norms) for the
        cases whose norm is finite and 0 for the others (their norm is returned as inf); norms and the sum in the
        parameters' dtype."""
        sums, kept, losses = self._pass(x, y, multiplicity, autocast, ghost_weights=True)
        grads = self._per_case(sums, x.shape[0], multiplicity, only_present=True)
        sq = sum((per_case_sq_norms(g).to(GHOST_DTYPE) for g in grads.values()),
                 torch.zeros(x.shape[0] // multiplicity, dtype=GHOST_DTYPE, device=x.device))
        for module, calls in kept.items():
            for a, g in calls:
                sq = sq + ghost_sq_norm(module, a, g, multiplicity)
        norms = torch.sqrt(sq)  # float64: an upper bound where ghost norms enter
        finite = torch.isfinite(norms)
        scales = torch.where(finite, scales_of(torch.where(finite, norms, torch.zeros_like(norms))),
                             torch.zeros_like(norms))
        all_finite = bool(finite.all())  # else a non-finite case's NaN * 0 would still reach the sum
        out = {}
        for pid, g in grads.items():
            if not all_finite:
                g = torch.where(finite.view(-1, *([1] * (g.dim() - 1))), g, g.new_zeros(()))
            out[pid] = torch.tensordot(scales.to(g.dtype), g, dims=1)
        patch_scale = scales.repeat_interleave(multiplicity)
        patch_finite = finite.repeat_interleave(multiplicity)
        for module, calls in kept.items():
            for a, g in calls:
                shape = (-1, *([1] * (a.dim() - 1)))
                a, g = a.to(GHOST_DTYPE), g.to(GHOST_DTYPE) * patch_scale.view(shape)
                if not all_finite:
                    a = torch.where(patch_finite.view(shape), a, a.new_zeros(()))
                    g = torch.where(patch_finite.view(shape), g, g.new_zeros(()))
                w = weighted_weight_grad(module, a, g).to(module.weight.dtype)
                out[id(module.weight)] = out[id(module.weight)] + w if id(module.weight) in out else w
        clipped = [out[id(p)] if id(p) in out else torch.zeros_like(p) for p in self.params]
        norms = torch.where(finite, norms, torch.full_like(norms, torch.inf)).to(self.params[0].dtype)
        return clipped, norms, losses

    def _per_case(self, sums: dict, n: int, multiplicity: int, only_present: bool = False):
        """Per-patch sums -> per-case gradients (the K patches of a case added): a list in params order, or with
        ``only_present`` a dict id(param) -> gradient of the params that have explicit per-case gradients."""
        m = n // multiplicity
        if only_present:
            return {id(p): sums[id(p)].reshape(m, multiplicity, *p.shape).sum(1) for p in self.params
                    if id(p) in sums}
        grads = []
        for p in self.params:
            g = sums.get(id(p))
            g = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
            grads.append(g.reshape(m, multiplicity, *p.shape).sum(1))
        return grads

    def _pass(self, x: torch.Tensor, y, multiplicity: int, autocast: torch.dtype | None, ghost_weights: bool):
        """One batched forward and data-only backward. Returns (sums: id(param) -> per-patch gradients,
        kept: module -> [(a, g)] of the conv weights left to book-keeping, per-case losses)."""
        sums: dict[int, torch.Tensor] = {}
        kept: dict[nn.Module, list] = {}
        calls: list[list] = []
        counts: dict[nn.Module, int] = {}

        def add(per_case: dict):
            for p, value in per_case.items():
                sums[id(p)] = sums[id(p)] + value if id(p) in sums else value

        def on_grad(module, a, g, stats):
            dtype = module.weight.dtype
            with torch.no_grad():
                shape = _ghost_shape(module, a, g) if ghost_weights and self.ghost != "none" else None
                if shape is not None and (self.ghost == "all" or ghost_is_cheaper(module, shape, multiplicity)):
                    kept.setdefault(module, []).append((a.to(dtype), g.to(dtype)))
                    if module.bias is not None:
                        add({module.bias: g.to(dtype).sum(tuple(range(2, g.ndim)))})
                else:
                    rule = _rule(module)
                    extra = {"stats": stats} if rule is _instance_norm else {}
                    add(rule(module, a.to(dtype), g.to(dtype), **extra))

        def record(module, inputs, output):
            a, node, fired, shape = inputs[0].detach(), _producer(output), [], output.shape
            stats = _saved_norm_stats(module, node, a)
            calls.append(fired)
            counts[module] = counts.get(module, 0) + 1

            def hook(grad_outputs):  # holds no tensor with a grad_fn: output -> node -> hook -> output would be a
                fired.append(True)   # cycle through autograd that Python's GC never frees (a leak every step)
                on_grad(module, a, grad_outputs[0].reshape(shape), stats)
            node.register_prehook(hook)

        handles = [m.register_forward_hook(record) for m in self.layers]
        try:
            amp = torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
            leaf = x.detach().requires_grad_()  # a gradient w.r.t. the input only: no batched weight gradients
            with amp:
                losses = self.per_case_loss(self.model(leaf), y)
                total = losses.sum() / multiplicity  # a case's loss is the mean of its K patch losses
        finally:
            for h in handles:
                h.remove()
        torch.autograd.grad(total, leaf)
        if not all(calls):  # a layer whose output gradient never reached its hook would get a zero gradient
            raise RuntimeError("the 'hooks' engine missed a layer's output gradient; use the 'loop' engine")
        for module in [m for m in kept if counts[m] > 1]:  # called twice: the ghost norm would miss cross terms
            for a, g in kept.pop(module):
                add({module.weight: _rule(module)(module, a, g)[module.weight]})
        m = x.shape[0] // multiplicity
        return sums, kept, losses.detach().float().reshape(m, multiplicity).mean(1)
