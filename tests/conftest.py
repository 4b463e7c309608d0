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
