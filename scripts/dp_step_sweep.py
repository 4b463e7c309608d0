"""The private step against nnU-Net's standard step at the same batch size B, for a sweep of B (used by
``bench_dp_step.py --sweep`` / ``--batch``).

Network: a PlainConvUNet built the way nnU-Net builds one from a plan (InstanceNorm, LeakyReLU, deep supervision,
made DP-safe), no dataset or trainer. Per B and variant, one step on the same random batch of B cases:
- standard: nnU-Net's CPU ``train_step``: forward, batched Dice+CE loss with deep supervision, backward,
  ``clip_grad_norm_(12)``, SGD (momentum 0.99, Nesterov) step;
- private (one per engine): ``clipped_sum`` of the per-case gradients (flat clipping, C = 1), ``add_noise``
  (sigma = 1, divided by B), then the same SGD step; as ``nnUNetTrainerDPSGD.train_step``.
Every variant has its own copy of the same initial network. Rounds are interleaved (each round runs every variant
once, in a rotating order); ratio = median over rounds of (variant time / standard time in that round).
Memory: peak RSS during one more step above RSS before it, variants one after the other in this process
(freed memory returned to the OS before each).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_adpfl.common.benchmarking import peak_rss_mib
from nnunet_adpfl.privacy.clipping import ClippingRule
from nnunet_adpfl.privacy.noisy_step import add_noise, clipped_sum, make_noise_generator
from nnunet_adpfl.privacy.per_case_grads import ENGINES, PerCaseGradients
from nnunet_adpfl.training.dp_trainer import deep_supervision_weights, make_dp_safe
from nnunet_adpfl.training.losses import PerCaseLoss

STANDARD = "standard"
# dim -> (features per stage, patch size, default batch sizes)
NETWORKS = {2: ((32, 64, 128, 256), (64, 64), (2, 8, 32, 64, 128, 256)),
            3: ((16, 32, 64, 128), (24, 48, 48), (2, 4, 8, 16, 32))}
IN_CHANNELS, CLASSES = 1, 3


def build_network(dim: int, seed: int = 0) -> torch.nn.Module:
    features = NETWORKS[dim][0]
    n = len(features)
    kwargs = {"n_stages": n, "features_per_stage": list(features), "conv_op": f"torch.nn.Conv{dim}d",
              "kernel_sizes": [[3] * dim] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
              "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
              "norm_op": f"torch.nn.InstanceNorm{dim}d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
              "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
              "nonlin_kwargs": {"inplace": True}}
    torch.manual_seed(seed)
    net = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", kwargs,
                                 ["conv_op", "norm_op", "dropout_op", "nonlin"], IN_CHANNELS, CLASSES,
                                 allow_init=True, deep_supervision=True)
    return make_dp_safe(net)


def make_batch(net: torch.nn.Module, dim: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, IN_CHANNELS, *NETWORKS[dim][1], generator=g)
    with torch.no_grad():
        shapes = [o.shape for o in net(x[:1])]
    y = [torch.randint(0, CLASSES, (batch, 1, *s[2:]), generator=g).float() for s in shapes]
    return x, y


def parse_variant(spec: str) -> dict:
    """'hooks', 'hooks/c32', 'vmap/c16', 'loop', 'auto+bf16', ...: engine, chunk (cases per pass), bf16 autocast."""
    name, _, amp = spec.partition("+")
    engine, _, chunk = name.partition("/c")
    if engine not in ("auto", *ENGINES) or amp not in ("", "bf16") or (chunk and not chunk.isdigit()):
        raise SystemExit(f"--engines: cannot read {spec!r} (e.g. hooks, hooks/c32, vmap/c16, loop, auto+bf16)")
    return {"engine": engine, "chunk": int(chunk) if chunk else None, "autocast": torch.bfloat16 if amp else None}


def sgd(net):
    return torch.optim.SGD(net.parameters(), 1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)


class Step:
    """One variant: its own network copy, optimizer and step function."""

    def __init__(self, spec: str, dim: int, batch: int, default_chunk: int | str):
        self.net = build_network(dim)
        self.opt = sgd(self.net)
        self.loss = PerCaseLoss(False, None, deep_supervision_weights(len(NETWORKS[dim][0])))
        self.spec = spec
        if spec == STANDARD:
            return
        v = parse_variant(spec)
        params = {n: p for n, p in self.net.named_parameters() if p.requires_grad and "seg_layers.0" not in n}
        for n, p in self.net.named_parameters():
            p.requires_grad_(n in params)  # the zero-weight deep-supervision head, as the DP trainer freezes it
        self.params = list(params.values())
        self.pc = PerCaseGradients(self.net, self.loss.per_case, params, v["engine"], v["chunk"] or default_chunk,
                                   autocast=v["autocast"])
        self.autocast = v["autocast"]
        self.gen = make_noise_generator(torch.device("cpu"), 0)
        self.batch = batch

    @property
    def engine(self) -> str:
        """The engine, its chunk (resolved at the first step where 'auto') and autocast."""
        if self.spec == STANDARD:
            return "-"
        return (self.pc.engine + (f" (chunk {self.pc.chunk_size})" if self.pc.engine != "loop" else "")
                + (", bf16 autocast" if self.autocast else ""))

    def __call__(self, x, y) -> None:
        if self.spec == STANDARD:
            self.opt.zero_grad(set_to_none=True)
            self.loss(self.net(x), y).backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 12)
        else:
            sums = clipped_sum(self.pc, ClippingRule("flat"), 1.0, x, y)
            noisy = add_noise(sums.clipped, 1.0, self.batch, self.gen)
            self.opt.zero_grad(set_to_none=True)
            for p, g in zip(self.params, noisy):
                p.grad = g
        self.opt.step()


def timed(step: Step, x, y) -> float:
    start = time.perf_counter()
    step(x, y)
    return time.perf_counter() - start


def sweep_one(dim: int, batch: int, specs: list[str], rounds: int, warmup: int, default_chunk: int | str,
              memory: bool, log) -> list[dict]:
    """Rows for one (dim, B): per variant median s/step, median per-round ratio, peak memory and its ratio."""
    variants = [STANDARD] + specs
    steps = {v: Step(v, dim, batch, default_chunk) for v in variants}
    x, y = make_batch(steps[STANDARD].net, dim, batch)
    times = {v: [] for v in variants}
    for i in range(warmup + rounds):
        order = variants[i % len(variants):] + variants[:i % len(variants)]
        measured = {v: timed(steps[v], x, y) for v in order}
        if i >= warmup:
            for v in variants:
                times[v].append(measured[v])
    peaks = {v: peak_rss_mib(lambda v=v: steps[v](x, y))[0] for v in variants} if memory else {}
    rows = []
    for v in variants:
        row = {"dim": dim, "batch": batch, "variant": v, "engine": steps[v].engine,
               "median_s": float(np.median(times[v])), "peak_mib": peaks.get(v)}
        if v != STANDARD:
            row["ratio"] = float(np.median(np.array(times[v]) / np.array(times[STANDARD])))
            row["mem_ratio"] = peaks[v] / peaks[STANDARD] if memory and peaks[STANDARD] > 0 else None
        rows.append(row)
        log(f"{dim}D B={batch} {v}: {row['median_s']:.3f} s" + (f", ratio {row['ratio']:.2f}" if "ratio" in row
                                                                else "")
            + (f", {peaks[v]:.0f} MiB" if memory else ""))
    return rows


def network_description(dim: int) -> str:
    features, patch, _ = NETWORKS[dim]
    n_params = sum(p.numel() for p in build_network(dim).parameters())
    return (f"{dim}D PlainConvUNet, features {list(features)}, 2 convs per stage (encoder and decoder), InstanceNorm, "
            f"deep supervision, {IN_CHANNELS} input channel, {CLASSES} classes, {n_params:,} parameters, "
            f"patch {list(patch)}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| net | B | variant | engine | median s/step | ratio vs standard | peak step memory (MiB) | "
             "memory ratio vs standard |", "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ref = "reference" if r["variant"] == STANDARD else "n/a"
        mem = "not measured" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        mem_ratio = f"{r['mem_ratio']:.2f}" if r.get("mem_ratio") is not None else (ref if r["peak_mib"] is not None
                                                                                   else "not measured")
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "reference"
        lines.append(f"| {r['dim']}D | {r['batch']} | {r['variant']} | {r['engine']} | {r['median_s']:.3f} | "
                     f"{ratio} | {mem} | {mem_ratio} |")
    return "\n".join(lines)


def marks(args) -> tuple[str, str]:
    """One docs section per set of networks swept (a 2D run and a 3D run can update the file separately)."""
    name = "_".join(sorted(args.sweep or ("2d", "3d")))
    return f"<!-- bench_dp_sweep_{name}:start -->", f"<!-- bench_dp_sweep_{name}:end -->"


def parse_batches(text: str | None, dim: int) -> list[int]:
    if not text:
        return list(NETWORKS[dim][2])
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batch: expected comma-separated batch sizes >= 1, got {text!r}")
    return batches


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_sweep(args, log, machine: str, command: str, write=None) -> str:
    """Every (dim, B, variant) of the sweep; returns the docs section (markdown), also passed to ``write`` after
    each B (a long sweep leaves its finished rows behind)."""
    specs = [s.strip() for s in args.engines.split(",") if s.strip()]
    for spec in specs:
        parse_variant(spec)
    dims = [int(d[0]) for d in args.sweep or ("2d", "3d")]
    rows, loads = [], [f"{load_average()} (start)"]
    section = ""
    for dim in dims:
        for batch in parse_batches(args.batch, dim):
            rows += sweep_one(dim, batch, specs, args.rounds, args.sweep_warmup, args.chunk, not args.skip_memory,
                              log)
            loads.append(f"{load_average()} ({dim}D B={batch} done)")
            section = docs_section(args, dims, rows, loads, machine, command)
            if write is not None:
                write(section)
    return section


def docs_section(args, dims: list[int], rows: list[dict], loads: list[str], machine: str, command: str) -> str:
    return "\n".join([
        f"### DP step vs standard step over the batch size: {', '.join(f'{d}D' for d in dims)}",
        "",
        f"- Machine: {machine}; load average (1, 5, 15 min) during the run: " + "; ".join(loads),
        f"- Command: `{command}`",
        *[f"- Network: {network_description(d)}" for d in dims],
        "- Standard: nnU-Net's CPU train_step (batched Dice+CE with deep supervision, backward, clip_grad_norm_ 12, "
        "SGD momentum 0.99 Nesterov). Private: clipped_sum of the per-case gradients (flat clipping, C = 1), "
        "add_noise (sigma = 1), the same SGD step, as nnUNetTrainerDPSGD.train_step; the batch has exactly B cases",
        f"- Timing: {args.rounds} rounds after {args.sweep_warmup} warm-up, variants interleaved in rotating order; "
        "ratio = median over rounds of (variant time / standard time in the same round)",
        "- Memory: " + ("not measured" if args.skip_memory else
                        "peak RSS (VmHWM) during one more step minus RSS before it, variants one after the other "
                        "in the same process, freed memory returned to the OS (malloc_trim) before each"),
        "",
        markdown_table(rows),
    ])
