"""``nnunet-adpfl pretrain-public``: public weights for private fine-tuning (DESIGN.md section 8).

A public cohort of the task (synthetic: disjoint cases from another scanner, ``synthetic.generate_dataset(...,
public=True)``; in practice a public dataset of the same task) -> the federation's plan installed for it ->
nnU-Net's preprocessing -> standard (non-private) nnU-Net training on all of it (fold ``all``). The resulting
``checkpoint_final.pth`` has the federation's architecture, so it can be the federation's round-0 model
(``federation init --initial-weights``) or a site's ``nnUNetv2_train ... -pretrained_weights``.
Resumable: finished stages are kept.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..common.atomic import write_json_atomic
from ..common.initial_weights import file_sha256
from ..federation.aggregator import load_federation
from ..nnunet.pipeline import nnunet_command, nnunet_env, run
from ..data.synthetic import TASKS, generate_dataset
from ..training.clip_calibration import CALIBRATION_FILE, read_suggested_clip
from .stages import install_plan_and_preprocess

PUBLIC_DATASET_ID = 502
TRAINER = "nnUNetTrainerBaselineBudget"
CALIBRATION_TRAINER = "nnUNetTrainerDPClipCalibration"
CALIBRATION_KEYS = ("dp_trainable", "augmentation_multiplicity", "expected_batch_size")  # what the norms depend on
CALIBRATION_BATCHES = 25


def _log(msg: str) -> None:
    print(f"[pretrain-public {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def standard_checkpoint(work: Path, dataset_name: str, config: str) -> Path:
    return Path(work) / "nnUNet_results" / dataset_name / f"{TRAINER}__nnUNetPlans__{config}" / "fold_all" / \
        "checkpoint_final.pth"


def train_standard(fed: Path, raw: Path, dataset: Path, work: Path, epochs: int, iterations: int,
                   lr: float | None = None, seed: int | None = None) -> Path:
    """Standard nnU-Net (fold ``all``) on the raw ``dataset`` (a folder of ``raw``) with the federation's plan;
    preprocessing and results under ``work``. With ``seed`` the training is reproducible (seeded, one seeded
    augmentation worker). Returns the final checkpoint (kept: a second call only returns it)."""
    work = Path(work).resolve()
    config = load_federation(fed)["configuration"]
    dataset_id = int(dataset.name[len("Dataset"):].split("_")[0])
    checkpoint = standard_checkpoint(work, dataset.name, config)
    if checkpoint.exists():
        return checkpoint
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    settings = logs / "settings.json"
    settings.write_text(json.dumps({"num_epochs": epochs, "num_iterations_per_epoch": iterations,
                                    "num_val_iterations_per_epoch": 1,
                                    **({} if lr is None else {"initial_lr": lr}),
                                    **({} if seed is None else {"seed": seed})}, indent=2))
    env = nnunet_env(work, settings, nnUNet_raw=str(Path(raw).resolve()))
    if not (Path(env["nnUNet_preprocessed"]) / dataset.name / f"nnUNetPlans_{config}").exists():
        _log(f"installing the federation's plan and preprocessing {dataset.name}")
        install_plan_and_preprocess(Path(fed), dataset_id, config, env, logs / "preprocess.log")
    _log(f"training standard nnU-Net on {dataset.name}: {epochs} epochs x {iterations} steps (log: "
         f"{logs / 'train.log'})")
    if seed is not None:
        env = {**env, "nnUNet_n_proc_DA": "1"}  # one seeded worker: several hand out batches as they finish
    run([nnunet_command("nnUNetv2_train"), str(dataset_id), config, "all", "-tr", TRAINER, "-device", "cpu"], env,
        logs / "train.log")
    return checkpoint


def pretrain_public(fed: Path, task: str, work: Path, num_cases: int, scale: float, seed: int, epochs: int,
                    iterations: int, lr: float | None = None, dataset_id: int = PUBLIC_DATASET_ID) -> Path:
    """Train standard nnU-Net on the task's public cohort with the federation's plan, seeded by ``seed`` (the
    cohort's and the training's); returns its checkpoint."""
    raw = Path(work).resolve() / "nnUNet_raw"
    folder = next(raw.glob(f"Dataset{dataset_id:03d}_*"), None)
    if folder is not None and (folder / "sites.json").exists():
        check_public_cohort(folder, task, num_cases, scale, seed)
    else:
        _log(f"writing the public '{task}' cohort ({num_cases} cases at scale {scale:g}, another scanner than the "
             "private sites)")
        folder = generate_dataset(task, raw, dataset_id, num_cases=num_cases, num_sites=1, num_test_cases=0,
                                  seed=seed, scale=scale, public=True)
    checkpoint = train_standard(fed, raw, folder, work, epochs, iterations, lr, seed)
    _log(f"public weights: {checkpoint}")
    return checkpoint


def check_public_cohort(folder: Path, task: str, num_cases: int, scale: float, seed: int) -> None:
    """A kept public cohort (and so the model trained on it) is reused only if it was written with these
    arguments; otherwise a clear error instead of silently pretraining on another cohort."""
    meta = json.loads((folder / "sites.json").read_text())
    written = {"task": meta["task"], "cases": sum(len(c) for c in meta["sites"].values()), "scale": meta["scale"],
               "seed": meta["seed"]}
    wanted = {"task": task, "cases": num_cases, "scale": scale, "seed": seed}
    if written != wanted:
        differ = ", ".join(f"{k} {written[k]} (now {wanted[k]})" for k in wanted if written[k] != wanted[k])
        raise SystemExit(f"error: the public cohort in {folder} was written with {differ}; its model would be "
                         "reused as it is: use another work dir for another public cohort")


def calibrate_clip(work: Path, dataset: str, config: str, checkpoint: Path, private_settings: dict) -> float:
    """The clip norm for private runs from ``checkpoint``: median per-case gradient norm of the public cohort (trained
    by :func:`pretrain_public` in ``work``) at those weights, with the private runs' trainable parameters,
    augmentation multiplicity and expected batch (``nnUNetTrainerDPClipCalibration``; no private data, no privacy
    cost). ``dataset``: the public dataset's folder name in ``work``'s nnU-Net folders. Kept: recomputed only when
    those settings or the weights change."""
    work = Path(work).resolve()
    result = work / "nnUNet_results" / dataset / f"{CALIBRATION_TRAINER}__nnUNetPlans__{config}" / "fold_all" / \
        CALIBRATION_FILE
    wanted = {k: private_settings[k] for k in CALIBRATION_KEYS if private_settings.get(k) is not None}
    kept = json.loads(result.read_text()) if result.exists() else {}
    if kept.get("settings") != wanted or kept.get("initial_weights", {}).get("file_sha256") != file_sha256(checkpoint):
        logs = work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        settings = logs / "calibration_settings.json"
        settings.write_text(json.dumps({**wanted, "num_epochs": 1, "num_iterations_per_epoch": CALIBRATION_BATCHES},
                                       indent=2))
        _log(f"clip calibration: per-case gradient norms of the public cohort at {checkpoint} (log: "
             f"{logs / 'calibration.log'})")
        run([nnunet_command("nnUNetv2_train"), dataset[len("Dataset"):].split("_")[0], config, "all", "-tr",
             CALIBRATION_TRAINER, "-pretrained_weights", str(checkpoint), "-device", "cpu"],
            nnunet_env(work, settings), logs / "calibration.log")
        write_json_atomic(result, {**json.loads(result.read_text()), "settings": wanted})
    clip = read_suggested_clip(result)
    _log(f"clip norm from the public cohort: {clip:.4g} (median per-case gradient norm; {result})")
    return clip


def add_cli(sub) -> None:
    p = sub.add_parser("pretrain-public", help="standard nnU-Net on a public cohort with a federation's plan: the "
                                               "initial weights for private fine-tuning")
    p.add_argument("federation_dir", help="a federation folder with its plan ('nnunet-adpfl plan' done)")
    p.add_argument("--task", choices=TASKS, required=True, help="synthetic task of the public cohort")
    p.add_argument("--work-dir", default="work_dirs/public", help="where the public cohort, its preprocessing and "
                                                                  "the model go")
    p.add_argument("--num-cases", type=int, default=60)
    p.add_argument("--scale", type=float, default=0.5, help="as for the private data (same task geometry)")
    p.add_argument("--seed", type=int, default=0, help="seed of the public cohort and of its training (reproducible: "
                                                      "one seeded augmentation worker)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=25, help="steps per epoch")
    p.add_argument("--lr", type=float, default=None, help="default nnU-Net's 0.01")
    p.set_defaults(func=_cmd)


def _cmd(a) -> int:
    checkpoint = pretrain_public(Path(a.federation_dir), a.task, Path(a.work_dir), a.num_cases, a.scale, a.seed,
                                 a.epochs, a.iterations, a.lr)
    print(f"{checkpoint}\nuse it as the round-0 model: nnunet-adpfl federation init ... --initial-weights "
          f"{checkpoint}\nor at a single site: nnUNetv2_train ... -pretrained_weights {checkpoint}")
    return 0
