#!/usr/bin/env python
"""Time and peak memory of the aggregator closing one federated round, with dense uploads (NP-FL / DP-FL: every
float32 coordinate of the update) against ADP-FL's sparse uploads (top-k indices + values at --density).

The model is a 3D nnU-Net PlainConvUNet (default: 6 stages, 32..320 features, 3x3x3 kernels; about 31M
parameters) with nnU-Net's initialisation as the global model and random updates (normal, std 1e-3) per site. Every
file goes through the project's code: the round-0 global model as the aggregator writes it, each site's update
through ``SiteClient.upload`` (safetensors + signed manifest with a DP-FL privacy account; sparse: ``topk_encode``
and the manifest fields ADP-FL adds), and ``Aggregator.run_round`` closes the round (HMAC, sha256, shape,
finiteness checks, top-k decoding, FedAvg, signed global model). The files are read right after being written
(from the page cache). Bytes per site and round are the sizes of the files written.

Dense and sparse use two federations side by side; in every round each aggregator runs once, in rotating order; the
time ratio is the median over rounds of (sparse time / dense time of the same round). Peak memory: each variant's
aggregator closes one more round alone in a child process, which reports its peak resident memory during
``run_round`` above its resident memory before it. Everything lives in a temporary folder, removed at the end.

    python scripts/bench_aggregator.py --output docs/BENCHMARKS.md
    python scripts/bench_aggregator.py --smoke      # tiny network, 3 sites, one round (seconds)
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nnunet_adpfl.common.benchmarking import machine_description, peak_rss_mib, ratio_cells, ratio_row, report_memory, \
    run_benchmark_cli, run_memory_child, update_section
from nnunet_adpfl.common.tensors import unique_state
from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.privacy.accounting import PrivacyAccountant
from nnunet_adpfl.federation.aggregator import Aggregator, create_federation
from nnunet_adpfl.federation.site import SiteClient
from nnunet_adpfl.privacy.sparsify import topk_encode

MARKS = ("<!-- bench_aggregator:start -->", "<!-- bench_aggregator:end -->")
VARIANTS = ("dense", "sparse")
MODE = {"dense": "dpfl", "sparse": "adpfl"}
CASES_PER_SITE = 20
UPDATE_STD = 1e-3
NUM_CLASSES = 3
# (features per stage, sites, warm-up rounds, timed rounds)
PROFILES = {"full": ("32,64,128,256,320,320", 10, 1, 3), "smoke": ("8,16,32,64", 3, 0, 1)}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quiet(msg: str) -> None:
    """Aggregator log sink: the benchmark prints its own lines."""


# ----------------------------------------------------------------------------- model and uploads

def network_state(features: list[int]) -> dict[str, torch.Tensor]:
    """Initial weights of a 3D PlainConvUNet as nnU-Net's 3d_fullres plans build it (1 input channel)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    n = len(features)
    kwargs = {"n_stages": n, "features_per_stage": features, "conv_op": "torch.nn.modules.conv.Conv3d",
              "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
              "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
              "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    torch.manual_seed(0)
    net = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", kwargs,
                                 ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, NUM_CLASSES, allow_init=True,
                                 deep_supervision=True)
    return {k: v.clone() for k, v in unique_state(net).items()}


def site_update(global_state: dict[str, torch.Tensor], site_index: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(site_index)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * UPDATE_STD for k, v in global_state.items()}


def privacy_fields() -> dict:
    """A DP-FL site's privacy manifest fields (one epoch of 250 steps at sigma 1, q 0.1)."""
    accountant = PrivacyAccountant("rdp", 1e-5)
    accountant.step(1.0, 0.1, 250)
    return {"epsilon": accountant.epsilon(), "delta": accountant.delta,
            "privacy_accountant": accountant.state_dict()}


def site_names(num_sites: int) -> list[str]:
    return [f"site{i + 1:02d}" for i in range(num_sites)]


def make_federation(folder: Path, variant: str, sites: list[str], rounds: int,
                    global_state: dict[str, torch.Tensor]) -> None:
    fed, keys = folder / "fed", folder / "keys"
    create_federation(fed, keys, sites, rounds=rounds, epochs_per_round=1, mode=MODE[variant])
    Aggregator(fed, keys, log=quiet)._write_global(0, global_state, {"sites": [], "num_cases": 0})  # as round 0


def upload_round(folder: Path, r: int, uploads: dict[str, dict], manifest_fields: dict) -> list[int]:
    """Every site uploads its tensors for round r; returns the bytes each site wrote (tensor file + manifest)."""
    written = []
    for site, tensors in uploads.items():
        client = SiteClient(folder / "fed", site, folder / "keys" / f"{site}.key", log=quiet)
        client.upload(r, tensors, CASES_PER_SITE, manifest_fields)
        written.append(sum(p.stat().st_size for p in ff.update_paths(folder / "fed", r, site)))
    return written


def close_round(folder: Path, r: int) -> float:
    """Seconds the aggregator takes to close round r (updates read, checked, averaged; global model written)."""
    aggregator = Aggregator(folder / "fed", folder / "keys", log=quiet)
    start = time.perf_counter()
    aggregator.run_round(r)
    seconds = time.perf_counter() - start
    shutil.rmtree(ff.round_dir(folder / "fed", r) / "updates")  # keeps the disk use to one round
    return seconds


def measure_memory_child(args) -> None:
    """Child process: close round ``--round`` of the federation in ``--folder``, report its peak memory."""
    aggregator = Aggregator(Path(args.folder) / "fed", Path(args.folder) / "keys", log=quiet)
    peak_mib, method = peak_rss_mib(lambda: aggregator.run_round(args.round))
    report_memory(args.measure_memory_of, peak_mib, method)


# ----------------------------------------------------------------------------- report

def summarise(times: dict[str, list[float]], sizes: dict[str, list[int]], peaks: dict[str, float] | None,
              density: float) -> list[dict]:
    """Per variant: bytes per site and round, median/IQR s per round, per-round time ratio to dense, memory."""
    rows = []
    for variant in VARIANTS:
        row = {**ratio_row(times, variant, "dense", peaks), "density": 1.0 if variant == "dense" else density,
               "bytes": float(np.mean(sizes[variant]))}
        if variant != "dense":
            row["bytes_ratio"] = float(np.mean(sizes["dense"])) / row["bytes"]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| upload | density | bytes per site per round | bytes ratio dense / this | aggregator median s/round | "
             "IQR s/round | median time ratio vs dense | peak aggregator memory (MiB) | memory ratio vs dense |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        bytes_ratio = f"{r['bytes_ratio']:.2f}" if "bytes_ratio" in r else "reference"
        ratio, mem, mem_ratio = ratio_cells(r, r["variant"] == "dense")
        lines.append(f"| {r['variant']} | {r['density']:g} | {r['bytes']:,.0f} | {bytes_ratio} | "
                     f"{r['median_s']:.3f} | {r['iqr_s']:.3f} | {ratio} | {mem} | {mem_ratio} |")
    return "\n".join(lines)


def docs_section(info: dict, table: str) -> str:
    return "\n".join([
        "## Aggregator: dense vs ADP-FL sparse uploads (`scripts/bench_aggregator.py`)",
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['machine']}",
        f"- Command: `{info['command']}`",
        f"- Model: 3D PlainConvUNet (nnU-Net 3d_fullres layout, features {info['features']}, 3x3x3 kernels, "
        f"{NUM_CLASSES} classes), {info['num_params']:,} float32 parameters in {info['num_tensors']} tensors; "
        f"global model = its nnU-Net initialisation, site updates = random normal (std {UPDATE_STD})",
        f"- Federation: {info['sites']} sites, {CASES_PER_SITE} cases each; dense = the update as DP-FL / NP-FL "
        f"upload it, sparse = ADP-FL's top-k encoding (`topk_encode`, density {info['density']:g}: int64 indices "
        "+ float32 values); both written by `SiteClient.upload` with a signed manifest carrying a DP-FL privacy "
        "account",
        "- Bytes: size of each site's update file + manifest as written, mean over sites and rounds",
        f"- Time: `Aggregator.run_round` (reads and checks every update twice, decodes top-k, FedAvg in float64, "
        f"writes the signed global model), files read from the page cache; timed rounds: {info['rounds']} after "
        f"{info['warmup']} warm-up, dense and sparse interleaved in rotating order; ratio = median over rounds of "
        "(sparse time / dense time of the same round)",
        f"- Memory: {info['memory_method']}",
        "",
        table,
    ])


# ----------------------------------------------------------------------------- main

def benchmark(args) -> None:
    features_text, num_sites, warmup, rounds = PROFILES["smoke" if args.smoke else "full"]
    features = [int(f) for f in (args.features or features_text).split(",")]
    num_sites = args.sites or num_sites
    warmup = warmup if args.warmup is None else args.warmup
    rounds = rounds if args.rounds is None else args.rounds
    if rounds < 1 or warmup < 0 or num_sites < 1 or not 0 < args.density <= 1:
        raise SystemExit("need --rounds >= 1, --warmup >= 0, --sites >= 1 and 0 < --density <= 1")
    command = shlex.join(["python", os.path.relpath(Path(__file__).resolve()), *sys.argv[1:]])
    log(f"command: {command}")
    machine = machine_description(torch.device("cpu"))
    log(f"machine: {machine}")

    global_state = network_state(features)
    info = {"date": datetime.date.today().isoformat(), "machine": machine, "command": command,
            "features": features, "num_params": sum(v.numel() for v in global_state.values()),
            "num_tensors": len(global_state), "sites": num_sites, "density": args.density, "rounds": rounds,
            "warmup": warmup}
    log(f"PlainConvUNet {features}: {info['num_params']:,} parameters in {info['num_tensors']} tensors; "
        f"{num_sites} sites; sparse density {args.density:g}")
    sites = site_names(num_sites)
    manifest_fields = {"dense": privacy_fields(), "sparse": {**privacy_fields(), "encoding": "topk",
                                                             "density": args.density}}
    sparse_uploads = {site: topk_encode(site_update(global_state, i), args.density) for i, site in enumerate(sites)}

    work = Path(tempfile.mkdtemp(prefix="bench_aggregator_", dir=args.tmp_dir))
    try:
        folders = {v: work / v for v in VARIANTS}
        memory_round = warmup + rounds + 1
        for variant in VARIANTS:
            make_federation(folders[variant], variant, sites, memory_round, global_state)

        def upload(r: int) -> dict[str, list[int]]:
            dense_uploads = {site: site_update(global_state, i) for i, site in enumerate(sites)}
            return {"dense": upload_round(folders["dense"], r, dense_uploads, manifest_fields["dense"]),
                    "sparse": upload_round(folders["sparse"], r, sparse_uploads, manifest_fields["sparse"])}

        times = {v: [] for v in VARIANTS}
        sizes = {v: [] for v in VARIANTS}
        for i in range(warmup + rounds):
            r = i + 1
            written = upload(r)
            order = VARIANTS[i % 2:] + VARIANTS[:i % 2]
            measured = {v: close_round(folders[v], r) for v in order}
            if i >= warmup:
                for v in VARIANTS:
                    times[v].append(measured[v])
                    sizes[v].extend(written[v])
            label = "warm-up" if i < warmup else "timed"
            log(f"round {r}/{warmup + rounds} ({label}): " + ", ".join(
                f"{v} {measured[v]:.2f} s, {np.mean(written[v]):,.0f} bytes/site" for v in VARIANTS))

        peaks, method = None, "not measured (--skip-memory)"
        if not args.skip_memory:
            upload(memory_round)
            peaks = {}
            for v in VARIANTS:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-memory-of", v, "--folder",
                       str(folders[v]), "--round", str(memory_round)]
                peaks[v], method = run_memory_child(cmd, v)
                log(f"memory {v}: {peaks[v]:.0f} MiB")
        info["memory_method"] = (f"{method}, each variant alone in a child process closing one round (set-up: "
                                 "interpreter, torch, the Aggregator object)") if peaks else method
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = markdown_table(summarise(times, sizes, peaks, args.density))
    print()
    print(table)
    print()
    if args.output:
        update_section(Path(args.output), docs_section(info, table), MARKS)
        log(f"wrote section to {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    full, smoke = PROFILES["full"], PROFILES["smoke"]
    parser.add_argument("--features", default=None,
                        help=f"comma-separated features per stage (default: {full[0]}, smoke {smoke[0]})")
    parser.add_argument("--sites", type=int, default=None, help=f"sites (default: {full[1]}, smoke {smoke[1]})")
    parser.add_argument("--density", type=float, default=0.1,
                        help="fraction of coordinates a sparse upload keeps (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds (default: {full[3]}, smoke {smoke[3]})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed warm-up rounds (default: {full[2]}, smoke {smoke[2]})")
    parser.add_argument("--smoke", action="store_true", help="tiny end-to-end check (seconds)")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak aggregator memory")
    parser.add_argument("--tmp-dir", default=None, help="where the temporary federations go (default: system temp)")
    parser.add_argument("--output", default=None,
                        help="Markdown file whose bench_aggregator section is created/replaced, e.g. "
                             "docs/BENCHMARKS.md (default: print only)")
    parser.add_argument("--measure-memory-of", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    run_benchmark_cli(build_parser(), benchmark, measure_memory_child, argv)


if __name__ == "__main__":
    main()
