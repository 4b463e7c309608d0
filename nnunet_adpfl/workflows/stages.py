"""The stages the workflows compose (simulate, fed-compare, compare, demo), each resumable: its output is kept
and reused when present.

    stage_data       synthetic multi-site data, split into one raw dataset per site
    stage_plan       per-site aggregate fingerprints -> one federated plan -> per-site preprocessing
    new_run          a federation folder for one more training run with that plan
    train_federated  the aggregator and every site's stock ``nnUNetv2_train``, as separate processes
    summarise        per-site validation (finished if a site died during it) and privacy reports, the final
                     global model on the test set, bytes exchanged
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..data.synthetic import generate_dataset, split_by_site
from ..data.tasks import published_cohort
from ..evaluation import evaluation
from ..evaluation.evaluation import mean_per_label
from ..federation import files as ff
from ..federation.aggregator import create_federation, load_federation
from ..federation.federation_file import adopt_plan
from ..nnunet.pipeline import (describe_exits, nnunet_command, nnunet_env, predict, run, run_together, stop,
                               wait_all, workflow_device)

DATASET_ID = 501
CONFIGURATION = {"skin": "2d", "kidney": "3d_fullres", "brain": "3d_fullres", "kidney_roi": "3d_fullres"}
MODE_OF_TRAINER = {"nnUNetTrainerFL": "npfl", "nnUNetTrainerDPFL": "dpfl", "nnUNetTrainerADPFL": "adpfl"}


def _log(msg: str) -> None:
    print(f"[workflow {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nnunet_adpfl.cli", *args]


class Layout:
    """Folders of a simulated federation. ``run`` names one training run (its federation folder and the sites'
    results), so several runs can share the data, plan and preprocessing."""

    def __init__(self, work: Path, sites: list[str], run: str = "federation", dataset_id: int = DATASET_ID):
        self.work = work
        self.dataset_id = dataset_id
        self.fed = work / run
        self.results = work / f"results_{run}"
        self.keys = work / "coordinator" / "keys"
        self.pool = work / "pooled_raw"
        self.sites_raw = work / "sites_raw"
        self.logs = work / "logs" / run
        self.sites = sites

    def site_root(self, site: str) -> Path:
        return self.work / f"site_{site}"

    def site_env(self, site: str, settings: Path | None = None, **extra) -> dict:
        """nnU-Net's environment at a simulated site. The sites share this machine's cores: each gets its share of
        nnU-Net's validation and export workers (the user's ``nnUNet_def_n_proc`` wins). On 2 cores a site's final
        validation took half the time with 1 worker than with 2 (27-29 s against 50-64 s, 3 sites' runs beside)."""
        workers = os.environ.get("nnUNet_def_n_proc") or str(max(1, min(4, (os.cpu_count() or 1) // len(self.sites))))
        return nnunet_env(self.site_root(site), settings, nnUNet_raw=str(self.sites_raw / site),
                          nnUNet_results=str(self.results / site), **{"nnUNet_def_n_proc": workers, **extra})


def stage_data(lay: Layout, task: str, num_cases: int, scale: float, seed: int, num_test_cases: int = 4,
               cohort_size: str = "small") -> Path:
    """The pooled synthetic dataset (``cohort_size`` "published": the public dataset's size per site, its scale and
    test set, written by parallel workers) split into one raw dataset per site; resumes a crashed write."""
    pooled = next(lay.pool.glob(f"Dataset{lay.dataset_id:03d}_*"), None)
    if pooled is None or not (pooled / "sites.json").exists():
        _log(f"writing a synthetic '{task}' dataset ({cohort_size} cohort) split over {len(lay.sites)} sites")
        if cohort_size == "published":
            size = {**published_cohort(task, len(lay.sites)), "workers": min(8, os.cpu_count() or 1), "progress": True}
        else:
            size = {"num_cases": num_cases, "num_sites": len(lay.sites), "num_test_cases": num_test_cases, "scale": scale}
        pooled = generate_dataset(task, lay.pool, lay.dataset_id, seed=seed, **size)
    split_sites(lay, pooled)
    return pooled


def split_sites(lay: Layout, pooled: Path) -> None:
    """Each site's raw dataset (its training cases and the test set) from the pooled one, unless already there."""
    if not all((lay.sites_raw / s / pooled.name / "dataset.json").exists() for s in lay.sites):
        split_by_site(pooled, lay.sites_raw)


def _install_plan_command(fed: Path, dataset_id: int, site: str | None, key_file: Path | None) -> list[str]:
    key = [] if site is None else ["--site", site, "--key-file", str(key_file)]
    return _cli("install-plan", str(fed), "-d", str(dataset_id), *key)


def _preprocess_command(dataset_id: int, config: str) -> list[str]:
    return ["nnUNetv2_preprocess", "-d", str(dataset_id), "-c", config, "-np", "1"]


def install_plan_and_preprocess(fed: Path, dataset_id: int, config: str, env: dict, log: Path,
                                site: str | None = None, key_file: Path | None = None) -> None:
    """The federation's plan into ``env``'s nnUNet_preprocessed (authenticated with the site's key when given),
    then nnU-Net's preprocessing with it."""
    run(_install_plan_command(fed, dataset_id, site, key_file), env, log)
    run(_preprocess_command(dataset_id, config), env, log)


def stage_plan(lay: Layout, pooled: Path, config: str, max_features: int | None = None) -> None:
    """The sites' steps run at once, as on their own machines; the coordinator's plan between them."""
    fed_cfg = load_federation(lay.fed)
    missing = [s for s in lay.sites if not (lay.fed / "fingerprints" / f"{s}.json").exists()]
    if missing:
        _log(f"sites {', '.join(missing)}: sharing their aggregate fingerprints")
        run_together({s: (_cli("fingerprint", str(lay.fed), "--site", s, "--key-file", str(lay.keys / f"{s}.key"),
                               "-d", str(lay.dataset_id), "-np", "1"), lay.site_env(s),
                          lay.logs / f"fingerprint_{s}.log") for s in missing})
    if fed_cfg.get("plans_sha256") is None:
        _log("coordinator: planning once for all sites with nnU-Net's planner on the merged fingerprint")
        width = [] if max_features is None else ["--max-features", str(max_features)]
        run(_cli("plan", str(lay.fed), "--keys-dir", str(lay.keys), "-d", str(lay.dataset_id), "--dataset-name",
                 pooled.name.split("_", 1)[1], "--work-dir", str(lay.work / "coordinator" / "planner"), *width),
            nnunet_env(lay.work / "coordinator" / "planner"), lay.logs / "plan.log")
    envs = {s: lay.site_env(s) for s in lay.sites}
    todo = [s for s in lay.sites
            if not (Path(envs[s]["nnUNet_preprocessed"]) / pooled.name / f"nnUNetPlans_{config}").exists()]
    if todo:
        _log(f"sites {', '.join(todo)}: installing the federation plan and preprocessing")
        run_together({s: (_install_plan_command(lay.fed, lay.dataset_id, s, lay.keys / f"{s}.key"), envs[s],
                          lay.logs / f"preprocess_{s}.log") for s in todo})
        run_together({s: (_preprocess_command(lay.dataset_id, config), envs[s], lay.logs / f"preprocess_{s}.log")
                      for s in todo})


def _settings_file(lay: Layout, site: str) -> Path:
    return lay.logs / "settings" / f"{site}.json"


def _train_command(lay: Layout, trainer: str, config: str) -> list[str]:
    """The site's stock training command (fold 0, on ``workflow_device()``: CPU unless $nnUNet_adpfl_device)."""
    return [nnunet_command("nnUNetv2_train"), str(lay.dataset_id), config, "0", "-tr", trainer, "-device",
            workflow_device()]


def _site_settings(lay: Layout, site: str, settings: dict) -> Path:
    path = _settings_file(lay, site)
    path.parent.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // len(lay.sites))  # the sites share this machine's cores
    path.write_text(json.dumps({"federation_dir": str(lay.fed), "site_id": site, "num_threads": threads,
                                "site_key_file": str(lay.keys / f"{site}.key"), **settings}, indent=2))
    return path


def start_aggregator(lay: Layout) -> subprocess.Popen:
    lay.logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(_cli("aggregate", str(lay.fed), "--keys-dir", str(lay.keys), "--poll-interval", "1"),
                            stdout=open(lay.logs / "aggregator.log", "a"), stderr=subprocess.STDOUT,
                            env=nnunet_env(lay.work / "coordinator" / "planner"), start_new_session=True)


def start_site(lay: Layout, site: str, trainer: str, config: str, settings: dict,
               n_proc_da: str = "1") -> subprocess.Popen:
    """The site's stock training command (the same command restarts it)."""
    env = lay.site_env(site, _site_settings(lay, site, settings), nnUNet_n_proc_DA=n_proc_da)
    return subprocess.Popen(_train_command(lay, trainer, config), stdout=open(lay.logs / f"train_{site}.log", "a"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def new_run(lay: Layout, planned_fed: Path, mode: str, rounds: int, epochs_per_round: int, iterations: int,
            config: str, seed: int, initial_weights: Path | None = None,
            release_ema_decay: float | None = None) -> None:
    """A federation folder for one more training run on the same data, reusing the plan of ``planned_fed``."""
    create_federation(lay.fed, lay.keys, lay.sites, rounds, epochs_per_round, mode,
                      iterations_per_epoch=iterations, configuration=config, seed=seed,
                      initial_weights=initial_weights, release_ema_decay=release_ema_decay)
    adopt_plan(lay.fed, lay.keys, Path(planned_fed))  # the plan files, checked, and federation.json signed again


def train_federated(lay: Layout, trainer: str, config: str, settings: dict, rounds: int) -> float:
    """The aggregator and every site's stock training command, until all have exited; they are stopped (with
    their data-loader workers) however this ends: an error, Ctrl-C or SIGTERM."""
    start, procs = time.time(), {}
    try:
        procs["aggregator"] = start_aggregator(lay)
        for site in lay.sites:
            procs[site] = start_site(lay, site, trainer, config, settings)
        _log(f"aggregator and {len(lay.sites)} site{'s' * (len(lay.sites) != 1)} started (logs in {lay.logs})")
        _wait_for_federation(lay, procs, rounds, start)
    finally:
        stop(procs.values())
    failed = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
    if failed:
        raise RuntimeError(_failure_message(failed, lay.logs))
    return time.time() - start


def closed_rounds_logger(fed: Path, rounds: int, start: float, log=_log):
    """A callable that logs the rounds of ``fed`` closed since its last call."""
    reported = 0

    def log_closed_rounds() -> None:
        nonlocal reported
        closed = sum(1 for r in range(1, rounds + 1) if ff.global_paths(fed, r)[1].exists())
        if closed > reported:
            reported = closed
            log(f"round {closed}/{rounds} closed ({time.time() - start:.0f} s)")
    return log_closed_rounds


def _wait_for_federation(lay: Layout, procs: dict, rounds: int, start: float) -> None:
    """Until every party has exited, logging each closed round; raises when one fails."""
    failed = wait_all(procs, interval=2, on_poll=closed_rounds_logger(lay.fed, rounds, start))
    if failed:
        raise RuntimeError(_failure_message(failed, lay.logs))


def _failure_message(failed: dict[str, int], logs: Path) -> str:
    """Which parties failed and how (exit status or killing signal), with the last line of each one's log
    (usually the exception)."""
    lines = [f"{list(failed)} failed ({describe_exits(failed)}); see {logs}"]
    for name in failed:
        log = logs / ("aggregator.log" if name == "aggregator" else f"train_{name}.log")
        last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
        lines.append(f"{name}: {last[-1].strip() if last else '(no output)'}")
    return "\n".join(lines)


def bytes_exchanged(fed: Path) -> tuple[int, int]:
    up = sum(p.stat().st_size for p in fed.glob("round_*/updates/*") if p.is_file())
    down = sum(p.stat().st_size for p in fed.glob("round_*/global.*"))
    return up, down


def summarise(lay: Layout, trainer: str, config: str, pooled: Path, wall: float | None) -> dict:
    cfg = load_federation(lay.fed)
    per_site = {}
    for site in lay.sites:
        fold = (Path(lay.site_env(site)["nnUNet_results"]) / pooled.name / f"{trainer}__nnUNetPlans__{config}" /
                "fold_0")
        val = json.loads(site_validation(lay, site, trainer, config, fold).read_text())["foreground_mean"]["Dice"]
        report = fold / "privacy_report.json"
        eps = json.loads(report.read_text())["epsilon"] if report.exists() else None
        per_site[site] = {"validation_dice": val, "epsilon": eps}
    pred = predict_test(lay, trainer, config, pooled)
    up, down = bytes_exchanged(lay.fed)
    return {"trainer": trainer, "mode": cfg["mode"], "rounds": cfg["rounds"], "sites": per_site,
            "global_test_dice": evaluate_folder(pooled, pred), "bytes_uploaded": up, "bytes_downloaded_per_site": down,
            "wall_time_s": wall}


def site_validation(lay: Layout, site: str, trainer: str, config: str, fold: Path) -> Path:
    """The site's validation summary. A site whose process ended during nnU-Net's final validation (after its
    final checkpoint) gets it from the stock ``nnUNetv2_train ... --val`` with the run's settings."""
    summary = fold / "validation" / "summary.json"
    if summary.exists():
        return summary
    if not (fold / "checkpoint_final.pth").exists():
        raise FileNotFoundError(f"site {site}: no final checkpoint in {fold}: its training did not finish "
                                f"(log: {lay.logs / f'train_{site}.log'})")
    settings = _settings_file(lay, site)
    if not settings.exists():
        raise FileNotFoundError(f"site {site}: final validation missing and the run's settings file {settings} is "
                                "gone: nnUNetv2_train --val needs the settings the site trained with")
    _log(f"site {site}: final validation missing; running nnUNetv2_train --val")
    run([*_train_command(lay, trainer, config), "--val"], lay.site_env(site, settings),
        lay.logs / f"validate_{site}.log")
    return summary


def predict_test(lay: Layout, trainer: str, config: str, pooled: Path) -> Path:
    """The final global model (held by every site; the first site's copy) predicts the pooled test images."""
    ending = json.loads((pooled / "dataset.json").read_text())["file_ending"]
    return predict(pooled / "imagesTs", lay.results / "predictions" / trainer, lay.dataset_id, config, trainer,
                   lay.site_env(lay.sites[0]), lay.logs / "predict.log", ending)


def evaluate_folder(dataset_folder: Path, prediction_folder: Path) -> dict:
    """Mean Dice per label/region over the test cases (NaN-aware)."""
    return mean_per_label(evaluation.evaluate_folder(dataset_folder, prediction_folder, metrics=("dice",)))
