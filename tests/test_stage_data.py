"""The workflows' data stage: a published-scale cohort is what `fed-compare --cohort-size published` writes."""
from pathlib import Path

from nnunet_adpfl.cli import build_parser
from nnunet_adpfl.data.tasks import published_cohort
from nnunet_adpfl.workflows import stages


def _captured(monkeypatch, tmp_path, **kwargs):
    calls = []

    def fake_generate(task, root, dataset_id, **kw):
        calls.append(kw)
        return Path(root) / "Dataset501_X"

    monkeypatch.setattr(stages, "generate_dataset", fake_generate)
    monkeypatch.setattr(stages, "split_sites", lambda lay, pooled: None)
    stages.stage_data(stages.Layout(tmp_path, ["A", "B", "C"]), "kidney_roi", 30, 0.25, 7, **kwargs)
    return calls[0]


def test_published_cohort_gives_the_public_dataset_sizes(monkeypatch, tmp_path):
    kw = _captured(monkeypatch, tmp_path, cohort_size="published")
    expected = published_cohort("kidney_roi", 3)
    assert kw["site_cases"] == expected["site_cases"] and sum(kw["site_cases"]) == 489
    assert kw["scale"] == expected["scale"] and kw["num_test_cases"] == expected["num_test_cases"]
    assert kw["seed"] == 7 and kw["progress"] and "num_cases" not in kw


def test_small_cohort_keeps_the_given_sizes(monkeypatch, tmp_path):
    kw = _captured(monkeypatch, tmp_path)
    assert (kw["num_cases"], kw["num_sites"], kw["scale"], kw["seed"]) == (30, 3, 0.25, 7) and "site_cases" not in kw


def test_fed_compare_takes_the_cohort_size():
    a = build_parser().parse_args(["fed-compare", "--cohort-size", "published"])
    assert a.cohort_size == "published"
