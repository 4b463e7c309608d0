"""Per-case gradients of a per-case loss.

Four engines, same result (tests compare each with an independent per-case loop):
- ``loop``: one forward/backward per case (autograd). Lowest memory.
- ``vmap``: ``torch.func.vmap(grad(functional_call(..., tie_weights=False)))`` over chunks of cases.
  ``tie_weights=False`` matters: with the default, functorch tensors stay in the model and nnU-Net's
  final validation crashes afterwards.
- ``hooks``: one batched forward/backward per chunk of cases, per-case gradients from each layer's input and
  output gradient (``grad_sample.py``); only for conv / transposed conv / affine InstanceNorm layers.
- ``ghost``: ``hooks`` with book-keeping in ``clipped_chunks`` (what ``noisy_step.clipped_sum`` uses): conv weights
  whose per-case gradient is larger than the Gram matrices of their input get ghost norms and one scaled batched
  weight gradient instead of per-case gradients (``grad_sample.py``). ``chunks`` gives the ``hooks`` result.
``auto`` picks among them (``choose_engine``). ``chunk_size="auto"`` is the largest chunk whose estimated memory
(``case_bytes``) fits ``memory_limit_mib`` (null: ``default_memory_limit_mib``). ``autocast`` (torch.bfloat16 or a
dp_autocast setting, ``choose_autocast``; not with vmap) runs the per-case forward/backward under autocast; the
per-case gradients stay in the parameters' dtype (fp32), and so do the norms, clipping and noise computed from them.

Augmentation multiplicity K: the batch holds K consecutive patches per case; a case's gradient is the gradient of
the mean of its K patch losses (= the mean of the K patch gradients), so it is still one case's contribution.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from .grad_sample import HookedGradSample, unsupported_layers

Target = torch.Tensor | list[torch.Tensor]
PerCaseLossFn = Callable[[object, Target], torch.Tensor]  # (outputs, targets) -> (b,) losses


def slice_target(target: Target, start: int, stop: int) -> Target:
    if isinstance(target, (list, tuple)):
        return [t[start:stop] for t in target]
    return target[start:stop]


def group_cases(x: torch.Tensor, multiplicity: int) -> torch.Tensor:
    """(m * K, ...) -> (m, K, ...): the K patches of each case side by side."""
    return x.reshape(x.shape[0] // multiplicity, multiplicity, *x.shape[1:])


def balanced_chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of ceil(n / size) consecutive chunks of n cases whose sizes differ by at most one: 4 cases in
    chunks of at most 3 are 2 + 2, not 3 + 1 (a lone 3D case takes a slow path on CPU: 2.0x the standard step at
    B = 4 against 1.2x at B = 2, docs/BENCHMARKS.md)."""
    count = -(-n // size)
    bounds, start = [], 0
    for i in range(count):
        stop = start + n // count + (1 if i < n % count else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


ENGINES = ("loop", "vmap", "hooks", "ghost")


def resolve_engine(engine: str) -> str:
    """Checks the engine name; 'auto' is decided per model by ``PerCaseGradients`` (``choose_engine``)."""
    if engine != "auto" and engine not in ENGINES:
        raise ValueError(f"unknown per-case gradient engine {engine!r}; known: auto, {', '.join(ENGINES)}")
    return engine


def choose_engine(model: nn.Module, params: list[nn.Parameter]) -> str:
    """'auto': on CPU 'ghost' where every trained layer has a per-case rule (all of nnU-Net's layer types; as fast as
    'hooks' or faster at every batch size measured, docs/BENCHMARKS.md), else 'loop'; on other devices 'loop', the
    engine measured there."""
    on_cpu = all(p.device.type == "cpu" for p in params)
    return "ghost" if on_cpu and not unsupported_layers(model, params) else "loop"


AUTO_CPU_RAM_SHARE = 0.25   # chunk_size 'auto' on CPU: this share of the RAM available at set-up
AUTO_CPU_CHUNK_MIB = 320    # ... and at most this estimated memory per batched pass: on CPU larger passes cost more
                            # per case (2D B = 128, hooks: 0.95x the standard step in chunks of 8 (309 MiB), 1.31x in
                            # chunks of 16, 1.66x in one chunk; docs/BENCHMARKS.md)
AUTO_GPU_FREE_SHARE = 0.5   # on a GPU: this share of its free memory at set-up
AUTO_FALLBACK_MIB = 2048    # where the free memory cannot be read (no /proc/meminfo: macOS, mps)
GRAD_COPIES = 2             # per-case gradients live twice at the peak (the engine's result and the clipping's
                            # temporaries)
PEAK_MARGIN = 1.4           # backward transients (output gradients) on top: measured peak / estimate was 1.2-1.35
                            # for the 2D and 3D networks of scripts/dp_step_sweep.py (hooks, CPU)


def default_memory_limit_mib(device: torch.device) -> float:
    """The memory bound of chunk_size 'auto' where none is set: a share of the device's free memory now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return AUTO_GPU_FREE_SHARE * free / 2 ** 20
    try:
        with open("/proc/meminfo") as f:
            available_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # no /proc (macOS, mps) or no MemAvailable line
        return AUTO_FALLBACK_MIB
    return AUTO_CPU_RAM_SHARE * available_kib / 2 ** 10


def case_bytes(model: nn.Module, per_case_loss: PerCaseLossFn, params: list[nn.Parameter], x: torch.Tensor,
               y: Target, autocast: torch.dtype | None = None) -> int:
    """Estimated peak memory one case adds to a batched chunk: PEAK_MARGIN x (the tensors its forward saves for the
    backward, counted once per storage, parameters excluded, measured on a data-free input of the case's shape,
    plus GRAD_COPIES copies of its per-case gradients)."""
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in shared:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    amp = torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        leaf = torch.zeros_like(x).requires_grad_()
        per_case_loss(model(leaf), [torch.zeros_like(t) for t in y] if isinstance(y, (list, tuple))
                      else torch.zeros_like(y)).sum()
    grads = sum(p.numel() * p.element_size() for p in params)
    return int(PEAK_MARGIN * (sum(seen.values()) + GRAD_COPIES * grads))


AUTOCAST_SETTINGS = ("auto", "bf16", "off")


def choose_autocast(setting: str, device: torch.device, engine: str) -> torch.dtype | None:
    """dp_autocast -> the per-case forward/backward's autocast dtype (None: fp32). 'auto' = bf16 on a CUDA GPU that
    supports it (where nnU-Net's own step runs under AMP), for the 'loop' and 'hooks' engines; fp32 on CPU (as
    nnU-Net's CPU step; bf16 was faster on an AMX CPU but changes the gradients, docs/BENCHMARKS.md) and with
    'vmap'."""
    if setting not in AUTOCAST_SETTINGS:
        raise ValueError(f"unknown autocast setting {setting!r}; known: {', '.join(AUTOCAST_SETTINGS)}")
    if setting == "off":
        return None
    if setting == "bf16":
        if engine == "vmap":
            raise ValueError("bf16 autocast is not supported with the 'vmap' engine; use 'loop' or 'hooks'")
        return torch.bfloat16
    if engine == "vmap":
        return None
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


class PerCaseGradients:
    """Yields (grads, losses) chunks: grads[k] has shape (m, *params[k].shape), losses shape (m,)."""

    def __init__(self, model: nn.Module, per_case_loss: PerCaseLossFn, params: dict[str, nn.Parameter],
                 engine: str = "loop", chunk_size: int | str = 8, multiplicity: int = 1,
                 autocast: torch.dtype | str | None = None, memory_limit_mib: float | None = None,
                 ghost: str = "cost"):
        if multiplicity < 1:
            raise ValueError(f"augmentation multiplicity must be >= 1, got {multiplicity}")
        if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                     or chunk_size < 1):
            raise ValueError(f"chunk_size must be 'auto' or an integer >= 1, got {chunk_size!r}")
        self.model = model
        self.per_case_loss = per_case_loss
        self.names = list(params)
        self.params = list(params.values())
        engine = resolve_engine(engine)
        self.engine = choose_engine(model, self.params) if engine == "auto" else engine
        self.chunk_size = chunk_size  # 'auto': decided at the first chunk (``resolve_chunk_size``)
        self.memory_limit_mib = memory_limit_mib
        self.multiplicity = multiplicity
        if isinstance(autocast, str):  # a dp_autocast setting: 'auto', 'bf16' or 'off'
            autocast = choose_autocast(autocast, self.params[0].device if self.params else torch.device("cpu"),
                                       self.engine)
        self.autocast = autocast
        if self.engine == "vmap":
            if autocast:
                raise ValueError("autocast is not supported with the 'vmap' engine; use 'loop' or 'hooks'")
            self._vmapped = vmap(grad_and_value(self._case_loss), in_dims=(None, 0, 0), randomness="different")
        if self.engine in ("hooks", "ghost"):
            self._hooked = HookedGradSample(model, per_case_loss, self.params, ghost)
        self.book_keeping = self.engine == "ghost"  # clipped_sum uses clipped_chunks

    def chunks(self, data: torch.Tensor, target: Target) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Per-case gradients and losses, at most ``chunk_size`` cases (loop: one case) at a time, in chunks of
        (almost) equal size (``balanced_chunks``)."""
        k = self.multiplicity
        if data.shape[0] % k:
            raise ValueError(f"batch of {data.shape[0]} patches is not {k} patches per case")
        if self.chunk_size == "auto":
            self.resolve_chunk_size(data[:k], slice_target(target, 0, k))
        run = {"loop": self._loop_case, "vmap": self._vmap_chunk, "hooks": self._hooks_chunk,
               "ghost": self._hooks_chunk}[self.engine]
        for start, stop in balanced_chunks(data.shape[0] // k, 1 if self.engine == "loop" else self.chunk_size):
            yield run(data[start * k:stop * k], slice_target(target, start * k, stop * k))

    def clipped_chunks(self, data: torch.Tensor, target: Target, scales_of):
        """'ghost' engine: (clipped sum, norms, losses) per chunk, clipped sum = sum_i s_i g_i with
        s = scales_of(norms) for finite norms and 0 otherwise (non-finite norms returned as inf)."""
        if not self.book_keeping:
            raise ValueError(f"clipped_chunks is the 'ghost' engine's; this one is {self.engine!r}")
        k = self.multiplicity
        if data.shape[0] % k:
            raise ValueError(f"batch of {data.shape[0]} patches is not {k} patches per case")
        if self.chunk_size == "auto":
            self.resolve_chunk_size(data[:k], slice_target(target, 0, k))
        for start, stop in balanced_chunks(data.shape[0] // k, self.chunk_size):
            yield self._hooked.clipped(data[start * k:stop * k], slice_target(target, start * k, stop * k), k,
                                       scales_of, self.autocast)

    def resolve_chunk_size(self, x: torch.Tensor, y: Target) -> int:
        """chunk_size 'auto': the most cases whose estimated memory (``case_bytes``) fits the memory limit (on CPU
        also AUTO_CPU_CHUNK_MIB), from a data-free case of the shape of ``x`` (one case's patches; only their shape is
        used). 1 for 'loop'."""
        if self.chunk_size == "auto":
            limit = self.memory_limit_mib if self.memory_limit_mib is not None else \
                default_memory_limit_mib(x.device)
            if x.device.type == "cpu":
                limit = min(limit, AUTO_CPU_CHUNK_MIB)
            per_case = case_bytes(self.model, self.per_case_loss, self.params, x, y, self.autocast)
            self.chunk_size = 1 if self.engine == "loop" else max(1, math.floor(limit * 2 ** 20 / per_case))
        return self.chunk_size

    def _amp(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()

    def _loop_case(self, x: torch.Tensor, y: Target):
        with self._amp(x.device):
            loss = self.per_case_loss(self.model(x), y).mean()  # the case's K patches (K = 1: that patch's loss)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.to(p.dtype) for g, p in zip(grads, self.params)]
        return [g.unsqueeze(0) for g in grads], loss.detach().float().unsqueeze(0)

    def _hooks_chunk(self, x: torch.Tensor, y: Target):
        return self._hooked(x, y, self.multiplicity, self.autocast)

    def _case_loss(self, params: dict, x: torch.Tensor, y: Target) -> torch.Tensor:
        out = functional_call(self.model, params, (x,), tie_weights=False)
        return self.per_case_loss(out, y).mean()

    def _vmap_chunk(self, x: torch.Tensor, y: Target):
        params = {n: p.detach() for n, p in zip(self.names, self.params)}
        k = self.multiplicity
        y = [group_cases(t, k) for t in y] if isinstance(y, (list, tuple)) else group_cases(y, k)
        grads, losses = self._vmapped(params, group_cases(x, k), y)
        return [grads[n] for n in self.names], losses.detach()


def trainable_params_reached_by_loss(model: nn.Module, per_case_loss: PerCaseLossFn, example_input: torch.Tensor,
                                     example_target: Target) -> dict[str, nn.Parameter]:
    """Trainable parameters whose gradient can be non-zero (e.g. not nnU-Net's deep-supervision head that has
    loss weight 0). Decided from the graph on a data-free example input, never from private data."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = per_case_loss(model(example_input), example_target).sum()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: p for (n, p), g in zip(params.items(), grads) if g is not None}
