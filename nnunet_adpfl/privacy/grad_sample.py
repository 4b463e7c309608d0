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
"""
from __future__ import annotations

import contextlib
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


def _instance_norm(module, a: torch.Tensor, g: torch.Tensor) -> dict:
    """sum_s x_hat * g = (sum_s a * g - mean * sum_s g) / sqrt(var + eps), per case and channel (x_hat never built)."""
    if module.track_running_stats and not module.training:
        raise ValueError("the 'hooks' engine needs InstanceNorm in training mode or without running statistics")
    a, g = a.flatten(2), g.flatten(2)
    var, mean = torch.var_mean(a, -1, unbiased=False)
    g_sum = g.sum(-1)
    a_dot_g = torch.einsum("bcs,bcs->bc", a, g)
    return {module.weight: (a_dot_g - mean * g_sum) * torch.rsqrt(var + module.eps), module.bias: g_sum}


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
    """Per-case gradients of ``per_case_loss`` for ``params`` from one batched pass (see the module docstring)."""

    def __init__(self, model: nn.Module, per_case_loss, params: list[nn.Parameter]):
        bad = unsupported_layers(model, params)
        if bad:
            raise ValueError("the 'hooks' per-case gradient engine has no rule for: " + ", ".join(bad))
        self.model = model
        self.per_case_loss = per_case_loss
        self.params = params
        wanted = {id(p) for p in params}
        self.layers = [m for m in dict.fromkeys(model.modules())
                       if any(id(p) in wanted for p in m.parameters(recurse=False))]

    def __call__(self, x: torch.Tensor, y, multiplicity: int, autocast: torch.dtype | None = None):
        """(grads, losses): grads[k] of shape (m, *params[k].shape) in the parameter's dtype, losses (m,).
        Each layer's per-case gradients are computed in the hook as soon as its output gradient exists, so
        output gradients are freed as in a standard backward."""
        sums: dict[int, torch.Tensor] = {}
        calls: list[list] = []

        def add(module, a, g):
            with torch.no_grad():
                per_case = _rule(module)(module, a.to(module.weight.dtype), g.to(module.weight.dtype))
            for p, value in per_case.items():
                sums[id(p)] = sums[id(p)] + value if id(p) in sums else value

        def record(module, inputs, output):
            a, node, fired = inputs[0].detach(), _producer(output), []
            calls.append(fired)

            def hook(grad_outputs):
                fired.append(True)
                add(module, a, grad_outputs[0].reshape(output.shape))
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
        m = x.shape[0] // multiplicity
        grads = []
        for p in self.params:
            g = sums.get(id(p))
            g = torch.zeros((x.shape[0], *p.shape), dtype=p.dtype, device=p.device) if g is None else g
            grads.append(g.reshape(m, multiplicity, *p.shape).sum(1))
        return grads, losses.detach().float().reshape(m, multiplicity).mean(1)
