import os

import pytest

# nnU-Net reads these at import time; tests that need real folders set their own.
for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ.setdefault(var, f"/tmp/nnunet_adpfl_unset_{var}")
os.environ.setdefault("nnUNet_compile", "f")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run slow end-to-end runs and benchmarks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kidney_preprocessed(tmp_path_factory):
    """A small synthetic CT dataset (id 501), planned and preprocessed for 3d_fullres with the real
    ``nnUNetv2_plan_and_preprocess`` command. Returns (root, env)."""
    from nnunet_adpfl.nnunet.pipeline import nnunet_env, run
    from nnunet_adpfl.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root, nnUNet_def_n_proc="1")
    generate_dataset("kidney", env["nnUNet_raw"], 501, num_cases=10, num_sites=1, num_test_cases=2, seed=0,
                     scale=0.5)
    run(["nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "-np", "2"], env, root / "plan.log")
    return root, env


@pytest.fixture
def nnunet_paths(kidney_preprocessed, monkeypatch):
    """Point this process's nnU-Net paths (and nnUNet_extTrainer) at the preprocessed dataset."""
    root, env = kidney_preprocessed
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.delenv("nnUNet_adpfl_config", raising=False)
    return root, env
