"""Per-case gradient cost of augmentation multiplicity K and dp_trainable, side by side with the engine as it was
before they existed (loaded from git), on an nnU-Net 3D network. Writes a section of docs/BENCHMARKS.md.

    python scripts/bench_multiplicity.py --before 23190a6 --output docs/BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_adpfl.training.dp_trainer import make_dp_safe
from nnunet_adpfl.privacy.per_case_grads import PerCaseGradients
from nnunet_adpfl.training.trainable import count_parameters, select_trainable

REPO = Path(__file__).resolve().parents[1]
PATCH = (16, 48, 48)
FEATURES = (32, 64, 128, 256)


def load_before(rev: str):
    """per_case_grads.py as of ``rev``, imported under another name."""
    for file in ("nnunet_adpfl/privacy/per_case_grads.py", "nnunet_adpfl/per_case_grads.py"):  # after, before the layout
        shown = subprocess.run(["git", "show", f"{rev}:{file}"], cwd=REPO, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    shown.check_returncode()
    source = shown.stdout
    path = Path(tempfile.mkdtemp()) / "per_case_grads_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("per_case_grads_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def network() -> torch.nn.Module:
    torch.manual_seed(0)
    n = len(FEATURES)
    net = PlainConvUNet(1, n, list(FEATURES), torch.nn.Conv3d, [[3, 3, 3]] * n, [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                        [2] * n, 3, [2] * (n - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                        nonlin_kwargs={"inplace": True}, deep_supervision=False)
    return make_dp_safe(net)


def per_case_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, y, reduction="none").flatten(1).mean(1)


def time_once(engine, x, y) -> float:
    start = time.perf_counter()
    for _ in engine.chunks(x, y):
        pass
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="23190a6", help="git revision of the engine before K / dp_trainable")
    parser.add_argument("--cases", type=int, default=2, help="cases per step")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every variant once)")
    parser.add_argument("--engine", choices=("loop", "vmap"), default="loop")
    parser.add_argument("--output", help="markdown file: replace or append this benchmark's section")
    args = parser.parse_args()
    torch.set_num_threads(2)
    before = load_before(args.before)
    net = network()
    params = dict(net.named_parameters())
    subset = {n: params[n] for n in sorted(select_trainable(net, "norm_bias"))}
    g = torch.Generator().manual_seed(0)

    def batch(patches):
        return torch.randn(patches, 1, *PATCH, generator=g), torch.randint(0, 3, (patches, *PATCH), generator=g)

    b = args.cases
    variants = {  # name -> (engine, batch of patches)
        f"before ({args.before})": (before.PerCaseGradients(net, per_case_ce, params, args.engine), batch(b)),
        "K=1 (default)": (PerCaseGradients(net, per_case_ce, params, args.engine, multiplicity=1), batch(b)),
        "K=2": (PerCaseGradients(net, per_case_ce, params, args.engine, multiplicity=2), batch(2 * b)),
        "K=1, dp_trainable norm_bias": (PerCaseGradients(net, per_case_ce, subset, args.engine), batch(b)),
    }
    for engine, (x, y) in variants.values():  # warm-up
        time_once(engine, x, y)
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
            engine, (x, y) = variants[name]
            times[name].append(time_once(engine, x, y))
    ref = names[0]
    rows = []
    for name in names:
        ratios = [t / t0 for t, t0 in zip(times[name], times[ref])]
        d = count_parameters(subset.values()) if "norm_bias" in name else count_parameters(params.values())
        rows.append(f"| {name} | {d:,} | {statistics.median(times[name]):.3f} | "
                    f"{'reference' if name == ref else f'{statistics.median(ratios):.2f}'} |")
    command = " ".join(["python", "scripts/bench_multiplicity.py"] + sys.argv[1:])
    section = "\n".join([
        "<!-- bench_multiplicity:start -->",
        "## Augmentation multiplicity and dp_trainable: per-case gradient cost (`scripts/bench_multiplicity.py`)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; torch {torch.__version__}, {torch.get_num_threads()} threads, cpu",
        f"- Command: `{command}`",
        f"- Network: nnU-Net PlainConvUNet 3D, features {list(FEATURES)}, patch {list(PATCH)}; {b} cases per step, "
        f"engine {args.engine}; {args.rounds} rounds in rotating order after a warm-up; ratio = median over rounds of "
        "(variant / before of the same round)",
        "- K=2 computes twice the patches (the cost of the extra augmentations, by design); the K=1 row is the "
        "'no new per-step cost' check",
        "",
        "| variant | trainable parameters | median s per step's per-case gradients | ratio vs before |",
        "| --- | ---: | ---: | ---: |",
        *rows,
        "<!-- bench_multiplicity:end -->",
    ])
    print(section)
    if args.output:
        path = Path(args.output)
        text = path.read_text() if path.exists() else ""
        start, end = "<!-- bench_multiplicity:start -->", "<!-- bench_multiplicity:end -->"
        if start in text:
            text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
