"""Federated nnU-Net planning (nnunet_adpfl.federation.summary, .plan): aggregate-only site summaries, merging,
planning with nnU-Net's own planner, and installing the plans at a site before the real ``nnUNetv2_preprocess``."""
from __future__ import annotations

import copy
import json
import os
import time
from multiprocessing.pool import ThreadPool
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nnunet_adpfl.federation import plan as fed_plan
from nnunet_adpfl.federation import summary as fed_summary
from nnunet_adpfl.federation.plan import install_plans, plan_federated, plans_digest
from nnunet_adpfl.federation.summary import QUANTILES, merge_summaries, site_summary

DATASET = "Dataset501_SynthKidney"
SUMMARY_KEYS = {
    "format", "num_cases", "quantile_levels", "spacing_quantiles", "shape_quantiles", "extent_quantiles",
    "median_relative_size_after_cropping", "foreground_intensity_properties_per_channel", "image_reader_writer",
    "channel_names", "labels", "file_ending", "regions_class_order",
}


def _env(root: Path) -> dict:
    """nnU-Net environment with raw/preprocessed/results under ``root``."""
    env = dict(os.environ)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / key).mkdir(parents=True, exist_ok=True)
        env[key] = str(root / key)
    env.update(nnUNet_def_n_proc="1", nnUNet_compile="f")
    return env


def _extract_fingerprint(env: dict) -> dict:
    """nnU-Net's DatasetFingerprintExtractor for the dataset in ``env``'s folders, run in this process: its
    nnUNet_raw/nnUNet_preprocessed pointed at them, a thread pool instead of spawned workers and 1e6 instead of
    1e8 sampled foreground voxels (the same statistics; saves ~15 s per dataset on 2 cores). Returns the
    dataset_fingerprint.json it wrote, as a site would read it."""
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor as fe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "nnUNet_raw", env["nnUNet_raw"])
        mp.setattr(fe, "nnUNet_preprocessed", env["nnUNet_preprocessed"])
        mp.setattr(fe, "multiprocessing", SimpleNamespace(get_context=lambda _: SimpleNamespace(Pool=ThreadPool)))
        extractor = fe.DatasetFingerprintExtractor(DATASET, num_processes=1)
        extractor.show_progress_bar = False
        extractor.num_foreground_voxels_for_intensitystats = 1e6
        extractor.run(overwrite_existing=True)
    return json.loads((Path(env["nnUNet_preprocessed"]) / DATASET / "dataset_fingerprint.json").read_text())


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Three sites of a 12-case kidney dataset: their fingerprints and summaries, the federated plans, and the
    plans of nnU-Net's normal planning on the pooled dataset."""
    from nnunet_adpfl.nnunet.pipeline import run
    from nnunet_adpfl.data.synthetic import generate_dataset, split_by_site

    root, timings = tmp_path_factory.mktemp("fed_plan"), {}
    start = time.time()
    pooled_env = _env(root / "pooled")
    pooled = generate_dataset("kidney", pooled_env["nnUNet_raw"], 501, num_cases=12, num_sites=3,
                              num_test_cases=0, scale=0.5)
    folders = split_by_site(pooled, root / "sites_raw")
    site_envs = {}
    for site, folder in folders.items():
        site_envs[site] = env = _env(root / "sites" / site)
        env["nnUNet_raw"] = str(folder.parent)
    timings["generate"] = time.time() - start

    start = time.time()
    fingerprints = {site: _extract_fingerprint(env) for site, env in site_envs.items()}
    summaries = {site: fed_summary.site_summary_from_folders(folders[site], Path(env["nnUNet_preprocessed"]) / DATASET)
                 for site, env in site_envs.items()}
    timings["site fingerprints + summaries"] = time.time() - start

    start = time.time()
    plans = plan_federated(list(summaries.values()), 501, "SynthKidney", root / "coordinator")
    timings["plan_federated"] = time.time() - start

    start = time.time()
    pooled_fingerprint = _extract_fingerprint(pooled_env)
    run(["nnUNetv2_plan_experiment", "-d", "501"], pooled_env, root / "pooled_plan.log")
    pooled_plans = json.loads((Path(pooled_env["nnUNet_preprocessed"]) / DATASET / "nnUNetPlans.json").read_text())
    timings["pooled fingerprint + plan"] = time.time() - start
    print("\nfed_plan fixture timings (s):", {k: round(v, 1) for k, v in timings.items()})
    return SimpleNamespace(root=root, pooled=pooled, folders=folders, site_envs=site_envs, fingerprints=fingerprints,
                           summaries=summaries, plans=plans, pooled_plans=pooled_plans,
                           pooled_fingerprint=pooled_fingerprint)


def _lists(obj, path=""):
    """(path, list) for every list anywhere in a JSON object."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _lists(value, f"{path}/{key}")
    elif isinstance(obj, list):
        yield path, obj
        for i, value in enumerate(obj):
            yield from _lists(value, f"{path}[{i}]")


def test_summary_holds_aggregates_only(federation):
    sites_meta = json.loads((federation.pooled / "sites.json").read_text())
    case_ids = [case for cases in sites_meta["sites"].values() for case in cases]
    assert case_ids
    for site, summary in federation.summaries.items():
        text = json.dumps(summary, allow_nan=False)  # JSON-serialisable, no NaN
        assert json.loads(text) == summary
        assert set(summary) <= SUMMARY_KEYS and "numTraining" not in summary and "dataset" not in summary
        n = len(federation.fingerprints[site]["spacings"])
        assert summary["num_cases"] == n
        for case_id in case_ids + ["imagesTr", "labelsTr", "_0000"]:
            assert case_id not in text, f"{case_id!r} appears in site {site}'s summary"
        for key in ("spacing_quantiles", "shape_quantiles", "extent_quantiles"):
            table = summary[key]  # fixed-size quantile table, whatever the number of cases
            assert len(table) == len(QUANTILES) != n and all(len(row) == 3 for row in table)
        for path, values in _lists(summary):  # table rows have one entry per image axis (3), checked above
            if not (path.endswith("]") and path.split("/")[-1].split("[")[0].endswith("_quantiles")):
                assert len(values) != n, f"list {path} of site {site} has one entry per case"
        assert summary["quantile_levels"] == list(QUANTILES)


def _differences(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}/{k}")]
    return [] if a == b else [f"{path}: pooled {a!r} vs federated {b!r}"]


def test_federated_plan_matches_pooled_plan(federation):
    fed, pooled = federation.plans, federation.pooled_plans
    assert set(fed["configurations"]) == {"3d_fullres"}
    a, b = pooled["configurations"]["3d_fullres"], fed["configurations"]["3d_fullres"]
    assert b["architecture"]["network_class_name"] == a["architecture"]["network_class_name"]
    assert b["architecture"]["arch_kwargs"] == a["architecture"]["arch_kwargs"]
    assert b["patch_size"] == a["patch_size"] and b["batch_size"] == a["batch_size"]
    np.testing.assert_allclose(b["spacing"], a["spacing"], rtol=0.05)
    assert b["normalization_schemes"] == a["normalization_schemes"]
    assert b["use_mask_for_norm"] == a["use_mask_for_norm"]
    assert fed["transpose_forward"] == pooled["transpose_forward"]
    assert fed["image_reader_writer"] == pooled["image_reader_writer"]
    # intensities (CTNormalization uses mean, std and the 0.5 / 99.5 percentiles as clipping bounds)
    pa, pb = (p["foreground_intensity_properties_per_channel"]["0"] for p in (pooled, fed))
    value_range = pa["max"] - pa["min"]
    assert pb["min"] == pa["min"] and pb["max"] == pa["max"]
    assert abs(pb["mean"] - pa["mean"]) < 0.01 * value_range and abs(pb["std"] / pa["std"] - 1) < 0.02
    for key in ("median", "percentile_00_5", "percentile_99_5"):
        assert abs(pb[key] - pa[key]) < 0.05 * value_range, key
    differences = _differences({**pooled, "configurations": {"3d_fullres": a}}, fed)
    print("\nfederated vs pooled plans:\n  " + "\n  ".join(differences))


def test_install_and_preprocess_at_a_site(federation, monkeypatch):
    from nnunet_adpfl.nnunet.pipeline import run

    env = federation.site_envs["A"]
    monkeypatch.setenv("nnUNet_raw", env["nnUNet_raw"])
    folder = Path(env["nnUNet_preprocessed"]) / DATASET
    merged_fingerprint, _ = merge_summaries(list(federation.summaries.values()))
    path = install_plans(federation.plans, folder, DATASET, fingerprint=merged_fingerprint)
    assert path == folder / "nnUNetPlans.json"
    installed = json.loads(path.read_text())
    assert installed["dataset_name"] == DATASET
    assert plans_digest(installed) == plans_digest(federation.plans)
    site_json = json.loads((folder / "dataset.json").read_text())
    assert site_json["numTraining"] == federation.summaries["A"]["num_cases"]  # the site's own dataset.json
    assert json.loads((folder / "dataset_fingerprint.json").read_text()) == json.loads(json.dumps(merged_fingerprint))

    start = time.time()
    run(["nnUNetv2_preprocess", "-d", "501", "-c", "3d_fullres", "-np", "1"], env, federation.root / "pp_A.log")
    print(f"\nnnUNetv2_preprocess at site A: {time.time() - start:.1f} s")
    out = folder / federation.plans["configurations"]["3d_fullres"]["data_identifier"]
    cases = {p.name.split(".")[0] for p in out.iterdir() if p.suffix != ".pkl" and not p.name.endswith("_seg.b2nd")}
    assert len(cases) == site_json["numTraining"], sorted(p.name for p in out.iterdir())
    assert plans_digest(json.loads(path.read_text())) == plans_digest(federation.plans)  # untouched by nnU-Net


def test_install_plans_checks(federation, tmp_path):
    folder = tmp_path / DATASET
    with pytest.raises(ValueError, match="folder name"):
        install_plans(federation.plans, folder, "Dataset502_Other", dataset_json={"channel_names": {"0": "CT"}})
    with pytest.raises(ValueError, match="channels"):
        install_plans(federation.plans, folder, DATASET, dataset_json={"channel_names": {"0": "CT", "1": "PET"}})
    with pytest.raises(FileNotFoundError, match="fingerprint"):
        install_plans(federation.plans, folder, DATASET, dataset_json={"channel_names": {"0": "CT"}})


# ----------------------------------------------------------------------------- fast tests without nnU-Net runs


def _fake_site(spacings, shapes, labels=None, channels=None, file_ending=".nii.gz", intensities=None) -> dict:
    fingerprint = {
        "spacings": spacings, "shapes_after_crop": shapes, "median_relative_size_after_cropping": 0.9,
        "foreground_intensity_properties_per_channel": intensities or {
            0: {"mean": 100.0, "median": 101.0, "std": 20.0, "min": 0.0, "max": 200.0, "percentile_00_5": 40.0,
                "percentile_99_5": 150.0}},
    }
    dataset_json = {"channel_names": channels or {"0": "CT"}, "labels": labels or {"background": 0, "kidney": 1},
                    "file_ending": file_ending, "numTraining": len(spacings), "name": "secret-hospital"}
    return site_summary(fingerprint, dataset_json)


def test_merge_refuses_mismatching_sites():
    base = _fake_site([[3.0, 1.0, 1.0]] * 3, [[20, 50, 50]] * 3)
    merge_summaries([base, copy.deepcopy(base)])  # agreeing sites merge
    mismatches = {
        "labels": _fake_site([[3.0, 1.0, 1.0]] * 3, [[20, 50, 50]] * 3, labels={"background": 0, "tumour": 1}),
        "channel_names": _fake_site([[3.0, 1.0, 1.0]] * 3, [[20, 50, 50]] * 3, channels={"0": "MRI"}),
        "file_ending": _fake_site([[3.0, 1.0, 1.0]] * 3, [[20, 50, 50]] * 3, file_ending=".nrrd"),
        "dimensionality": _fake_site([[1.0, 1.0]] * 3, [[50, 50]] * 3),
    }
    for what, other in mismatches.items():
        with pytest.raises(ValueError, match=what):
            merge_summaries([base, other])
    with pytest.raises(ValueError, match="no site summaries"):
        merge_summaries([])


def test_merge_reconstructs_pooled_statistics():
    rng = np.random.default_rng(0)
    sites = []
    for n, thickness in ((5, 2.5), (3, 5.0)):  # 5 cases: levels 0, 25, ..., 100 lie on the quantile grid
        spacing = [[thickness * rng.uniform(0.9, 1.1), s, s] for s in rng.uniform(0.7, 0.9, n)]
        shapes = [[int(round(200 / sp[0])), int(rng.integers(40, 60)), 50] for sp in spacing]
        sites.append((spacing, shapes))
    summaries = [_fake_site(sp, sh) for sp, sh in sites]
    assert "secret-hospital" not in json.dumps(summaries) and "numTraining" not in summaries[0]
    fingerprint, dataset_json = merge_summaries(summaries)
    assert dataset_json["numTraining"] == 8 and len(fingerprint["spacings"]) == 8
    assert dataset_json["overwrite_image_reader_writer"] == "SimpleITKIO"
    # the 5-case site's spacings and extents (shape x spacing, which fix the shapes after resampling) are
    # reproduced exactly as sorted per-axis values; shapes only approximately (their pairing is not shared)
    spacings, shapes = np.asarray(fingerprint["spacings"]), np.asarray(fingerprint["shapes_after_crop"])
    np.testing.assert_allclose(np.sort(spacings[:5], 0), np.sort(sites[0][0], 0))
    np.testing.assert_allclose(np.sort(spacings[:5] * shapes[:5], 0),
                               np.sort(np.asarray(sites[0][0]) * np.asarray(sites[0][1]), 0))
    pooled_spacing = np.concatenate([np.asarray(sp) for sp, _ in sites])
    pooled_shape = np.concatenate([np.asarray(sh) for _, sh in sites])
    np.testing.assert_allclose(np.median(spacings, 0), np.median(pooled_spacing, 0), rtol=0.02)
    np.testing.assert_allclose(np.median(shapes, 0), np.median(pooled_shape, 0), rtol=0.1)


def test_merge_intensities_case_weighted():
    rng = np.random.default_rng(1)
    samples, summaries = [], []
    for n, loc, scale in ((4, 100.0, 20.0), (2, 160.0, 10.0)):
        cases = [rng.normal(loc, scale, 2000) for _ in range(n)]  # equal samples per case, as nnU-Net draws them
        values = np.concatenate(cases)
        samples.append(values)
        p005, median, p995 = np.percentile(values, (0.5, 50, 99.5))
        stats = {"mean": values.mean(), "median": median, "std": values.std(), "min": values.min(),
                 "max": values.max(), "percentile_00_5": p005, "percentile_99_5": p995}
        summaries.append(_fake_site([[1.0, 1.0, 1.0]] * n, [[30, 30, 30]] * n, intensities={0: stats}))
    pooled = np.concatenate(samples)
    merged = merge_summaries(summaries)[0]["foreground_intensity_properties_per_channel"]["0"]
    assert merged["mean"] == pytest.approx(pooled.mean()) and merged["std"] == pytest.approx(pooled.std())
    assert merged["min"] == pooled.min() and merged["max"] == pooled.max()
    p005, p995 = np.percentile(pooled, (0.5, 99.5))
    assert merged["percentile_00_5"] == pytest.approx(p005, abs=5.0)
    assert merged["percentile_99_5"] == pytest.approx(p995, abs=5.0)


def test_plans_digest_ignores_dataset_name_and_the_morph_entry_only():
    plans = {"dataset_name": "Dataset501_A", "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": {"patch_size": [16, 48, 48], "spacing": [3.7, 0.86, 0.86],
                                               "batch_size": 2}}}
    digest = plans_digest(plans)
    assert len(digest) == 64
    assert plans_digest({**plans, "dataset_name": "Dataset501_B"}) == digest
    assert plans_digest({**plans, "dp_morph": {"kernel": [3, 3, 3]}}) == digest  # added by DP-Morph trainers
    reordered = json.loads(json.dumps(plans, sort_keys=True))
    reordered["configurations"]["3d_fullres"]["patch_size"] = (16, 48, 48)  # tuple vs list, key order
    assert plans_digest(reordered) == digest
    changed = copy.deepcopy(plans)
    changed["configurations"]["3d_fullres"]["patch_size"] = [16, 48, 32]
    assert plans_digest(changed) != digest
    changed = copy.deepcopy(plans)
    changed["configurations"]["3d_fullres"]["spacing"][0] = 3.7000001
    assert plans_digest(changed) != digest


def test_cap_features_narrows_every_configuration_and_changes_the_digest():
    arch = {"network_class_name": "PlainConvUNet", "arch_kwargs": {"features_per_stage": [32, 64, 128, 256, 320],
                                                                   "n_stages": 5}}
    plans = {"configurations": {"2d": {"architecture": arch}, "3d_fullres": {"architecture": copy.deepcopy(arch)},
                                "3d_lowres": {"inherits_from": "3d_fullres"}}}
    capped = fed_plan.cap_features(plans, 48)
    for name in ("2d", "3d_fullres"):
        assert capped["configurations"][name]["architecture"]["arch_kwargs"]["features_per_stage"] == [32, 48, 48,
                                                                                                       48, 48]
    assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"][1] == 64  # a copy
    assert plans_digest(capped) != plans_digest(plans)
    with pytest.raises(ValueError):
        fed_plan.cap_features(plans, 0)


def test_site_summary_finds_its_example_image_without_forking(tmp_path, monkeypatch):
    """nnU-Net's file listing forks a multiprocessing Pool, which hung CI in a process already running threads."""
    import multiprocessing.pool

    def no_pool(*args, **kwargs):
        raise AssertionError("site_summary_from_folders must not start a process pool")

    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__", no_pool)
    raw = tmp_path / "Dataset777_X"
    (raw / "imagesTr").mkdir(parents=True)
    dataset_json = {"file_ending": ".nii.gz"}
    with pytest.raises(FileNotFoundError, match=r"no training images \(\*_0000.nii.gz\)"):
        fed_summary._example_training_image(raw, dataset_json)
    for name in ("b_0000.nii.gz", "a_0001.nii.gz", "a_0000.nii.gz"):
        (raw / "imagesTr" / name).touch()
    assert fed_summary._example_training_image(raw, dataset_json) == str(raw / "imagesTr" / "a_0000.nii.gz")
    listed = {"file_ending": ".nii.gz", "dataset": {"c": {"images": ["imagesTr/b_0000.nii.gz"], "label": "x"}}}
    assert fed_summary._example_training_image(raw, listed) == str(raw / "imagesTr" / "b_0000.nii.gz")
