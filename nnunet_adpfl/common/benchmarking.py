"""Measurement helpers the benchmarks in scripts/ share: peak resident memory of a piece of work (in a child
process, so one variant's allocations do not hide another's), the machine's description, and the docs section a
benchmark writes its table into."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import resource
import subprocess
from pathlib import Path

import numpy as np
import torch

MEMORY_TAG = "BENCH_MEMORY "


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if unavailable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap to the OS so it is not counted as baseline


def peak_rss_mib(work) -> tuple[float, str]:
    """Runs ``work()``; returns its peak resident memory above the resident memory before it (MiB) and the method."""
    _release_free_memory()
    exact = _reset_peak_rss()
    base_kib = _status_kib("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    work()
    peak_kib = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    method = ("peak RSS (VmHWM, reset after set-up) minus RSS after set-up" if exact
              else "ru_maxrss increase over set-up (lower bound: set-up peak may hide the step peak)")
    return (peak_kib - base_kib) / 1024, method


def report_memory(label: str, peak_mib: float, method: str) -> None:
    """Child process: the line ``run_memory_child`` reads."""
    print(MEMORY_TAG + json.dumps({"variant": label, "peak_mib": peak_mib, "method": method}), flush=True)


def run_benchmark_cli(parser, benchmark, measure_memory_child, argv: list[str] | None = None) -> None:
    """A benchmark script's main(): the benchmark, or (``--measure-memory-of``) one variant's memory child."""
    args = parser.parse_args(argv)
    (measure_memory_child if args.measure_memory_of else benchmark)(args)


def run_memory_child(cmd: list[str], label: str) -> tuple[float, str]:
    """Runs a memory child process; returns its (peak MiB, method)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MEMORY_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory child for {label} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MEMORY_TAG):])
    return result["peak_mib"], result["method"]


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    text = (f"{cpu}, {os.cpu_count()} logical cores ({torch.get_num_threads()} torch threads), "
            f"torch {torch.__version__}, device {device.type}")
    if device.type == "cuda":
        text += f" ({torch.cuda.get_device_name(device)})"
    return text


def update_section(path: Path, section: str, marks: tuple[str, str]) -> None:
    """Replace the text between the markers ``marks`` in ``path`` (create the file, or append the section, if needed)."""
    mark_start, mark_end = marks
    block = f"{mark_start}\n{section.strip()}\n{mark_end}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    start, end = text.find(mark_start), text.find(mark_end)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(mark_end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def ratio_row(times: dict[str, list[float]], variant: str, reference: str, peaks: dict[str, float] | None) -> dict:
    """One variant's median and IQR of seconds, median over rounds of (its time / the reference's in the same
    round), and peak memory with its ratio to the reference's."""
    ts = np.array(times[variant])
    q1, q3 = np.percentile(ts, [25, 75])
    row = {"variant": variant, "median_s": float(np.median(ts)), "iqr_s": float(q3 - q1)}
    if variant != reference:
        row["ratio"] = float(np.median(ts / np.array(times[reference])))
    if peaks is not None:
        row["peak_mib"] = peaks[variant]
        if variant != reference and peaks[reference] > 0:
            row["mem_ratio"] = peaks[variant] / peaks[reference]
    return row


def ratio_cells(row: dict, is_reference: bool) -> tuple[str, str, str]:
    """Table cells of a :func:`ratio_row`: time ratio, peak MiB, memory ratio."""
    ref = "reference" if is_reference else "n/a"
    ratio = f"{row['ratio']:.2f}" if "ratio" in row else ref
    mem = f"{row['peak_mib']:.0f}" if "peak_mib" in row else "not measured"
    mem_ratio = f"{row['mem_ratio']:.2f}" if "mem_ratio" in row else (ref if "peak_mib" in row else "not measured")
    return ratio, mem, mem_ratio
