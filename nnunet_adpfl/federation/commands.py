"""Federation commands: federation init, fingerprint, plan, install-plan, aggregate."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import files as ff
from .aggregator import Aggregator, create_federation, plans_files
from .federation_file import (PLAN_FILES, load_federation, load_site_keys, open_federation, plan_digests, plan_json,
                              read_plan_bytes, read_plan_files, sign_plan, site_federation, write_federation,
                              write_plan_files)


def _dataset_folder(root_env: str, dataset_id: int) -> Path:
    root = os.environ.get(root_env)
    if not root:
        raise SystemExit(f"error: ${root_env} is not set")
    matches = sorted(Path(root).glob(f"Dataset{dataset_id:03d}_*"))
    if not matches:
        raise SystemExit(f"error: no Dataset{dataset_id:03d}_* in ${root_env} ({root})")
    return matches[0]


def fingerprint_path(fed: Path, site: str) -> Path:
    return Path(fed) / "fingerprints" / f"{site}.json"


def cmd_init(a) -> int:
    try:
        cfg = create_federation(Path(a.federation_dir), Path(a.keys_dir), [s for s in a.sites.split(",") if s],
                                a.rounds, a.epochs_per_round, a.mode, a.iterations_per_epoch, a.configuration, a.quorum,
                                a.round_timeout, a.seed, a.initial_weights, a.release_ema)
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"federation {cfg['id']} created in {a.federation_dir}: sites {cfg['sites']}, {cfg['rounds']} rounds x "
          f"{cfg['epochs_per_round']} epochs, mode {cfg['mode']}")
    print(f"site keys written to {a.keys_dir}: give each site ONLY its own <site>.key (out of band); the "
          "aggregator needs all of them. Never put keys in the shared folder.")
    return 0


def cmd_sign(a) -> int:
    """Coordinator: sign federation.json (and record the plan files' sha256) of a folder made before federation.json
    was signed. It vouches for the files as they are now: check them first."""
    from .plan import plans_digest

    fed, keys_dir = Path(a.federation_dir), Path(a.keys_dir)
    cfg = _checked(lambda: load_federation(fed))
    planned = cfg.get("plans_sha256") is not None
    if planned:  # each plan file read once: the bytes checked are the bytes signed
        data = _checked(lambda: read_plan_bytes(fed))
        if plans_digest(_checked(lambda: plan_json(fed, PLAN_FILES[0], data[PLAN_FILES[0]]))) != cfg["plans_sha256"]:
            raise SystemExit(f"error: {plans_files(fed)[0]} does not match plans_sha256 in federation.json")
    _checked(lambda: write_federation(fed, cfg, load_site_keys(keys_dir, cfg["sites"])))
    if planned:
        _checked(lambda: sign_plan(fed, keys_dir, cfg["plans_sha256"], plan_digests(data)))
    print(f"federation.json in {fed} signed for {cfg['sites']}")
    return 0


def cmd_fingerprint(a) -> int:
    """At a site: nnU-Net's fingerprint stays local; only its aggregate summary goes to the shared folder."""
    from .summary import site_summary_from_folders
    from ..nnunet.pipeline import run

    key = ff.load_key(a.key_file)
    cfg = _checked(lambda: site_federation(Path(a.federation_dir), a.site, key))
    raw = _dataset_folder("nnUNet_raw", a.dataset_id)
    local = Path(os.environ["nnUNet_preprocessed"]) / raw.name / "dataset_fingerprint.json"
    if not local.exists():
        print(f"extracting nnU-Net's fingerprint of {raw.name} locally")
        run(["nnUNetv2_extract_fingerprint", "-d", str(a.dataset_id), "-np", str(a.num_processes)], dict(os.environ),
            echo=True)
    summary = site_summary_from_folders(raw, local.parent)
    content = {"kind": "fingerprint", "federation": cfg["id"], "site": a.site, "summary": summary}
    content["hmac"] = ff.mac(key, content)
    ff.write_json_in(Path(a.federation_dir), fingerprint_path(Path(a.federation_dir), a.site), content)
    print(f"aggregate fingerprint of site {a.site} ({summary['num_cases']} cases) written to "
          f"{fingerprint_path(Path(a.federation_dir), a.site)}")
    return 0


def cmd_plan(a) -> int:
    """Coordinator: merge the sites' aggregate fingerprints and run nnU-Net's planner once for everyone."""
    from .plan import cap_features, plan_federated, plans_digest
    from .summary import merge_summaries

    fed = Path(a.federation_dir)
    cfg, keys = _checked(lambda: open_federation(fed, Path(a.keys_dir)))
    summaries = [_site_summary(fed, cfg["id"], site, keys[site]) for site in cfg["sites"]]
    try:
        fingerprint, dataset_json = merge_summaries(summaries)
    except Exception as e:  # noqa: BLE001  (each merges on its own: they disagree)
        raise SystemExit(f"error: the sites' fingerprints cannot be merged ({str(e)[:300]}; sites "
                         f"numbered from 0 in the order {cfg['sites']})") from None
    plans = plan_federated(summaries, a.dataset_id, a.dataset_name, Path(a.work_dir),
                           configurations=(cfg["configuration"],))
    if a.max_features is not None:
        plans = cap_features(plans, a.max_features)
    contents = dict(zip(PLAN_FILES, (plans, dataset_json, fingerprint)))
    written = write_plan_files(fed, {name: json.dumps(c, indent=2, allow_nan=False).encode()
                                     for name, c in contents.items()})
    cfg = sign_plan(fed, Path(a.keys_dir), plans_digest(plans), written)  # what was written, not read back
    plans_file = plans_files(fed)[0]
    c = plans["configurations"][cfg["configuration"]]
    print(f"federation plan written to {plans_file} (sha256 {cfg['plans_sha256'][:12]}...): {cfg['configuration']} "
          f"patch {c['patch_size']}, batch {c['batch_size']}, spacing {[round(x, 3) for x in c['spacing']]}")
    return 0


def _site_summary(fed: Path, federation_id: str, site: str, key: bytes) -> dict:
    """The summary in fingerprints/<site>.json, signed by the site for this federation, and mergeable on its own
    (a replayed signed file, e.g. an update manifest, or a malformed summary ends 'plan' naming the site)."""
    from .summary import merge_summaries

    path = fingerprint_path(fed, site)
    try:
        content = ff.read_manifest(fed, path)
    except FileNotFoundError:
        raise SystemExit(f"error: no fingerprint from site {site} yet ({path})") from None
    except ff.Rejected as e:
        raise SystemExit(f"error: fingerprint of site {site} refused: {e.reason}") from None
    if not ff.mac_ok(key, content, content.get("hmac")) or content.get("federation") != federation_id:
        raise SystemExit(f"error: fingerprint of site {site} fails its HMAC or belongs to another federation")
    summary = content.get("summary")
    if content.get("kind") != "fingerprint" or content.get("site") != site or not isinstance(summary, dict):
        raise SystemExit(f"error: {path} is not a fingerprint of site {site} (kind {str(content.get('kind'))[:40]!r}, "
                         f"site {str(content.get('site'))[:80]!r}): a replayed file? Run 'fingerprint' at {site} again")
    try:
        merge_summaries([summary])
    except Exception as e:  # noqa: BLE001  (signed by the site, still untrusted input)
        raise SystemExit(f"error: fingerprint of site {site} cannot be merged ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    return summary


def cmd_install_plan(a) -> int:
    """The plan files are checked against federation.json, and that against the site's HMAC (--site/--key-file);
    without them, only the trainer's check of the plans' digest (at training) stands between a forged plan and
    the site."""
    from .plan import install_plans

    fed = Path(a.federation_dir)
    if (a.site is None) != (a.key_file is None):
        raise SystemExit("error: give both --site and --key-file (or neither)")
    if a.site is not None:
        cfg = _checked(lambda: site_federation(fed, a.site, ff.load_key(a.key_file)))
    else:
        cfg = _checked(lambda: load_federation(fed))
        print("warning: plan not authenticated (pass --site and --key-file); the trainer still checks the plans' "
              "digest against federation.json")
    files = _checked(lambda: read_plan_files(fed, cfg))
    raw = _dataset_folder("nnUNet_raw", a.dataset_id)
    target = Path(os.environ["nnUNet_preprocessed"]) / raw.name
    # the merged fingerprint replaces the local one, so model folders a site releases carry no per-case values
    path = _checked(lambda: install_plans(files[PLAN_FILES[0]], target, raw.name, fingerprint=files[PLAN_FILES[2]]))
    print(f"federation plan installed as {path}; now run: nnUNetv2_preprocess -d {a.dataset_id} "
          f"-c {cfg['configuration']}")
    return 0


def _checked(load):
    """Run ``load``; a refused federation.json, plan or key file ends the command with its reason (no traceback)."""
    try:
        return load()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def cmd_aggregate(a) -> int:
    log = lambda msg: print(f"[aggregator {ff.now()}] {msg}", flush=True)  # noqa: E731
    agg = _checked(lambda: Aggregator(Path(a.federation_dir), Path(a.keys_dir), poll_interval=a.poll_interval, log=log))
    last = _checked(agg.run)
    print(f"[aggregator {ff.now()}] federation finished after round {last}", flush=True)
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("federation", help="create a federation folder")
    fsub = p.add_subparsers(dest="federation_command", required=True)
    q = fsub.add_parser("init", help="write federation.json and the site keys")
    q.add_argument("federation_dir")
    q.add_argument("--sites", required=True, help="comma-separated site names, e.g. A,B,C")
    q.add_argument("--rounds", type=int, required=True)
    q.add_argument("--epochs-per-round", type=int, default=1)
    q.add_argument("--iterations-per-epoch", type=int, default=None, help="default: nnU-Net's 250")
    q.add_argument("--mode", choices=("npfl", "dpfl", "adpfl"), required=True)
    q.add_argument("--configuration", default="3d_fullres")
    q.add_argument("--quorum", type=int, default=None, help="sites needed to close a round after the timeout "
                                                             "(default: all)")
    q.add_argument("--round-timeout", type=float, default=None, help="seconds before a round may close with a quorum")
    q.add_argument("--keys-dir", required=True, help="where to write the site keys (NOT the shared folder)")
    q.add_argument("--seed", type=int, default=0, help="seed of the initial model")
    q.add_argument("--initial-weights", default=None, help="public weights for round 0 (nnU-Net checkpoint_final.pth "
                   "or .safetensors trained with the federation's plan, e.g. by 'nnunet-adpfl pretrain-public'); "
                   "default: nnU-Net's random initialisation")
    q.add_argument("--release-ema", type=float, default=None, metavar="DECAY",
                   help="the sites' final model = EMA of the global models of rounds 1..R with this decay (free "
                        "post-processing of released models); default: the last global model")
    q.set_defaults(func=cmd_init)
    q = fsub.add_parser("sign", help="sign federation.json of a folder made before it was signed (check it first)")
    q.add_argument("federation_dir")
    q.add_argument("--keys-dir", required=True)
    q.set_defaults(func=cmd_sign)

    p = sub.add_parser("fingerprint", help="at a site: share the aggregate fingerprint of dataset -d")
    p.add_argument("federation_dir")
    p.add_argument("--site", required=True)
    p.add_argument("--key-file", required=True)
    p.add_argument("-d", "--dataset-id", type=int, required=True)
    p.add_argument("-np", "--num-processes", type=int, default=2)
    p.set_defaults(func=cmd_fingerprint)

    p = sub.add_parser("plan", help="coordinator: one nnU-Net plan from the sites' aggregate fingerprints")
    p.add_argument("federation_dir")
    p.add_argument("--keys-dir", required=True)
    p.add_argument("-d", "--dataset-id", type=int, required=True)
    p.add_argument("--dataset-name", required=True, help="e.g. SynthKidney (the DatasetXXX_ suffix)")
    p.add_argument("--work-dir", default="work_dirs/federated_plan", help="scratch folder for nnU-Net's planner")
    p.add_argument("--max-features", type=int, default=None,
                   help="cap the network width per stage (a DP preset: fewer parameters, less noise norm)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("install-plan", help="at a site: install the federation plan before nnUNetv2_preprocess")
    p.add_argument("federation_dir")
    p.add_argument("-d", "--dataset-id", type=int, required=True)
    p.add_argument("--site", default=None, help="this site's id: with --key-file, the plan is authenticated")
    p.add_argument("--key-file", default=None, help="this site's key file")
    p.set_defaults(func=cmd_install_plan)

    p = sub.add_parser("aggregate", help="coordinator: run the aggregator (restartable)")
    p.add_argument("federation_dir")
    p.add_argument("--keys-dir", required=True)
    p.add_argument("--poll-interval", type=float, default=2.0)
    p.set_defaults(func=cmd_aggregate)
