"""``nnunet-adpfl compare``: standard nnU-Net (centralised on the pooled data), local-only training per site, NP-FL,
DP-FL, ADP-FL and any of our trainers by name, on one dataset with one shared plan, the same epochs budget and one
held-out test set; Dice, HD95 and NSD per case, a report folder with tables and plots (compare_report.py).

Every method runs through the stock nnU-Net commands (``nnUNetv2_train``, ``nnUNetv2_predict``); federated methods
run as a simulated federation (nnunet_adpfl.simulate: aggregator and sites as processes). Resumable: each finished
run keeps its record in <work-dir>/runs/<run>.json and is skipped; an interrupted training continues from its
checkpoint.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import pkgutil
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..federation import files as ff
from ..common.atomic import write_bytes_atomic
from ..federation.aggregator import create_federation
from ..evaluation.evaluation import METRICS, evaluate_folder, summarise_cases
from ..nnunet.pipeline import DIVERGED, EXCEPTION_LINE, nnunet_env, predict, run
from ..privacy.report import REPORT_NAME
from .stages import (Layout, bytes_exchanged, stage_plan, train_federated, install_plan_and_preprocess, new_run,
                     split_sites)
from ..data.synthetic import TASKS, generate_dataset

ALIASES = {"centralized": "nnUNetTrainerBaselineBudget", "local": "nnUNetTrainerBaselineBudget",
           "npfl": "nnUNetTrainerFL", "dpfl": "nnUNetTrainerDPFL", "adpfl": "nnUNetTrainerADPFL"}
DEFAULT_METHODS = "centralized,local,npfl,dpfl,adpfl"


def _log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def trainer_class(name: str):
    """The trainer class ``nnUNetv2_train -tr name`` would use: ours (``trainers/``) or nnU-Net's own."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from ..nnunet.paths import trainers_path

    if trainers_path() not in sys.path:
        sys.path.insert(0, trainers_path())
    for module in pkgutil.iter_modules([trainers_path()]):
        cls = getattr(importlib.import_module(module.name), name, None)
        if cls is not None:
            return cls
    import nnunetv2
    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                      "nnunetv2.training.nnUNetTrainer")
    if cls is None or not issubclass(cls, nnUNetTrainer):
        raise SystemExit(f"error: no nnU-Net trainer named '{name}' (methods: {', '.join(ALIASES)} or a trainer "
                         "class name, e.g. nnUNetTrainerDPSGD)")
    return cls


@dataclass
class Run:
    name: str  # row of the report
    method: str  # as asked for
    trainer: str
    kind: str  # centralized | local | federated
    site: str | None = None
    epsilon: float | None = None  # target; None: not private
    mode: str | None = None  # federation mode

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.name.lower()).strip("_")


def plan_runs(methods: list[str], sites: list[str], epsilons: list[float]) -> list[Run]:
    from ..training.adpfl_trainer import FederatedADPTrainer
    from ..training.dp_trainer import nnUNetTrainerDP
    from ..federation.site import FederatedTrainerMixin
    from ..training.fed_trainers import FederatedDPTrainer

    runs = []
    for method in methods:
        trainer = ALIASES.get(method, method)
        cls = trainer_class(trainer)
        private = issubclass(cls, nnUNetTrainerDP)
        if method == "local":
            runs += [Run(f"local {site}", method, trainer, "local", site=site) for site in sites]
            continue
        kind, mode = "centralized", None
        if issubclass(cls, FederatedTrainerMixin):
            kind = "federated"
            mode = ("adpfl" if issubclass(cls, FederatedADPTrainer) else
                    "dpfl" if issubclass(cls, FederatedDPTrainer) else "npfl")
        if private:
            runs += [Run(f"{method} eps={eps:g}", method, trainer, kind, epsilon=eps, mode=mode) for eps in epsilons]
        else:
            runs.append(Run(method, method, trainer, kind, mode=mode))
    seen = {}
    for r in runs:
        key = (r.trainer, r.kind, r.site, r.epsilon)
        if key in seen:
            raise SystemExit(f"error: methods repeat a run: '{seen[key]}' and '{r.name}' train the same")
        seen[key] = r.name
    return runs


class Comparison:
    """Folders and shared stages (data, plan, preprocessing) of one comparison."""

    def __init__(self, a):
        self.a = a
        self.work = Path(a.work_dir).resolve()
        self.runs_dir = self.work / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.pooled = self._stage_pooled()
        meta = json.loads((self.pooled / "sites.json").read_text())
        self.site_cases = meta["sites"]
        self.sites = list(self.site_cases) if a.sites is None else [s for s in a.sites.split(",") if s]
        unknown = set(self.sites) - set(self.site_cases)
        if unknown or len(self.sites) < 2:
            raise SystemExit(f"error: --sites must name at least two sites of {self.pooled / 'sites.json'} "
                             f"({', '.join(self.site_cases)}); unknown: {sorted(unknown)}")
        small = {s: len(self.site_cases[s]) for s in self.sites if len(self.site_cases[s]) < 5}
        if small:
            raise SystemExit(f"error: sites {small} have fewer than 5 training cases; nnU-Net's 5-fold split needs 5")
        self.dataset_json = json.loads((self.pooled / "dataset.json").read_text())
        self.ending = self.dataset_json["file_ending"]
        if not any((self.pooled / "labelsTs").glob(f"*{self.ending}")):
            raise SystemExit(f"error: {self.pooled} has no held-out test set (imagesTs + labelsTs)")
        self.config = a.configuration or ("2d" if self.ending == ".png" else "3d_fullres")
        self.plan = Layout(self.work, self.sites, "plan", dataset_id=a.dataset)

    def _stage_pooled(self) -> Path:
        a = self.a
        if a.synthetic:
            pool = self.work / "pooled_raw"
            pooled = next(pool.glob(f"Dataset{a.dataset:03d}_*"), None)
            if pooled is None or not (pooled / "sites.json").exists():
                _log(f"writing a synthetic '{a.synthetic}' dataset: {a.num_cases} training cases over "
                     f"{a.num_sites} sites, {a.num_test_cases} test cases")
                pooled = generate_dataset(a.synthetic, pool, a.dataset, num_cases=a.num_cases, num_sites=a.num_sites,
                                          num_test_cases=a.num_test_cases, seed=a.seed, scale=a.scale)
            return pooled
        raw = Path(a.raw or os.environ.get("nnUNet_raw", ""))
        pooled = next(raw.glob(f"Dataset{a.dataset:03d}_*"), None) if raw.name else None
        if pooled is None:
            raise SystemExit(f"error: no Dataset{a.dataset:03d}_* in --raw / $nnUNet_raw ({raw}); or use --synthetic")
        if not (pooled / "sites.json").exists():
            raise SystemExit(f"error: {pooled / 'sites.json'} is missing: it assigns the training cases to sites, "
                             '{"sites": {"A": ["case_001", ...], "B": [...]}}')
        return pooled

    def stage_plan(self) -> None:
        """Split the pooled training cases by site, plan once for all sites, preprocess every site."""
        lay = self.plan
        split_sites(lay, self.pooled)
        lay.logs.mkdir(parents=True, exist_ok=True)
        if not (lay.fed / ff.FEDERATION_FILE).exists():
            create_federation(lay.fed, lay.keys, self.sites, self.a.rounds, 1, "npfl",
                              iterations_per_epoch=self.a.iterations, configuration=self.config, seed=self.a.seed)
        stage_plan(lay, self.pooled, self.config, self.a.max_features)

    def centralized_env(self) -> dict:
        """The pooled data with the same federated plan, preprocessed once for every centralised run."""
        root = self.work / "centralized"
        env = nnunet_env(root, nnUNet_raw=str(self.pooled.parent))
        if not (Path(env["nnUNet_preprocessed"]) / self.pooled.name / f"nnUNetPlans_{self.config}").exists():
            _log("pooled data: installing the shared plan and preprocessing")
            install_plan_and_preprocess(self.plan.fed, self.a.dataset, self.config, env, root / "preprocess.log")
        return env

    def settings(self, r: Run) -> dict:
        a = self.a
        s = {"num_val_iterations_per_epoch": 1, "seed": a.seed, **a.extra_settings}
        if a.lr is not None:
            s["initial_lr"] = a.lr
        if r.kind != "federated":
            s.update(num_epochs=a.rounds, num_iterations_per_epoch=a.iterations)
        if r.epsilon is not None:
            s.update(target_epsilon=r.epsilon, delta=a.delta, max_grad_norm=a.clip)
            if a.batch_size:
                s["expected_batch_size"] = a.batch_size
        return s


def _fold(results: Path, c: Comparison, trainer: str) -> Path:
    return Path(results) / c.pooled.name / f"{trainer}__nnUNetPlans__{c.config}" / "fold_0"


def _curves(fold: Path) -> dict:
    """Per-epoch training curves from the final checkpoint's logging (loss, pseudo Dice, epsilon). A DP run logs
    NaN as its training loss there (it is unnoised): the site's own local_only_log.json holds the real one."""
    import torch

    from ..privacy.local_log import read_local_log

    logging = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    keys = {"train_losses": "train_loss", "val_losses": "val_loss", "mean_fg_dice": "pseudo_dice",
            "epsilon": "epsilon"}
    curves = {name: [float(v) for v in logging[key]] for key, name in keys.items() if logging.get(key)}
    local_loss = read_local_log(fold).get("train_loss", [])
    if not any(math.isfinite(v) for v in curves.get("train_loss", [])) and any(math.isfinite(v) for v in local_loss):
        curves["train_loss"] = local_loss
    return curves


def _timed(wall_file: Path, train) -> None:
    """Run ``train()``, adding its wall time (interrupted attempts included) to ``wall_file``."""
    start = time.time()
    try:
        train()
    finally:
        before = json.loads(wall_file.read_text()) if wall_file.exists() else 0.0
        wall_file.parent.mkdir(parents=True, exist_ok=True)
        wall_file.write_text(json.dumps(before + time.time() - start))


def _train_single(c: Comparison, r: Run, env: dict, results: Path, logs: Path) -> None:
    """One ``nnUNetv2_train`` (centralised or local), continued from its checkpoint after an interruption."""
    settings = logs / "settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(c.settings(r), indent=2))
    env = {**env, "nnUNet_results": str(results), "nnUNet_adpfl_config": str(settings), "nnUNet_n_proc_DA": "1"}
    run(["nnUNetv2_train", str(c.a.dataset), c.config, "0", "-tr", r.trainer, "-device", "cpu", "--c"], env,
        logs / "train.log")


def execute(c: Comparison, r: Run) -> dict:
    """Train (unless done), predict the test set, evaluate; the run's record."""
    results = c.work / "results" / r.slug
    logs = c.work / "logs" / r.slug
    wall_file = logs / "train_wall_time.json"
    up = down = None
    if r.kind == "federated":
        lay = Layout(c.work, c.sites, r.slug, dataset_id=c.a.dataset)
        lay.results = results
        if not (lay.fed / ff.FEDERATION_FILE).exists():
            new_run(lay, c.plan.fed, r.mode, c.a.rounds, 1, c.a.iterations, c.config, c.a.seed)
        if not ff.global_paths(lay.fed, c.a.rounds)[1].exists():
            _timed(wall_file, lambda: train_federated(lay, r.trainer, c.config, c.settings(r), c.a.rounds))
        folds = {site: _fold(results / site, c, r.trainer) for site in c.sites}
        env = lay.site_env(c.sites[0])
        up, down = bytes_exchanged(lay.fed)
    else:
        env = c.centralized_env() if r.kind == "centralized" else c.plan.site_env(r.site)
        if not (_fold(results, c, r.trainer) / "checkpoint_final.pth").exists():
            _timed(wall_file, lambda: _train_single(c, r, env, results, logs))
        folds = {r.site or "pooled": _fold(results, c, r.trainer)}
        env = {**env, "nnUNet_results": str(results)}
    pred = predict(c.pooled / "imagesTs", c.work / "predictions" / r.slug, c.a.dataset, c.config, r.trainer, env,
                   logs / "predict.log", c.ending)
    cases = evaluate_folder(c.pooled, pred, c.a.metrics, c.a.nsd_tolerance, c.a.regions, add_foreground=True)
    privacy = {site: json.loads((f / REPORT_NAME).read_text()) for site, f in folds.items()
               if (f / REPORT_NAME).exists()}
    return {**asdict(r), "slug": r.slug, "cases": cases, "summary": summarise_cases(cases),
            "epsilon_spent": max((p["epsilon"] for p in privacy.values()), default=None),
            "delta": next((p["delta"] for p in privacy.values()), None),
            "train_wall_time_s": json.loads(wall_file.read_text()) if wall_file.exists() else None,
            "bytes_uploaded": up, "bytes_global_models": down, "rounds": c.a.rounds,
            "curves": _curves(next(iter(folds.values()))), "predictions": str(pred)}


def run_comparison(a) -> tuple[Path, list[dict]]:
    from ..evaluation.compare_report import write_report

    start = time.time()
    c = Comparison(a)
    runs = plan_runs(a.methods, c.sites, a.epsilons)
    _log(f"{len(runs)} runs on {c.pooled.name} ({c.config}; sites {', '.join(c.sites)}): "
         + ", ".join(r.name for r in runs))
    c.stage_plan()
    records, failures = [], []
    for i, r in enumerate(runs, 1):
        record_file = c.runs_dir / f"{r.slug}.json"
        if record_file.exists():
            records.append(json.loads(record_file.read_text()))
            _log(f"[{i}/{len(runs)}] {r.name}: done before, kept")
            continue
        _log(f"[{i}/{len(runs)}] {r.name}: {r.trainer} ({r.kind}), {a.rounds} epochs/rounds x {a.iterations} steps "
             f"(logs: {c.work / 'logs' / r.slug})")
        t = time.time()
        try:
            record = execute(c, r)
        except RuntimeError as e:  # a command failed (e.g. a diverged model): report it, go on with the others
            reason = _failure_reason(str(e))
            failures.append({"name": r.name, "method": r.method, "trainer": r.trainer, "epsilon": r.epsilon,
                             "reason": reason,
                             "logs": str(c.work / "logs" / r.slug)})
            _log(f"[{i}/{len(runs)}] {r.name}: FAILED ({reason}); logs: {c.work / 'logs' / r.slug}. Going on; the "
                 "next invocation retries it")
            continue
        write_bytes_atomic(record_file, json.dumps(record, indent=1).encode())  # NaN kept: undefined metrics
        records.append(record)
        dice = {k: round(v["mean"], 3) for k, v in record["summary"]["dice"].items()}
        _log(f"[{i}/{len(runs)}] {r.name}: test Dice {dice} ({time.time() - t:.0f} s; {time.time() - start:.0f} s "
             "so far)")
    report = write_report(records, c, Path(a.output) if a.output else c.work / "report", failures)
    _log(f"report: {report / 'report.md'} ({time.time() - start:.0f} s)")
    if failures:
        _log(f"{len(failures)} of {len(runs)} runs failed: {', '.join(f['name'] for f in failures)} (listed in the "
             "report)")
    return report, failures


def _failure_reason(message: str) -> str:
    """The informative line of a failed command's message: the first error ``pipeline.run`` names, else its last
    exception line, else its first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    first = [line.removeprefix("first error: ") for line in lines if line.startswith("first error: ")]
    errors = first or [line for line in lines if EXCEPTION_LINE.search(line)][-1:]
    reason = (errors[0] if errors else lines[0] if lines else "unknown error")[:300]
    if DIVERGED in reason:
        reason += (" [the model diverged: its logits overflowed; at this epsilon and data size the noise is too "
                   "large for the learning rate: lower --lr, or raise --batch-size, the number of cases or epsilon]")
    return reason


def _floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v]
    if not values or any(v <= 0 for v in values):
        raise ValueError("epsilons must be positive numbers")
    return values


def _regions(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, labels = text.partition("=")
    if not name or not labels:
        raise ValueError("a region is NAME=LABEL,LABEL,...")
    return name, tuple(int(v) for v in labels.split(","))


def _cmd_table(a) -> int:
    from ..evaluation.compare_report import task_table

    print(task_table(a.reports))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("compare-table", help="method x dataset table of mean Dice from several compare reports")
    p.add_argument("reports", nargs="+", type=Path, help="report folders (<work-dir>/report) of 'nnunet-adpfl compare'")
    p.set_defaults(func=_cmd_table)
    p = sub.add_parser("compare", help="standard nnU-Net vs local, NP-FL, DP-FL, ADP-FL (and trainers by name): "
                                       "train, predict a held-out test set, report with metrics and plots",
                       description=__doc__)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", type=int, default=501, help="dataset id (default 501)")
    data.add_argument("--raw", default=None, help="folder holding DatasetXXX_* (default $nnUNet_raw); the dataset needs "
                      "sites.json ({\"sites\": {site: [case ids]}}) and a held-out imagesTs/labelsTs")
    data.add_argument("--synthetic", choices=TASKS, default=None,
                      help="write a synthetic multi-site dataset of this task into the work dir instead")
    data.add_argument("--num-cases", type=int, default=36, help="synthetic: training cases over all sites")
    data.add_argument("--num-sites", type=int, default=3, help="synthetic: number of sites")
    data.add_argument("--num-test-cases", type=int, default=6, help="synthetic: held-out test cases")
    data.add_argument("--scale", type=float, default=0.25, help="synthetic: spatial scale")
    p.add_argument("--work-dir", default="work_dirs/compare")
    p.add_argument("--output", default=None, help="report folder (default <work-dir>/report)")
    p.add_argument("--sites", default=None, help="comma-separated sites of sites.json (default: all)")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=DEFAULT_METHODS.split(","),
                   help=f"comma-separated: {', '.join(ALIASES)} or trainer class names (default {DEFAULT_METHODS})")
    p.add_argument("--epsilons", type=_floats, default=[1.0, 4.0, 8.0],
                   help="target epsilons of every private method (default 1,4,8)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the federations = epochs of the other methods")
    p.add_argument("--iterations", type=int, default=10, help="training steps per round/epoch (and site)")
    p.add_argument("--batch-size", type=int, default=None, help="expected (Poisson) batch of the private runs "
                   "(default: the plan's batch size)")
    p.add_argument("--clip", type=float, default=1.0, help="clip norm C of the private runs")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate of every run (default: nnU-Net's "
                   "0.01)")
    p.add_argument("--max-features", type=int, default=32, help="network width cap of the shared plan "
                   "(0: nnU-Net's own width)")
    p.add_argument("--configuration", default=None, help="default: 2d for .png datasets, else 3d_fullres")
    p.add_argument("--settings", default=None, help="JSON settings added to every run (e.g. ADP-FL switches)")
    p.add_argument("--metrics", type=lambda s: tuple(m for m in s.split(",") if m), default=METRICS,
                   help=f"default {','.join(METRICS)}")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    p.add_argument("--regions", type=_regions, action="append", default=[],
                   help="extra region to evaluate, NAME=LABEL,LABEL (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd)


def _cmd(a) -> int:
    a.command_line = "nnunet-adpfl compare " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["compare"] else None
    a.regions = dict(a.regions)
    a.max_features = a.max_features or None
    a.extra_settings = json.loads(Path(a.settings).read_text()) if a.settings else {}
    if shutil.which("nnUNetv2_train") is None and not (Path(sys.executable).parent / "nnUNetv2_train").exists():
        raise SystemExit("error: nnUNetv2_train not found; install nnunetv2 in this environment")
    _, failures = run_comparison(a)
    return 1 if failures else 0
