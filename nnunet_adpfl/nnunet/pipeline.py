"""Run the stock nnU-Net commands (plan, train, predict) in a self-contained folder."""
from __future__ import annotations

import os
import re
import shutil
import signal
from collections import deque
import subprocess
import sys
import time
from pathlib import Path

from .paths import trainers_path


DEVICE_VAR = "nnUNet_adpfl_device"


def workflow_device() -> str:
    """Device of the workflows' training and prediction commands: ``$nnUNet_adpfl_device`` (e.g. cuda), else cpu."""
    return os.environ.get(DEVICE_VAR) or "cpu"


def nnunet_env(root: str | Path, settings_file: str | Path | None = None, **extra: str) -> dict:
    """Environment for nnU-Net commands with raw/preprocessed/results under ``root``, our trainers on
    ``nnUNet_extTrainer`` and CPU-friendly defaults (no torch.compile, export workers <= cores)."""
    root = Path(root)
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        # ours first, the user's own trainer folders kept
        "nnUNet_extTrainer": os.pathsep.join(dict.fromkeys(
            [trainers_path(), *[p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]])),
        "nnUNet_compile": env.get("nnUNet_compile", "f"),
        # nnU-Net's default of 8 spawned export workers costs ~30 s per case on a 2-core machine
        "nnUNet_def_n_proc": env.get("nnUNet_def_n_proc", str(min(os.cpu_count() or 1, 4))),
        "PYTHONUNBUFFERED": "1",  # logs of long runs stream instead of appearing at exit
    })
    if settings_file is not None:
        env["nnUNet_adpfl_config"] = str(settings_file)
    env.update(extra)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def nnunet_command(name: str) -> str:
    """Path of an nnU-Net console script next to this interpreter (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


EXCEPTION_LINE = re.compile(r"(?:[A-Za-z_][\w.]*)?(Error|Exception): ")  # a Python exception's last line
DIVERGED = "Encountered inf in predicted array"  # nnU-Net's predictor, on a model whose logits overflowed


def exit_status(code: int) -> str:
    """A finished command's return code in words; a negative code is the signal that killed it."""
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if code == -signal.SIGKILL:
        name += (" (often the system's out-of-memory killer: run fewer trainings at once or give the machine "
                 "more memory)")
    return f"killed by {name}"


def describe_exits(codes: dict[str, int]) -> str:
    """``{name: return code}`` in words, e.g. "A: killed by SIGKILL (...); B: exit status 1"."""
    return "; ".join(f"{name}: {exit_status(code)}" for name, code in codes.items())


def stop(procs) -> None:
    """Terminate still-running commands started with ``start_new_session=True``, with their process groups
    (nnU-Net's data-loader workers included); SIGKILL after 30 s."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        os.killpg(p.pid, signal.SIGTERM)
    for p in running:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run(args: list[str], env: dict, log_file: str | Path | None = None, echo: bool = False) -> float:
    """Run a command; its output goes to ``log_file`` (and the console if ``echo``). Raises with the log's
    tail on failure. Returns the wall time in seconds."""
    start = time.time()
    args = [nnunet_command(args[0]), *args[1:]]
    lines: deque[str] = deque(maxlen=40)  # the tail, for the error message
    first_error = None  # the first exception line: the cause, when teardown errors follow it
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "a", buffering=1) if log_file else None  # line-buffered: follow it live
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            lines.append(line)
            if first_error is None and EXCEPTION_LINE.match(line):
                first_error = line.strip()
            if log:
                log.write(line)
            if echo:
                print(line, end="", flush=True)
    except BaseException:  # interrupted (SIGTERM included): stop the command and its workers, not only wait
        stop([proc])
        raise
    finally:
        proc.stdout.close()
        if log:
            log.close()
    code = proc.wait()
    if code != 0:
        raise _command_failed(args, code, first_error, lines)
    return time.time() - start


def _command_failed(args: list[str], code: int, first_error: str | None, tail: "list[str] | deque[str]") -> RuntimeError:
    cause = f"first error: {first_error}\n" if first_error else ""
    return RuntimeError(f"command failed ({exit_status(code)}): {' '.join(args)}\n{cause}--- last output ---\n"
                        f"{''.join(tail)}")


def wait_all(procs: dict[str, subprocess.Popen], interval: float = 0.2, on_poll=None) -> dict[str, int]:
    """Until every process has exited or one has failed (``on_poll()`` called between polls); returns the failed
    ones' exit statuses, empty when all succeeded."""
    while True:
        failed = {n: p.returncode for n, p in procs.items() if p.poll() not in (None, 0)}
        if failed or all(p.poll() is not None for p in procs.values()):
            return failed
        if on_poll is not None:
            on_poll()
        time.sleep(interval)


def run_together(jobs: dict[str, tuple[list[str], dict, Path]]) -> None:
    """Run independent commands at once (``{name: (args, env, log_file)}``: the sites of a simulated federation,
    each on its own machine in a real one), each's output appended to its log. If one fails, or this process is
    interrupted, the others are stopped; the error names the first that failed, with its new log's tail."""
    procs, offsets = {}, {}
    try:
        for name, (args, env, log_file) in jobs.items():
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "ab") as log:
                offsets[name] = log.tell()
                procs[name] = subprocess.Popen([nnunet_command(args[0]), *args[1:]], env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
        failed = wait_all(procs)
    finally:
        stop(procs.values())  # a no-op once all have exited
    if failed:
        name, code = next(iter(failed.items()))
        args, _, log_file = jobs[name]
        with open(log_file, "rb") as log:
            log.seek(offsets[name])
            lines = log.read().decode(errors="replace").splitlines(keepends=True)
        first_error = next((line.strip() for line in lines if EXCEPTION_LINE.match(line)), None)
        raise RuntimeError(f"{name}: {_command_failed(args, code, first_error, lines[-40:])}")


def predict(images: Path, output: Path, dataset_id: int, config: str, trainer: str, env: dict, log_file: Path,
            file_ending: str, fold: str = "0") -> Path:
    """``nnUNetv2_predict`` with the fold's final checkpoint on ``workflow_device()``, unless every image already has
    its prediction (an interrupted run continues where it stopped)."""
    cases = {p.name[:-len(f"_0000{file_ending}")] for p in Path(images).glob(f"*_0000{file_ending}")}
    if not all((Path(output) / f"{case}{file_ending}").exists() for case in cases):
        run(["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", str(dataset_id), "-c", config, "-f", fold,
             "-tr", trainer, "-device", workflow_device(), "-npp", "1", "-nps", "1", "--continue_prediction"], env,
            log_file)
    return Path(output)
