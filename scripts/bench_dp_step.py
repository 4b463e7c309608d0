#!/usr/bin/env python
"""Time one private step of every DP trainer (nnUNetTrainerDPSGD with the per-case gradient engines 'loop' and
'vmap'; AutoS, NSGD, PSAC, DPMorph, DPMorphAdaptive, and the federated DPFL and ADPFL with 'loop') against one
standard nnUNetTrainer step, on the network, patch size and batch size that nnU-Net plans for the synthetic kidney
CT dataset. The federated trainers run as the one site of a one-site federation folder (round 1).

All variants live in one process, start from identical weights and get the same batches (of exactly the planned
batch size). Steps are interleaved (round i runs every variant once, in a rotating order); the headline number is
the median over rounds of (DP time / standard time in the same round). Peak step memory: on CUDA
torch.cuda.max_memory_allocated per variant; on CPU each variant runs alone in a child process that reports its
peak resident memory during the steps above its resident memory after set-up.

Real measurement (takes long on CPU; --variants, --steps and --scale shorten it):
    python scripts/bench_dp_step.py --output docs/BENCHMARKS.md
Quick end-to-end check (writes no docs):
    python scripts/bench_dp_step.py --smoke --variants dpsgd
Batch-size sweep (network level, no dataset; see dp_step_sweep.py):
    python scripts/bench_dp_step.py --sweep 3d --batch 2,8,32 --engines auto,loop --output docs/BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.federation.aggregator import Aggregator, create_federation
from nnunet_adpfl.federation.federation_file import PLAN_FILES, sign_plan, write_plan_files
from nnunet_adpfl.common.benchmarking import machine_description, peak_rss_mib, ratio_cells, ratio_row, report_memory, \
    run_benchmark_cli, run_memory_child, update_section
from nnunet_adpfl.common.config import ENV_VAR
from nnunet_adpfl.federation.plan import plans_digest
from nnunet_adpfl.nnunet.pipeline import nnunet_env, run
from nnunet_adpfl.data.synthetic import generate_dataset

DATASET_ID = 501
CONFIGURATION = "3d_fullres"
FOLD = 0
NUM_BATCHES = 4  # distinct batches drawn up front and cycled through
NOISE_MULTIPLIER = 1.0  # fixed sigma: no epsilon calibration, no budget stop (cost does not depend on sigma)
MARKS = {"cpu": ("<!-- bench_dp_step:start -->", "<!-- bench_dp_step:end -->"),  # one docs section per device
         "cuda": ("<!-- bench_dp_step_cuda:start -->", "<!-- bench_dp_step_cuda:end -->")}
STANDARD = "standard"
SITE = "site1"  # the one site of the federated variants' federation
# variant -> (trainer, per-case gradient engine, federation mode)
VARIANTS = {
    STANDARD: ("nnUNetTrainer", None, None),
    "dpsgd": ("nnUNetTrainerDPSGD", "loop", None),
    "dpsgd-vmap": ("nnUNetTrainerDPSGD", "vmap", None),
    "autos": ("nnUNetTrainerAutoS", "loop", None),
    "nsgd": ("nnUNetTrainerNSGD", "loop", None),
    "psac": ("nnUNetTrainerPSAC", "loop", None),
    "dpmorph": ("nnUNetTrainerDPMorph", "loop", None),
    "dpmorph-adaptive": ("nnUNetTrainerDPMorphAdaptive", "loop", None),
    "dpfl": ("nnUNetTrainerDPFL", "loop", "dpfl"),
    "adpfl": ("nnUNetTrainerADPFL", "loop", "adpfl"),
}
# (dataset scale, training cases, warm-up steps, timed steps)
PROFILES = {"full": (1.0, 24, 3, 10), "smoke": (0.5, 8, 2, 2)}


# ----------------------------------------------------------------------------- set-up

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def profile(args) -> tuple:
    """(scale, cases, warm-up, steps) of the chosen profile, with --scale applied."""
    scale, num_cases, warmup, steps = PROFILES["smoke" if args.smoke else "full"]
    return (scale if args.scale is None else args.scale), num_cases, warmup, steps


def dataset_root(args) -> Path:
    name = "smoke" if args.smoke else "full"
    return Path(args.work_dir).resolve() / (name if args.scale is None else f"{name}_scale{args.scale:g}")


def prepare_dataset(root: Path, scale: float, num_cases: int, create: bool = True) -> dict:
    """Synthetic kidney CT dataset + nnUNetv2_plan_and_preprocess, reused when already done with the same
    parameters. Returns the nnU-Net environment for ``root``."""
    env = nnunet_env(root)
    marker = root / "prepared.json"
    wanted = {"task": "kidney", "dataset_id": DATASET_ID, "scale": scale, "num_cases": num_cases, "seed": 0,
              "configuration": CONFIGURATION}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        log(f"reusing prepared dataset in {root}")
        return env
    if not create:
        raise RuntimeError(f"no prepared dataset in {root}")
    start = time.perf_counter()
    marker.unlink(missing_ok=True)
    log(f"writing synthetic kidney CT dataset (scale {scale}, {num_cases} cases) to {root / 'nnUNet_raw'}")
    generate_dataset("kidney", env["nnUNet_raw"], DATASET_ID, num_cases=num_cases, num_sites=1, num_test_cases=0,
                     seed=0, scale=scale)
    log_file = root / "plan_and_preprocess.log"
    log(f"running nnUNetv2_plan_and_preprocess -c {CONFIGURATION} (log: {log_file})")
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np",
         str(min(2, os.cpu_count() or 1))], env, log_file)
    marker.write_text(json.dumps(wanted))
    log(f"dataset prepared in {time.perf_counter() - start:.0f} s")
    return env


def use_env(env: dict) -> None:
    """nnU-Net paths for in-process trainers, single-threaded data loading, no torch.compile."""
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        os.environ[key] = env[key]
    os.environ["nnUNet_n_proc_DA"] = "0"
    os.environ["nnUNet_compile"] = "f"


def settings_path(root: Path, variant: str) -> Path:
    return root / "settings" / f"{variant}.json"


def prepare_federation(root: Path, env: dict, variant: str, mode: str) -> dict:
    """A fresh one-site federation for ``variant`` with the benchmark's plan and the round-0 global model; returns
    the site's settings."""
    fed, keys = root / "federations" / variant, root / "federation_keys" / variant
    for folder in (fed, keys):
        shutil.rmtree(folder, ignore_errors=True)
    create_federation(fed, keys, [SITE], rounds=1, epochs_per_round=1, mode=mode, configuration=CONFIGURATION)
    preprocessed = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{DATASET_ID:03d}_*"))
    written = write_plan_files(fed, {name: (preprocessed / name).read_bytes() for name in PLAN_FILES})
    sign_plan(fed, keys, plans_digest(ff.read_json(preprocessed / "nnUNetPlans.json")), written)  # as 'plan' does
    Aggregator(fed, keys, log=lambda msg: None).ensure_initial_model()
    return {"federation_dir": str(fed), "site_id": SITE, "site_key_file": str(keys / f"{SITE}.key")}


def prepare_variants(root: Path, env: dict, variants: list[str]) -> None:
    """One settings file per private variant (fixed noise multiplier, engine; federated: a fresh federation)."""
    for variant in variants[1:]:
        _, engine, mode = VARIANTS[variant]
        settings = {"target_epsilon": None, "noise_multiplier": NOISE_MULTIPLIER, "per_sample_engine": engine}
        if mode is not None:
            settings.update(prepare_federation(root, env, variant, mode))
        settings_path(root, variant).parent.mkdir(parents=True, exist_ok=True)
        settings_path(root, variant).write_text(json.dumps(settings, indent=2))


def build_trainer(variant: str, root: Path, device: torch.device, quiet_log: Path):
    """The variant's trainer, started (network, loss, loaders, privacy state; federated: round 1 begun).
    nnU-Net's own console output goes to ``quiet_log``."""
    from nnunetv2.run.run_training import get_trainer_from_args

    name = VARIANTS[variant][0]
    if variant != STANDARD:
        os.environ[ENV_VAR] = str(settings_path(root, variant))
    with open(quiet_log, "a") as f, contextlib.redirect_stdout(f):
        trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, FOLD, name, "nnUNetPlans", device=device)
        trainer.on_train_start()
    trainer.network.train()
    return trainer


def shut_down(trainer) -> None:
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        if hasattr(loader, "_finish"):
            loader._finish()


def clone_batch(batch: dict) -> dict:
    target = batch["target"]
    target = [t.clone() for t in target] if isinstance(target, list) else target.clone()
    return {"data": batch["data"].clone(), "target": target}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast_in_step(trainer, batch: dict) -> bool:
    """Whether the network's forward passes in one ``train_step`` ran under autocast (AMP), read from inside them."""
    seen = []
    hook = trainer.network.register_forward_pre_hook(
        lambda module, args: seen.append(torch.is_autocast_enabled(trainer.device.type)))
    try:
        trainer.train_step(clone_batch(batch))
    finally:
        hook.remove()
    return any(seen)


def timed_step(trainer, batch: dict, device: torch.device) -> float:
    batch = clone_batch(batch)  # fresh copy, outside the timed region
    sync(device)
    start = time.perf_counter()
    trainer.train_step(batch)
    sync(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- memory

def measure_memory_child(args) -> None:
    """Child process (CPU): one variant alone; print its peak RSS during steps above its RSS after set-up."""
    root = dataset_root(args)
    scale, num_cases, _, _ = profile(args)
    env = prepare_dataset(root, scale, num_cases, create=False)
    use_env(env)
    device = torch.device(args.device)
    trainer = build_trainer(args.measure_memory_of, root, device, root / "trainers.log")
    inputs = torch.load(root / "bench_inputs.pt", weights_only=False)
    trainer.network.load_state_dict(inputs["state_dict"])
    batches = inputs["batches"]
    trainer.train_step(clone_batch(batches[0]))  # warm-up: allocates optimizer state (momentum buffers)
    step_batches = [clone_batch(batches[(i + 1) % len(batches)]) for i in range(args.memory_steps)]
    peak_mib, method = peak_rss_mib(lambda: [trainer.train_step(batch) for batch in step_batches])
    shut_down(trainer)
    report_memory(args.measure_memory_of, peak_mib, method)


def memory_cpu(args, variants: list[str]) -> tuple[dict, str]:
    """Run every variant in its own child process, one after the other."""
    peaks, method = {}, ""
    for variant in variants:
        start = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-memory-of", variant, "--work-dir",
               args.work_dir, "--device", "cpu", "--memory-steps", str(args.memory_steps)]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--scale", str(args.scale)] if args.scale is not None else []
        peaks[variant], method = run_memory_child(cmd, variant)
        log(f"memory {variant}: {peaks[variant]:.0f} MiB ({time.perf_counter() - start:.0f} s in child process)")
    return peaks, method


def memory_cuda(trainers: dict, batches: list, steps: int, device: torch.device) -> tuple[dict, str]:
    """Per variant (warm already): peak allocated memory during ``steps`` steps above what was allocated before."""
    peaks = {}
    for variant, trainer in trainers.items():
        sync(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for i in range(steps):
            trainer.train_step(clone_batch(batches[i % len(batches)]))
        sync(device)
        peaks[variant] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        log(f"memory {variant}: {peaks[variant]:.0f} MiB")
    return peaks, "torch.cuda.max_memory_allocated during the steps minus memory allocated before them"


# ----------------------------------------------------------------------------- report

def step_setup(trainer, autocast: bool | None = None) -> str:
    """What the variant's step does, read from the started trainer (and ``autocast``: measured in a step)."""
    amp = "" if autocast is None else ("; AMP (autocast on)" if autocast else "; fp32 (autocast off)")
    if not hasattr(trainer, "privacy"):
        return "nnU-Net's batched step" + amp
    pv, s = trainer.privacy, trainer.dp_settings
    rule = trainer.rule.describe()
    parts = [" ".join([rule.pop("rule")] + [f"{k}={v}" for k, v in rule.items()]) + " clipping"]
    morph = trainer.plans_manager.plans.get("dp_morph")
    if morph is not None:
        ops = sorted(set(morph["operations"]) - {"none"})
        parts.append(f"morph {'/'.join(ops)}, kernel {morph['kernel']}")
    if hasattr(trainer, "client"):
        parts.append(f"site of a {len(trainer.client.cfg['sites'])}-site federation, round 1")
    if pv.get("masks") is not None:
        kept = sum(int(m.sum()) for m in pv["masks"])
        total = sum(m.numel() for m in pv["masks"])
        parts.append(f"step mask {s['adpfl_step_sparsity']} ({kept / total:.1%} of {total:,} coordinates)")
    if hasattr(trainer, "_schedule"):  # ADP-FL
        parts.append(f"adaptive clip {'on' if 'clip_tracker' in pv else 'off'}, "
                     f"noise schedule {s['adpfl_noise_schedule'] if s['noise_multiplier'] is None else 'constant'}")
    return "; ".join(parts) + amp


def summarise(times: dict[str, list[float]], peaks: dict[str, float] | None,
              setups: dict[str, str] | None = None) -> list[dict]:
    """Per variant: median and IQR of s/step, median of per-round ratios to standard, memory and its ratio."""
    return [{**ratio_row(times, variant, STANDARD, peaks), "setup": (setups or {}).get(variant, "")}
            for variant in times]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| variant | trainer | engine | median s/step | IQR s/step | median ratio vs standard | "
             "peak step memory (MiB) | memory ratio vs standard | step set-up |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        trainer, engine, _ = VARIANTS[r["variant"]]
        ratio, mem, mem_ratio = ratio_cells(r, r["variant"] == STANDARD)
        lines.append(f"| {r['variant']} | {trainer} | {engine or '-'} | {r['median_s']:.3f} | {r['iqr_s']:.3f} | "
                     f"{ratio} | {mem} | {mem_ratio} | {r['setup']} |")
    return "\n".join(lines)


def docs_section(info: dict, table: str) -> str:
    return "\n".join([
        "## DP step vs standard nnU-Net step (`scripts/bench_dp_step.py`"
        + (", GPU)" if info["device"] == "cuda" else ")"),
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['machine']}",
        f"- Command: `{info['command']}`",
        f"- Data and plan: synthetic kidney CT (`nnunet_adpfl.data.synthetic`, scale {info['scale']}, "
        f"{info['num_cases']} cases), `nnUNetv2_plan_and_preprocess -c {CONFIGURATION}`, fold {FOLD}",
        f"- Network: {info['arch']}, {info['num_params']:,} parameters; patch size {info['patch_size']}; "
        f"batch size {info['batch_size']} (as planned; every variant gets the same {NUM_BATCHES} batches, cycled)",
        f"- Steps: {info['steps']} timed per variant after {info['warmup']} warm-up, interleaved in rotating order; "
        "ratio = median over rounds of (variant time / standard time of the same round)",
        f"- Private variants: one `train_step` of the named trainer with noise multiplier {NOISE_MULTIPLIER} (fixed: "
        "no epsilon calibration), clip norm C = 1.0, the settings' defaults otherwise"
        + ("; whether a step ran under autocast is read from inside its forward passes (step set-up column)"
           if info["device"] == "cuda" else ""),
        "- Federated variants (dpfl, adpfl): the trainer as the one site of a fresh federation folder "
        "(`create_federation`, the benchmark's plan, round-0 global model from `Aggregator.ensure_initial_model`); "
        "the timed steps are local steps of round 1, no upload or aggregation",
        f"- Memory: {info['memory_method']}",
        "",
        table,
    ])


# ----------------------------------------------------------------------------- main

def selected_variants(text: str) -> list[str]:
    """The standard reference first, then the chosen private variants in VARIANTS order."""
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if not chosen or unknown:
        raise SystemExit(f"--variants: expected a comma-separated subset of {', '.join(VARIANTS)}, got {text!r}")
    return [STANDARD] + [v for v in VARIANTS if v in chosen and v != STANDARD]


def benchmark(args) -> None:
    if args.sweep or args.batch:
        return sweep(args)
    scale, num_cases, warmup, steps = profile(args)
    warmup = warmup if args.warmup is None else args.warmup
    steps = steps if args.steps is None else args.steps
    variants = selected_variants(args.variants)
    if steps < 1 or warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    command = shlex.join(["python", os.path.relpath(Path(__file__).resolve()), *sys.argv[1:]])
    log(f"command: {command}")
    log(f"machine: {machine_description(device)}")

    setup_start = time.perf_counter()
    root = dataset_root(args)
    env = prepare_dataset(root, scale, num_cases)
    use_env(env)
    prepare_variants(root, env, variants)
    torch.manual_seed(0)
    np.random.seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training

    trainers = {}
    for variant in variants:
        start = time.perf_counter()
        trainers[variant] = build_trainer(variant, root, device, root / "trainers.log")
        log(f"built {variant} ({type(trainers[variant]).__name__}: {step_setup(trainers[variant])}) in "
            f"{time.perf_counter() - start:.1f} s")
    std = trainers[STANDARD]
    state = {k: v.detach().clone() for k, v in std.network.state_dict().items()}
    for variant in variants[1:]:
        trainers[variant].network.load_state_dict(state)

    batches = []
    for _ in range(NUM_BATCHES):
        b = next(std.dataloader_train)
        batches.append({"data": b["data"].clone(), "target": [t.clone() for t in b["target"]]
                        if isinstance(b["target"], list) else b["target"].clone()})
        assert b["data"].shape[0] == std.batch_size, "standard loader returned a batch of another size"
    cm = std.configuration_manager
    info = {
        "date": datetime.date.today().isoformat(), "machine": machine_description(device), "command": command,
        "device": device.type, "scale": scale, "num_cases": num_cases, "arch": cm.network_arch_class_name.split(".")[-1],
        "num_params": sum(p.numel() for p in std.network.parameters()), "patch_size": list(cm.patch_size),
        "batch_size": std.batch_size, "steps": steps, "warmup": warmup,
    }
    log(f"network {info['arch']}: {info['num_params']:,} parameters; patch size {info['patch_size']}; "
        f"batch size {info['batch_size']}; input batch shape {list(batches[0]['data'].shape)}")
    log(f"set-up took {time.perf_counter() - setup_start:.0f} s")

    if device.type == "cpu" and not args.skip_memory:  # the children load the same weights and batches
        torch.save({"state_dict": state, "batches": batches}, root / "bench_inputs.pt")

    times: dict[str, list[float]] = {v: [] for v in variants}
    run_start = time.perf_counter()
    for i in range(warmup + steps):
        order = variants[i % len(variants):] + variants[:i % len(variants)]
        batch = batches[i % len(batches)]
        measured = {v: timed_step(trainers[v], batch, device) for v in order}
        if i >= warmup:
            for v in variants:
                times[v].append(measured[v])
        label = "warm-up" if i < warmup else "timed"
        log(f"round {i + 1}/{warmup + steps} ({label}): " + ", ".join(f"{v} {measured[v]:.2f} s" for v in variants)
            + f"; elapsed {time.perf_counter() - run_start:.0f} s")

    peaks, method = None, "not measured (--skip-memory)"
    if not args.skip_memory:
        log(f"measuring peak step memory ({args.memory_steps} steps per variant)")
        if device.type == "cuda":
            peaks, method = memory_cuda(trainers, batches, args.memory_steps, device)
        else:
            peaks, method = memory_cpu(args, variants)
    info["memory_method"] = method
    autocast = {v: autocast_in_step(t, batches[0]) for v, t in trainers.items()} if device.type == "cuda" else {}
    setups = {v: step_setup(t, autocast.get(v)) for v, t in trainers.items()}
    for trainer in trainers.values():
        shut_down(trainer)

    table = markdown_table(summarise(times, peaks, setups))
    print()
    print(table)
    print()
    log(f"{steps} timed steps per variant after {warmup} warm-up; memory: {method}")
    if args.output:
        update_section(Path(args.output), docs_section(info, table), MARKS[device.type])
        log(f"wrote section to {args.output}")


def sweep(args) -> None:
    """--sweep: the private step against the standard step at each batch size (dp_step_sweep.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import dp_step_sweep

    torch.manual_seed(0)
    command = shlex.join(["python", os.path.relpath(Path(__file__).resolve()), *sys.argv[1:]])
    write = (lambda text: update_section(Path(args.output), text, dp_step_sweep.marks(args))) if args.output else None
    print(dp_step_sweep.run_sweep(args, log, machine_description(torch.device("cpu")), command, write))
    if args.output:
        log(f"wrote section to {args.output}")


def chunk_size(text: str) -> int | str:
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="./work_dirs/bench",
                        help="folder for the dataset, nnU-Net's files and logs; reused between runs "
                             "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per variant (default: {PROFILES['full'][3]}, smoke {PROFILES['smoke'][3]})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed warm-up rounds (default: {PROFILES['full'][2]}, smoke {PROFILES['smoke'][2]})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v != STANDARD),
                        help="comma-separated private variants to time against the standard step "
                             "(default: all: %(default)s)")
    parser.add_argument("--scale", type=float, default=None,
                        help=f"synthetic dataset scale, which sets the planned patch and network (default: "
                             f"{PROFILES['full'][0]}, smoke {PROFILES['smoke'][0]}); its own folder in --work-dir")
    parser.add_argument("--output", default=None,
                        help="Markdown file whose bench_dp_step section is created/replaced, e.g. docs/BENCHMARKS.md "
                             "(default: print only)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny end-to-end check: dataset scale 0.5, 8 cases, 2 warm-up + 2 timed steps")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="steps per variant for the peak-memory measurement, after one warm-up step "
                             "(default: %(default)s)")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak step memory")
    group = parser.add_argument_group("batch-size sweep (--sweep): network-level private vs standard step, CPU")
    group.add_argument("--sweep", action="append", choices=("2d", "3d"), default=[],
                       help="run the sweep on the 2D and/or 3D network (repeatable; default with --batch: both); "
                            "ignores the options above except --output and --skip-memory")
    group.add_argument("--batch", default=None,
                       help="comma-separated batch sizes B (default: 2D 2,8,32,64,128,256; 3D 2,4,8,16,32)")
    group.add_argument("--engines", default="auto",
                       help="comma-separated private variants: engine[/cCHUNK][+bf16], engine in auto, loop, vmap, "
                            "hooks, ghost (default: %(default)s)")
    group.add_argument("--chunk", type=chunk_size, default="auto",
                       help="cases per batched pass where a variant names no /cCHUNK: an integer or 'auto' (as "
                            "max_physical_batch_size 'auto': the largest chunk that fits 25%% of the available RAM "
                            "and 320 MiB; default: %(default)s)")
    group.add_argument("--rounds", type=int, default=3, help="timed rounds per B (default: %(default)s)")
    group.add_argument("--sweep-warmup", type=int, default=1, help="warm-up rounds per B (default: %(default)s)")
    parser.add_argument("--measure-memory-of", metavar="VARIANT", default=None,
                        help="internal: run only VARIANT in this process and print its peak step memory (CPU)")
    return parser


def main(argv: list[str] | None = None) -> None:
    run_benchmark_cli(build_parser(), benchmark, measure_memory_child, argv)


if __name__ == "__main__":
    main()
