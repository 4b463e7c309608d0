"""Published-scale cohorts of the synthetic generator: per-site sizes, parallel and resumable writing, progress."""
from __future__ import annotations

import argparse
import json
import multiprocessing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nnunet_adpfl.data import writing
from nnunet_adpfl.data.shapes import site_profiles
from nnunet_adpfl.data.synthetic import add_cli, dataset_options, generate_dataset
from nnunet_adpfl.data.tasks import PUBLISHED, SPECS, published_cohort

ORIGINAL_SPECS = dict(SPECS)
TINY = dict(site_cases=[3, 3, 2], num_test_cases=2, scale=0.25, seed=1)  # skin: ~32x32 images


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["make-dataset", *argv])


def counting_make_case(monkeypatch, task: str, crash_at: int | None = None) -> list[int]:
    """Replace the task's case maker by one that counts its calls and raises at call number ``crash_at``."""
    spec, calls = ORIGINAL_SPECS[task], []

    def make_case(rng, profile, scale):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("simulated crash")
        return spec.make_case(rng, profile, scale)

    monkeypatch.setitem(SPECS, task, replace(spec, make_case=make_case))
    return calls


def test_published_cohorts_have_the_public_datasets_sizes():
    for task, total in (("skin", 10015), ("kidney", 489), ("kidney_roi", 489), ("brain", 1350)):
        sizes = published_cohort(task)["site_cases"]
        assert sum(sizes) == total and len(sizes) == 3 and len(set(sizes)) == 3  # uneven, as the small cohorts
        assert sum(published_cohort(task, num_sites=5)["site_cases"]) == total
    assert published_cohort("skin") == {"site_cases": [3231, 4200, 2584], "num_test_cases": 1000, "scale": 0.3}
    with pytest.raises(ValueError, match="num_sites"):
        published_cohort("skin", num_sites=0)


@pytest.mark.parametrize("task, max_shape", [("skin", (43, 43)), ("kidney", (25, 44, 44)),
                                             ("kidney_roi", (25, 44, 44)), ("brain", (42, 42, 42))])
def test_published_scale_is_small(task, max_shape):
    """The documented sizes (tasks.PUBLISHED): skin 34 to 43 pixels a side, the 3D tasks at most 44 voxels."""
    spec = SPECS[task]
    profiles = site_profiles(spec.site_ranges, np.random.default_rng(0), 3)
    for index in range(3):
        case = spec.make_case(np.random.default_rng([0, 0, index]), profiles[index], PUBLISHED[task].scale)
        assert all(8 <= n <= m for n, m in zip(case.label.shape, max_shape)), case.label.shape


def test_site_cases_are_honoured(tmp_path):
    folder = generate_dataset("skin", tmp_path, site_cases=[3, 5, 2], num_test_cases=1, scale=0.25)
    meta = json.loads((folder / "sites.json").read_text())
    assert {site: len(cases) for site, cases in meta["sites"].items()} == {"A": 3, "B": 5, "C": 2}
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 10
    assert len(list((folder / "labelsTr").iterdir())) == 10 and meta["scale"] == 0.25


@pytest.mark.parametrize("kwargs, message", [
    (dict(site_cases=[3, 1]), "site_cases"),
    (dict(site_cases=[]), "number of sites"),
    (dict(site_cases=[3, 3], num_cases=7), "disagrees"),
    (dict(site_cases=[3, 3], num_sites=3), "disagrees"),
    (dict(workers=0), "workers"),
])
def test_bad_site_cases_raise(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        generate_dataset("skin", tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("task, scale", [("skin", 0.25), ("brain", 0.4)])
def test_same_output_whatever_the_worker_count(task, scale, tmp_path, monkeypatch):
    kwargs = {**TINY, "site_cases": [2, 3, 2], "scale": scale}
    methods = []
    get_context = multiprocessing.get_context
    monkeypatch.setattr(writing.multiprocessing, "get_context", lambda method: methods.append(method)
                        or get_context(method))
    one = files_of(generate_dataset(task, tmp_path / "one", workers=1, **kwargs))
    two = files_of(generate_dataset(task, tmp_path / "two", workers=2, **kwargs))
    assert methods == ["spawn"]  # a forked pool can deadlock in a process that runs threads
    assert len(one) == 9 * (len(SPECS[task].channel_names) if task == "brain" else 1) + 9 + 2
    assert one == two


def test_resume_after_a_crash_keeps_complete_cases_and_matches_a_fresh_run(tmp_path, monkeypatch):
    fresh = files_of(generate_dataset("skin", tmp_path / "fresh", **TINY))
    counting_make_case(monkeypatch, "skin", crash_at=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_dataset("skin", tmp_path / "run", **TINY)
    folder = tmp_path / "run" / "Dataset501_SynthSkin"
    assert not (folder / "sites.json").exists() and not (folder / "dataset.json").exists()
    assert len(list((folder / "labelsTr").iterdir())) == 5
    (folder / "labelsTr" / "A_0002.png").unlink()  # crashed between a case's image and its label
    (folder / ".partial" / "imagesTr__B_0005_0000.png").write_bytes(b"truncated")  # being written at the crash
    kept = {p.name: p.stat().st_mtime_ns for p in (folder / "labelsTr").iterdir()}

    calls = counting_make_case(monkeypatch, "skin")
    assert generate_dataset("skin", tmp_path / "run", **TINY) == folder
    assert len(calls) == 10 - 4  # the four complete cases were skipped
    assert all((folder / "labelsTr" / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    assert files_of(folder) == fresh and not (folder / ".partial").exists()


def test_a_rerun_with_other_parameters_starts_afresh(tmp_path, monkeypatch):
    generate_dataset("skin", tmp_path, **{**TINY, "seed": 2})
    folder = tmp_path / "Dataset501_SynthSkin"
    counting_make_case(monkeypatch, "skin", crash_at=3)
    with pytest.raises(RuntimeError):
        generate_dataset("skin", tmp_path, **TINY)
    assert not (folder / "sites.json").exists()  # the complete dataset it replaces is no longer announced

    calls = counting_make_case(monkeypatch, "skin")
    generate_dataset("skin", tmp_path, **{**TINY, "seed": 2})  # parameters of neither run in progress
    assert len(calls) == 10
    assert files_of(folder) == files_of(generate_dataset("skin", tmp_path / "fresh", **{**TINY, "seed": 2}))


def test_progress_bar(tmp_path, capsys):
    generate_dataset("skin", tmp_path, progress=True, **TINY)
    err = capsys.readouterr().err
    assert "Dataset501_SynthSkin cases" in err and "10/10" in err
    generate_dataset("skin", tmp_path / "quiet", **TINY)
    assert capsys.readouterr().err == ""


def test_cli_cohort_size_options():
    brain = dataset_options(parse("--task", "brain", "--cohort-size", "published"))
    assert brain == {**published_cohort("brain"), "num_cases": None, "num_sites": None, "workers": brain["workers"],
                     "progress": True}
    skin = dataset_options(parse("--task", "skin", "--cohort-size", "published", "--num-sites", "4", "--scale",
                                 "0.5", "--num-test-cases", "10", "--workers", "3", "--no-progress"))
    assert skin["site_cases"] == published_cohort("skin", 4)["site_cases"] and len(skin["site_cases"]) == 4
    assert (skin["scale"], skin["num_test_cases"], skin["workers"], skin["progress"]) == (0.5, 10, 3, False)
    small = dataset_options(parse("--task", "skin"))
    assert (small["num_cases"], small["num_sites"], small["site_cases"], small["scale"], small["num_test_cases"]) \
        == (None, None, None, 1.0, 6)
    with pytest.raises(ValueError, match="--num-cases"):
        dataset_options(parse("--task", "skin", "--cohort-size", "published", "--num-cases", "30"))


def test_cli_site_cases_and_progress(tmp_path, capsys):
    args = parse("--task", "skin", "--output-root", str(tmp_path), "--site-cases", "2,3,2", "--scale", "0.25",
                 "--num-test-cases", "0", "--workers", "1")
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "site B:   3 cases" in captured.out and "7 training cases" in captured.out
    assert "7/7" in captured.err  # the progress bar
    bad = parse("--task", "skin", "--output-root", str(tmp_path), "--site-cases", "2,3", "--num-sites", "3")
    assert bad.func(bad) == 2 and "disagrees" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--task", "skin", "--site-cases", "2,x")
    assert "comma-separated" in capsys.readouterr().err
